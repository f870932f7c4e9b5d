"""Where OpenVINO's CPU plugin spends a batch-1 inference: per-layer-type time of one or more models.

    python benchmarks/openvino_profile.py --imgsz 640 --threads 2 fp32.onnx:f32 fp32.onnx:bf16 int8.onnx:f32

Each argument is MODEL[:HINT] (HINT f32, bf16 or default). The per-node times come from OpenVINO's own
performance counters (``PERF_COUNT``), summed by node type and by execution kernel (``exec_type``, e.g.
``jit_avx512_amx_I8`` or ``brgconv_avx512_I8``), medians over ``--runs`` inferences. Used in docs/deploy.md to say
why INT8 is, or is not, faster than the best float configuration on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def profile(model: str, hint: str, imgsz: int, threads: int, runs: int) -> tuple[float, dict[str, float]]:
    from utils.export.openvino import openvino_core

    config = {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads}
    if hint != "default":
        config["INFERENCE_PRECISION_HINT"] = hint
    with openvino_core() as core:
        compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    images = np.random.rand(1, 3, imgsz, imgsz).astype(np.float32)
    totals, by_kind = [], defaultdict(list)
    for run in range(runs + 2):
        request.infer({0: images})
        if run < 2:
            continue
        kinds: dict[str, float] = defaultdict(float)
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                kinds[f"{info.node_type} [{info.exec_type}]"] += info.real_time.total_seconds() * 1e3
        totals.append(sum(kinds.values()))
        for kind, ms in kinds.items():
            by_kind[kind].append(ms)
    return statistics.median(totals), {k: statistics.median(v) for k, v in by_kind.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="MODEL[:f32|bf16|default]")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=8, help="layer kinds printed per model")
    args = parser.parse_args(argv)
    for spec in args.models:
        model, _, hint = spec.partition(":")
        total, kinds = profile(model, hint or "f32", args.imgsz, args.threads, args.runs)
        print(f"{model} [{hint or 'f32'}]: {total:.1f} ms summed over executed nodes (median of {args.runs})")
        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"    {ms:7.2f} ms  {100 * ms / total:5.1f} %  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

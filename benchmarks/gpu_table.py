"""mAP (val.py's loader and metrics) and batch-1 / batch-8 latency of artifacts on a CUDA device, one table.

    python benchmarks/gpu_table.py --data neu-det.yaml --imgsz 640 --device 0 best.pt fp16.engine int8.engine

Called by ``benchmarks/gpu_check.sh``. Latency is the median of 30 timed calls after 5 warm-up calls, with
``torch.cuda.synchronize`` around each, on random images of the artifact's size (inference only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.export.registry import load_backend  # noqa: E402
from utils.runners.val import ValOptions, run_val  # noqa: E402


def latency_ms(weights: str, device: str, imgsz: int, batch: int, runs: int = 30) -> float:
    backend = load_backend(weights, device=f"cuda:{device}" if device.isdigit() else device)
    images = torch.rand(batch, 3, imgsz, imgsz, device=backend.device)
    times = []
    for run in range(runs + 5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        backend(images)
        torch.cuda.synchronize()
        if run >= 5:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="0")
    args = parser.parse_args(argv)
    rows = ["| artifact | mAP@.5 | mAP@.5:.95 | batch 1 ms | batch 8 ms |", "|---|---|---|---|---|"]
    for weights in args.weights:
        metrics = run_val(ValOptions(weights, args.data, imgsz=args.imgsz, batch_size=8, device=args.device,
                                     noplots=True, project=str(Path(weights).parent / "val"),
                                     name=Path(weights).stem, exist_ok=True))
        b1, b8 = (latency_ms(weights, args.device, args.imgsz, b) for b in (1, 8))
        name, m50, m5095 = Path(weights).name, metrics["mAP50"], metrics["mAP50-95"]
        rows.append(f"| {name} | {m50:.4f} | {m5095:.4f} | {b1:.2f} | {b8:.2f} |")
    print(f"GPU: {torch.cuda.get_device_name(0)}, image size {args.imgsz}\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stacked compression benchmark (issue 33 point 3): what pruning, distillation, QAT and INT8 export buy together.

    python benchmarks/compress.py --weights runs/train/yolov5s/weights/best.pt \
        --data ../shared/datasets/neu-det/neu-det.yaml --work runs/compress --imgsz 640 --epochs 30
    python benchmarks/compress.py --smoke --work runs/compress-smoke   # the whole chain in minutes, tiny sizes
    python benchmarks/compress.py ... --speedup 1.5 --runtime openvino-int8 --latency-imgsz 640  # latency budget

The chain, for every pruning method (``--methods``: slim, eagleeye, peer = Torch-Pruning's own pruner,
benchmarks/prune_tp.py) at ``--ratio`` of the FLOPs, and for the control (the unpruned model through the same
recipe, same epochs and teacher). With ``--speedup X --runtime R`` the budget is measured latency instead: slim
and EagleEye prune to X times the unpruned model's batch-1 speed on R at the latency size (their latency tables,
``--latency-imgsz``), and the peer to the speed-up our first method's pruned model measured there (the same
measured latency, as a speed-up over the unpruned model timed in the same rounds); these rows are labelled
``<method> xX R`` and their tables are ``table-xX-R.md/.csv``, so a FLOPs run and a latency run share one folder
(and its unpruned, sparse and control stages):

1. ``prune``     prune_slim.py (on the unpruned model fine-tuned with train.py --sparse --sparse-remain RATIO,
                 or on ``--sparse-weights``: a model trained sparse from the start) /
                 prune_eagleeye.py /
                 benchmarks/prune_tp.py (on the unpruned model)
2. ``kd``        train.py --cfg pruned.yaml --weights pruned.pt --teacher unpruned.pt (distilled fine-tune, --epochs)
3. ``qat``       train.py --qat --weights kd.pt (INT8 fake-quantized fine-tune, --qat-epochs: 1 by default)
4. ``int8``      export.py --include onnx openvino --int8 --qat-placement cpu (ONNX Runtime and OpenVINO INT8)

Every artifact (checkpoints and exported files) is scored by val.py on the artifact itself and timed at batch 1
and ``--imgsz`` (or ``--latency-imgsz``: exported rows are exported again at that size) in interleaved rounds
(utils/common/timing.py), the rows of each runtime in the same rounds. The unpruned model is also exported as FP32
ONNX and OpenVINO IR, the IR timed in float32 and in OpenVINO's CPU default (bfloat16 on AMX CPUs): the baselines
of the speed targets. The table (stage, params, GFLOPs, the task's metrics, file size, latency, runtime, the
command behind the row) is printed and written as ``table.md`` and ``table.csv`` (a latency budget's:
``table-xX-R``) in the run folder. Each stage resumes: it is skipped when its artifact and its record
(``stages/<name>.json``) exist, so an interrupted run continues where it stopped.

``--smoke`` runs the chain at --imgsz 64, one batch of one epoch per training stage, on the embedded sample
(data/neu-det-sample.yaml, yolov5n) and then on a two-head classifier (models/cls/yolov5n-mcls-s.yaml) over a
two-head set made from the same images (defect class, and whether the defects cover a large share of the image):
the chain needs nothing but a data YAML and a model.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.common.cli import UserArgumentParser, run_cli  # noqa: E402
from utils.common.errors import FlagError  # noqa: E402

LOGGER = logging.getLogger(__name__)

METHODS = ("slim", "eagleeye", "peer")
SAMPLE = ROOT / "data" / "neu-det-sample.yaml"
SAMPLE_VAL = ROOT / "data" / "neu-det-sample" / "images" / "val"
CONTROL = "unpruned"
FINETUNE_HYP = ["lr0=0.005", "lrf=0.1", "warmup_epochs=0"]  # fine-tuning a trained model: no warm-up, small lr
QAT_HYP = ["lr0=0.001", "lrf=0.1", "warmup_epochs=0"]
BASE_HYP: list[str] = []
# the task's metrics as table columns: (header, key in val.py's metrics)
DETECT_METRICS = (("mAP@.5", "mAP50"), ("mAP@.5:.95", "mAP50-95"))


@dataclass(frozen=True)
class ChainSettings:
    """One chain: the data, the unpruned model, the recipe of every stage and how rows are measured."""

    data: str
    work: Path
    weights: str = ""  # the trained unpruned checkpoint; '' = train one from ``cfg`` for ``base_epochs``
    cfg: str = "yolov5n.yaml"
    base_epochs: int = 100
    epochs: int = 30  # the sparse and distilled fine-tunes
    qat_epochs: int = 1  # QAT fine-tune (one epoch is docs/deploy.md's measured recipe)
    imgsz: int = 640  # training, validation, export and latency
    latency_imgsz: int = 0  # 0: time at ``imgsz``; else every exported row is exported again at this size to time it
    batch_size: int = 16
    workers: int = 2
    max_batches: int = 0  # train.py --max-batches (smoke: 1)
    device: str = ""
    ratio: float = 0.5  # FLOPs kept by every pruning method
    methods: tuple[str, ...] = METHODS
    sparse: float = 5e-4  # train.py --sparse of the model slim prunes
    sparse_weights: str = ""  # slim's parent trained sparse from the start; '' = the sparse fine-tune stage
    max_iter: int = 200  # EagleEye candidates
    delta: float = 0.02  # EagleEye's and the peer's FLOPs band
    calib_images: int = 300
    threads: int = 2
    runs: int = 30  # interleaved latency rounds
    speedup: float = 0.0  # 0: prune to ``ratio`` of the FLOPs; else to this speed-up on ``runtime`` (latency budget)
    runtime: str = ""  # the runtime a latency budget is measured on (utils/compress/prune/runtimes.py)
    control: bool = True  # the unpruned model through the same kd, QAT and INT8 stages (off only to test mechanics)
    quantize: bool = True  # the QAT and INT8 stages (off only to test the mechanics before them)
    seed: int = 0  # train.py --seed of every training stage (another seed in another --work: the fine-tunes' spread)

    @property
    def latency_size(self) -> int:
        return self.latency_imgsz or self.imgsz

    def label(self, method: str) -> str:
        """A pruning method's row label and stage-name stem: ``slim``, or ``slim x1.5 openvino-int8``."""
        return f"{method} x{self.speedup:g} {self.runtime}" if self.speedup else method


@dataclass(frozen=True)
class Row:
    """One line of the table: an artifact, the checkpoint whose size it reports, and the command that made it."""

    label: str
    stage: str
    artifact: Path
    source: Path
    command: str
    export_argv: tuple[str, ...] = ()  # export.py's flags that wrote ``artifact`` (re-run at --latency-imgsz)


def check_settings(s: ChainSettings) -> None:
    """Every flag in its domain and every input present, before anything trains."""
    if not Path(s.data).is_file():
        raise FlagError(f"--data {s.data}: file not found")
    for flag, path in (("--weights", s.weights), ("--sparse-weights", s.sparse_weights)):
        if path and not Path(path).is_file():
            raise FlagError(f"{flag} {path}: file not found")
    if not 0 < s.ratio < 1:
        raise FlagError(f"--ratio {s.ratio}: expected a share of FLOPs strictly between 0 and 1, e.g. 0.5")
    unknown = sorted(set(s.methods) - set(METHODS))
    if unknown or not s.methods:
        raise FlagError(f"--methods {' '.join(s.methods)}: expected some of {', '.join(METHODS)}")
    if s.speedup:
        check_latency_budget(s)
    if s.latency_imgsz < 0:
        raise FlagError(f"--latency-imgsz {s.latency_imgsz}: expected 0 (time at --imgsz) or an image size")
    for flag, value in (("--epochs", s.epochs), ("--qat-epochs", s.qat_epochs), ("--base-epochs", s.base_epochs),
                        ("--imgsz", s.imgsz),
                        ("--batch-size", s.batch_size), ("--max-iter", s.max_iter), ("--threads", s.threads),
                        ("--runs", s.runs), ("--calib-images", s.calib_images)):
        if value < 1:
            raise FlagError(f"{flag} {value}: expected at least 1")


def check_latency_budget(s: ChainSettings) -> None:
    """--speedup needs a runtime that is installed and a method of ours whose measured latency the peer aims at."""
    from utils.compress.prune.runtimes import RUNTIMES

    if not s.speedup > 1:
        raise FlagError(f"--speedup {s.speedup}: expected a speed-up above 1, e.g. 1.5")
    if not s.runtime:
        raise FlagError(f"--speedup {s.speedup:g} needs --runtime ({'|'.join(RUNTIMES.names())}): where the "
                        "latency is measured")
    RUNTIMES.create(s.runtime, s.threads).check()
    if set(s.methods) == {"peer"}:
        raise FlagError("--speedup with --methods peer alone: the peer prunes to the latency our first method's "
                        "model measured; add slim or eagleeye")


def python_command(script: str, argv: Sequence[str]) -> str:
    """The command line that reproduces a stage (what the table's last column shows)."""
    return " ".join(["python", script, *(shlex.quote(str(a)) for a in argv)])


def run_stage(s: ChainSettings, name: str, artifact: Path, script: str, argv: list[str],
              call: Callable[[list[str]], Any]) -> tuple[Path, str]:
    """Run ``script``'s entry point in this process with ``argv`` unless ``artifact`` and the stage's record
    already exist (an interrupted chain resumes); returns the artifact and the stage's command line."""
    record = s.work / "stages" / f"{name}.json"
    command = python_command(script, argv)
    if artifact.exists() and record.is_file():
        LOGGER.info("stage %s: done earlier (%s)", name, artifact)
        return artifact, json.loads(record.read_text())["command"]
    LOGGER.info("stage %s: $ %s", name, command)
    call(argv)
    if not artifact.exists():
        raise RuntimeError(f"stage {name} wrote no {artifact}")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"command": command, "artifact": str(artifact)}, indent=1))
    return artifact, command


def train_argv(s: ChainSettings, name: str, epochs: int, hyp: list[str], *extra: str) -> list[str]:
    """train.py's flags for one stage; with --max-batches (smoke) every batch is an optimizer step (nbs = batch
    size), or one batch of 8 would accumulate towards 64 images and never step."""
    if s.max_batches:
        hyp = [*hyp, f"nbs={s.batch_size}"]
    argv = ["--data", s.data, "--imgsz", str(s.imgsz), "--batch-size", str(s.batch_size), "--epochs", str(epochs),
            "--workers", str(s.workers), "--noplots", "--noautoanchor", "--project", str(s.work / "train"),
            "--name", name, "--exist-ok", "--seed", str(s.seed), "--hyp-override", *hyp, *extra]
    if s.max_batches:
        argv += ["--max-batches", str(s.max_batches)]
    return argv + (["--device", s.device] if s.device else [])


def call_train(argv: list[str]) -> None:
    from utils.runners.train import run_train
    from utils.train.config import parse_train_args

    run_train(parse_train_args(argv))


def call_export(argv: list[str]) -> None:
    """export.py's work without its report: that report loads the checkpoint a second time to count parameters,
    and rebuilding a QAT checkpoint takes seconds (the table has the counts)."""
    import export
    from utils.export import export_model

    export_model(export.options_from_args(export.parse_args(argv)))


def stage_base(s: ChainSettings) -> tuple[Path, str]:
    """The unpruned model: ``--weights`` as given, or trained from ``--cfg`` (smoke)."""
    if s.weights:
        return Path(s.weights), "(given: --weights)"
    best = s.work / "train" / "base" / "weights" / "best.pt"
    return run_stage(s, "base", best, "train.py", train_argv(s, "base", s.base_epochs, BASE_HYP, "--cfg", s.cfg),
                     call_train)


def stage_sparse(s: ChainSettings, base: Path) -> tuple[Path, str]:
    """Network Slimming's input: the unpruned model fine-tuned with train.py --sparse aimed at the chain's cut
    (--sparse-remain: only the channels a cut to ``ratio`` would remove are penalised); its last.pt, since best.pt
    is picked by the metric, usually an early, barely sparse epoch. Or ``--sparse-weights`` as given: the recipe
    docs/prune.md measured to work (sparse from the start, as many epochs as the unpruned model had), whose cut
    loses little before any fine-tune."""
    if s.sparse_weights:
        return Path(s.sparse_weights), "(given: --sparse-weights)"
    last = s.work / "train" / "sparse" / "weights" / "last.pt"
    argv = train_argv(s, "sparse", s.epochs, FINETUNE_HYP, "--weights", str(base), "--sparse", str(s.sparse),
                      "--sparse-remain", str(s.ratio))
    return run_stage(s, "sparse", last, "train.py", argv, call_train)


def stage_prune(s: ChainSettings, method: str, base: Path, peer_speedup: float | None = None) -> tuple[Path, str]:
    """One pruning method at the chain's budget (validation left to the scoring stage); slim prunes the
    sparse-trained model, the others the unpruned one. Under a latency budget the peer aims at ``peer_speedup``."""
    if method == "slim":
        base = stage_sparse(s, base)[0]
    name = stem(s.label(method))
    path = s.work / "pruned" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--weights", str(base), "--data", s.data, "--imgsz", str(s.imgsz), *budget_argv(s, method, peer_speedup),
            "--path", str(path), "--workers", str(s.workers), "--batch-size", str(s.batch_size), "--noval",
            "--exist-ok"]
    if method == "slim":
        import prune_slim

        return run_stage(s, f"prune-{name}", path.with_suffix(".pt"), "prune_slim.py", argv, prune_slim.main)
    if method == "eagleeye":
        import prune_eagleeye

        argv += ["--max-iter", str(s.max_iter), "--delta", str(s.delta), "--calib-batches", "1",
                 "--score-images", str(4 * s.batch_size)]
        return run_stage(s, f"prune-{name}", path.with_suffix(".pt"), "prune_eagleeye.py", argv,
                         prune_eagleeye.main)
    from benchmarks import prune_tp

    argv += ["--delta", str(s.delta)]
    return run_stage(s, f"prune-{name}", path.with_suffix(".pt"), "benchmarks/prune_tp.py", argv, prune_tp.main)


def budget_argv(s: ChainSettings, method: str, peer_speedup: float | None) -> list[str]:
    """The pruning tool's budget flags: --remain-ratio, or the latency budget on the chain's runtime, size and
    threads (our tools: --speedup asked; the peer: the speed-up our first method's model measured, over the
    unpruned model in the same rounds: milliseconds measured minutes apart drift on a shared machine)."""
    if not s.speedup:
        return ["--remain-ratio", str(s.ratio)]
    speedup = f"{peer_speedup:.4f}" if method == "peer" else str(s.speedup)
    return ["--speedup", speedup, "--runtime", s.runtime, "--threads", str(s.threads), "--latency-imgsz",
            str(s.latency_size)]


def measured_speedup(pruned: Path) -> float:
    """The speed-up over the unpruned model (timed in the same rounds) a pruning tool measured for its chosen
    model under a latency budget."""
    from utils.weights.checkpoint import load_checkpoint

    return float(load_checkpoint(pruned).meta["latency"]["measured_speedup"])


def stem(label: str) -> str:
    """A row label as a file and stage name (``slim x1.5 openvino-int8`` -> ``slim-x1.5-openvino-int8``)."""
    return label.replace(" ", "-")


def stage_kd(s: ChainSettings, label: str, weights: Path, base: Path) -> tuple[Path, str]:
    """Distilled fine-tune from the unpruned model (a pruned model trains as its own YAML, the control as is)."""
    extra = ["--weights", str(weights), "--teacher", str(base)]
    if weights.suffix == ".pt" and weights.with_suffix(".yaml").is_file():
        extra += ["--cfg", str(weights.with_suffix(".yaml"))]
    name = f"{stem(label)}-kd"
    best = s.work / "train" / name / "weights" / "best.pt"
    return run_stage(s, name, best, "train.py", train_argv(s, name, s.epochs, FINETUNE_HYP, *extra), call_train)


def stage_qat(s: ChainSettings, label: str, weights: Path) -> tuple[Path, str]:
    name = f"{stem(label)}-qat"
    best = s.work / "train" / name / "weights" / "best.pt"
    argv = train_argv(s, name, s.qat_epochs, QAT_HYP, "--qat", "--weights", str(weights))
    return run_stage(s, name, best, "train.py", argv, call_train)


def stage_int8(s: ChainSettings, label: str, qat: Path) -> tuple[dict[str, Path], str, list[str]]:
    """The QAT weights re-quantized for the CPU runtimes: ONNX Runtime QDQ INT8 and OpenVINO (NNCF) INT8."""
    from utils.export import artifact_paths

    folder = s.work / "export" / stem(label)
    paths = artifact_paths(qat, folder)
    argv = ["--weights", str(qat), "--include", "onnx", "openvino", "--int8", "--qat-placement", "cpu", "--data",
            s.data, "--calib-images", str(s.calib_images), "--imgsz", str(s.imgsz), "--output-dir", str(folder),
            "--exist-ok", "--no-compare"]
    _, command = run_stage(s, f"{stem(label)}-int8", paths["openvino"], "export.py", argv, call_export)
    return {"onnxruntime": paths["onnx_int8"], "openvino": paths["openvino"]}, command, argv


def stage_float_exports(s: ChainSettings, base: Path) -> list[Row]:
    """The unpruned model as FP32 ONNX and OpenVINO IR: the deployed baselines every INT8 row's latency compares
    with. The IR is timed twice: in float32 and in OpenVINO's CPU default (bfloat16 on AMX / AVX512-BF16 CPUs,
    the fastest non-INT8 path there)."""
    from utils.export import artifact_paths

    rows = []
    for fmt, key, name, stages in (("onnx", "onnx", "unpruned-fp32", ("unpruned FP32 ONNX",)),
                                   ("openvino", "openvino", "unpruned-openvino",
                                    ("unpruned OpenVINO f32", "unpruned OpenVINO bf16 (CPU default)"))):
        folder = s.work / "export" / name
        argv = ["--weights", str(base), "--include", fmt, "--imgsz", str(s.imgsz), "--output-dir", str(folder),
                "--exist-ok", "--no-compare"]
        artifact, command = run_stage(s, name, artifact_paths(base, folder)[key], "export.py", argv, call_export)
        rows += [Row("unpruned", stage, artifact, base, command, tuple(argv)) for stage in stages]
    return rows


def build_rows(s: ChainSettings) -> list[Row]:
    """Run (or resume) every stage; the rows in table order."""
    base, base_command = stage_base(s)
    rows = [Row("unpruned", "unpruned", base, base, base_command), *stage_float_exports(s, base)]
    starts = {CONTROL: (base, base_command)} if s.control else {}
    ours = [m for m in s.methods if m != "peer"]
    for method in [*ours, *(["peer"] if "peer" in s.methods else [])]:  # the peer after ours: it may aim at them
        peer_speedup = measured_speedup(starts[s.label(ours[0])][0]) if s.speedup and method == "peer" else None
        label = s.label(method)
        starts[label] = stage_prune(s, method, base, peer_speedup)
        rows.append(Row(label, "pruned", starts[label][0], starts[label][0], starts[label][1]))
    for label, (weights, _) in starts.items():
        kd, kd_command = stage_kd(s, label, weights, base)
        rows.append(Row(label, "pruned + kd" if label != CONTROL else "control: kd", kd, kd, kd_command))
        if not s.quantize:
            continue
        qat, _ = stage_qat(s, label, kd)
        files, command, argv = stage_int8(s, label, qat)
        prefix = "pruned + kd + QAT" if label != CONTROL else "control: kd + QAT"
        rows += [Row(label, f"{prefix} INT8 {runtime}", path, kd, command, tuple(argv))
                 for runtime, path in files.items()]
    return rows


def score(s: ChainSettings, row: Row, number: int) -> dict[str, Any]:
    """val.py on the artifact, params and GFLOPs of its checkpoint, its size on disk (kept in ``results/``)."""
    import val
    from utils.common.torch_utils import count_parameters, model_gflops
    from utils.runners.common import check_inference_args
    from utils.runners.export import artifact_bytes
    from utils.runners.val import ValOptions, run_val
    from utils.weights.checkpoint import load_checkpoint

    record = s.work / "results" / f"{_slug(row.artifact)}.json"  # by artifact: rows that share a file share it
    if record.is_file() and json.loads(record.read_text()).get("artifact") == str(row.artifact):
        return json.loads(record.read_text())
    args = val.parse_args(["--weights", str(row.artifact), "--data", s.data, "--imgsz", str(s.imgsz), "--batch-size",
                           str(s.batch_size), "--workers", str(s.workers), "--noplots", "--project",
                           str(s.work / "val"), "--name", f"{number:02d}", "--exist-ok"])
    check_inference_args(args, "val")
    metrics = run_val(ValOptions(**vars(args)))
    model = load_checkpoint(row.source).model
    result = {"artifact": str(row.artifact), "params": count_parameters(model),
              "gflops": model_gflops(model, s.imgsz) or 0.0, "bytes": artifact_bytes(row.artifact),
              "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=1))
    return result


def _slug(path: Path) -> str:
    return hashlib.sha1(str(path).encode()).hexdigest()[:16]


def row_key(row: Row) -> str:
    return f"{row.stage} | {row.artifact}"


def latency_artifact(s: ChainSettings, row: Row) -> Path:
    """The file timed for ``row``: its artifact, or with ``--latency-imgsz`` (exported rows only; checkpoints run
    at any size) the same export.py command again at that size, into ``<folder>-<size>px`` (resumable)."""
    if not row.export_argv or s.latency_size == s.imgsz:
        return row.artifact
    argv = list(row.export_argv)
    folder = Path(argv[argv.index("--output-dir") + 1])
    resized = folder.with_name(f"{folder.name}-{s.latency_size}px")
    argv[argv.index("--imgsz") + 1] = str(s.latency_size)
    argv[argv.index("--output-dir") + 1] = str(resized)
    target = resized / row.artifact.relative_to(folder)
    return run_stage(s, resized.name, target, "export.py", argv, call_export)[0]


def latencies(s: ChainSettings, rows: list[Row]) -> dict[str, float]:
    """Median batch-1 milliseconds of every row at ``latency_size`` (``latency.json``). The rows of one runtime
    (PyTorch, ONNX Runtime, OpenVINO) are timed in the same interleaved rounds, one runtime after the other, and
    each runtime's models are released before the next opens: twenty sessions alive at once, each with its own
    worker threads, slowed every call on two cores (up to 3.4x on PyTorch rows, 1.6x on OpenVINO rows)."""
    record = s.work / f"latency{tagged(s)}.json"
    keys = [row_key(row) for row in rows]
    if record.is_file():
        known = json.loads(record.read_text())
        if (known.get("runs"), known.get("imgsz")) == (s.runs, s.latency_size) and all(k in known["ms"] for k in keys):
            return known["ms"]
    by_runtime: dict[str, list[Row]] = {}
    for row in rows:
        by_runtime.setdefault(runtime_of(row), []).append(row)
    ms: dict[str, float] = {}
    for group in by_runtime.values():
        ms.update(time_rows(s, group))
    record.write_text(json.dumps({"runs": s.runs, "threads": s.threads, "imgsz": s.latency_size, "ms": ms}, indent=1))
    return ms


def time_rows(s: ChainSettings, rows: list[Row]) -> dict[str, float]:
    """Median ms of each row over ``runs`` interleaved rounds (utils/common/timing.py)."""
    import torch

    from benchmarks.deploy import open_backend
    from utils.common.timing import median_call_ms
    from utils.export.common import sample_images
    from utils.weights.checkpoint import load_checkpoint

    images = sample_images(SAMPLE_VAL, (s.latency_size, s.latency_size), 1)
    calls: dict[str, Callable[[], Any]] = {}
    for row in rows:
        if row.artifact.suffix == ".pt":
            model = load_checkpoint(row.artifact, fuse=True).model.float().eval()
            calls[row_key(row)] = _no_grad(model, images)
        else:
            backend = open_backend(runtime_name(row), latency_artifact(s, row), s.threads)
            calls[row_key(row)] = _no_grad(backend, images)
    with torch.inference_mode():
        timed = median_call_ms(calls, s.runs)
    return {key: values["median"] for key, values in timed.items()}


def runtime_name(row: Row) -> str:
    """benchmarks/deploy.py's name of the runtime that times an exported row."""
    if "openvino" not in row.stage.lower():
        return "onnx"
    return "openvino-bf16" if "bf16" in row.stage else "openvino"


def _no_grad(model: Callable[[Any], Any], images: Any) -> Callable[[], Any]:
    return lambda: model(images)


def metric_columns(results: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """Detection: mAP@.5 and mAP@.5:.95; a classifier: its mean top-1 and each head's."""
    keys = results[0]["metrics"]
    if "mAP50" in keys:
        return DETECT_METRICS
    heads = [k for k in keys if k.endswith("/top1") and k != "mean/top1"]
    return (("top-1 mean", "mean/top1"), *((f"{k.split('/')[0]} top-1", k) for k in heads))


def runtime_of(row: Row) -> str:
    if row.artifact.suffix == ".pt":
        return "PyTorch"
    return "OpenVINO" if "openvino" in row.stage.lower() else "ONNX Runtime"


def table_rows(s: ChainSettings, rows: list[Row], results: list[dict[str, Any]], ms: dict[str, float]
               ) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table (one line per artifact)."""
    columns = metric_columns(results)
    header = ["model", "stage", "params (M)", "GFLOPs", *(name for name, _ in columns), "size (MB)",
              f"latency b1 {s.latency_size} (ms)", "runtime", "command"]
    lines = []
    for row, result in zip(rows, results, strict=True):
        metrics = [f"{result['metrics'].get(key, float('nan')):.4f}" for _, key in columns]
        lines.append([row.label, row.stage, f"{result['params'] / 1e6:.3f}", f"{result['gflops']:.3f}", *metrics,
                      f"{result['bytes'] / 1e6:.2f}", f"{ms[row_key(row)]:.2f}", runtime_of(row),
                      row.command])
    return header, lines


def write_tables(s: ChainSettings, header: list[str], lines: list[list[str]]) -> str:
    """``table.csv`` and ``table.md`` in the run folder; returns the Markdown."""
    from utils.common.timing import cpu_model

    with (s.work / f"table{tagged(s)}.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *lines])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line[:-1]) + f" | `{line[-1]}` |"
           for line in lines]
    md.append(f"\nLatency: median of {s.runs} interleaved rounds, batch 1, {s.latency_size}x{s.latency_size} (exported "
              f"again at that size where it differs from --imgsz {s.imgsz}), {s.threads} threads, "
              f"{cpu_model()}. Data: {s.data}. Budget: {budget_text(s)}.")
    text = "\n".join(md)
    (s.work / f"table{tagged(s)}.md").write_text(text + "\n")
    return text


def budget_text(s: ChainSettings) -> str:
    if not s.speedup:
        return f"{s.ratio:g} of the unpruned model's FLOPs"
    return (f"{s.speedup:g}x the unpruned model's batch-1 speed on {s.runtime} at {s.latency_size} px, {s.threads} "
            "threads (the peer: the speed-up our first method's pruned model measured there)")


def tagged(s: ChainSettings) -> str:
    """The suffix of a latency run's table and timing files (``-x1.5-openvino-int8``; '' for the FLOPs run)."""
    return f"-x{s.speedup:g}-{s.runtime}" if s.speedup else ""


def run_chain(s: ChainSettings) -> list[dict[str, Any]]:
    """The whole chain (resuming what is done), the table printed and written; returns one dict per row."""
    check_settings(s)
    s.work.mkdir(parents=True, exist_ok=True)
    rows = build_rows(s)
    results = [score(s, row, number) for number, row in enumerate(rows)]
    ms = latencies(s, rows)
    header, lines = table_rows(s, rows, results, ms)
    print(write_tables(s, header, lines), flush=True)
    return [dict(zip(header, line, strict=True)) | {"result": result} for line, result in zip(lines, results,
                                                                                              strict=True)]


def two_head_sample(folder: Path, large: float = 0.25) -> Path:
    """A two-head classification set made from the embedded detection sample: head ``defect`` is the image's
    dominant class, head ``extent`` whether its boxes cover more than ``large`` of the image; filename-fields
    layout (utils/data/classify.py). Returns its data YAML."""
    import numpy as np
    import yaml

    from utils.data.converters import dominant_class

    names = yaml.safe_load(SAMPLE.read_text())["names"]
    for split in ("train", "val"):
        images = sorted((SAMPLE.parent / "neu-det-sample" / "images" / split).glob("*.jpg"))
        for number, image in enumerate(images):
            label_file = SAMPLE.parent / "neu-det-sample" / "labels" / split / f"{image.stem}.txt"
            labels = np.loadtxt(label_file, ndmin=2) if label_file.stat().st_size else np.zeros((0, 5))
            extent = int(float((labels[:, 3] * labels[:, 4]).sum()) > large)
            target = folder / "images" / split / f"{number:05d}_{dominant_class(labels)}_{extent}_.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
    data = {"path": str(folder), "train": "images/train", "val": "images/val",
            "heads": [{"name": "defect", "names": list(names)}, {"name": "extent", "names": ["small", "large"]}]}
    (folder / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / "data.yaml"


def smoke_settings(work: Path, **overrides: Any) -> list[ChainSettings]:
    """The detector chain on the sample and the two-head classifier chain, at tiny sizes."""
    tiny = dict(work=work / "detect", data=str(SAMPLE), cfg="yolov5n.yaml", base_epochs=1, epochs=1, imgsz=64,
                batch_size=8, workers=0, max_batches=1, device="cpu", sparse=1e-3, max_iter=2, delta=0.05,
                calib_images=4, threads=1, runs=1)
    tiny.update(overrides)
    classifier = dict(tiny, work=work / "classify", cfg="yolov5n-mcls-s.yaml",
                      data=str(two_head_sample(work / "two-head-data")))
    return [ChainSettings(**tiny), ChainSettings(**classifier)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ChainSettings(data="", work=Path())
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "neu-det" / "neu-det.yaml"))
    parser.add_argument("--weights", default="", help="trained unpruned checkpoint ('' = train --cfg first)")
    parser.add_argument("--cfg", default=default.cfg, help="model YAML when --weights is not given")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compress", help="run folder (resumed)")
    parser.add_argument("--base-epochs", type=int, default=default.base_epochs, help="training of --cfg")
    parser.add_argument("--epochs", type=int, default=default.epochs, help="epochs of the sparse and kd fine-tunes")
    parser.add_argument("--qat-epochs", type=int, default=default.qat_epochs, help="epochs of the QAT fine-tune")
    parser.add_argument("--imgsz", type=int, default=default.imgsz, help="train, val, export and latency size")
    parser.add_argument("--latency-imgsz", type=int, default=default.latency_imgsz,
                        help="time at this size instead (exported rows are exported again at it)")
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--workers", type=int, default=default.workers)
    parser.add_argument("--device", default="", help="training device (train.py --device)")
    parser.add_argument("--ratio", type=float, default=default.ratio,
                        help="FLOPs kept by every pruning method (with --speedup: the sparse stage's aim only)")
    parser.add_argument("--speedup", type=float, default=default.speedup,
                        help="prune to this batch-1 speed-up on --runtime at the latency size instead of --ratio")
    parser.add_argument("--runtime", default=default.runtime,
                        help="runtime of --speedup: onnxruntime, openvino, openvino-bf16 or openvino-int8")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="pruning methods (slim eagleeye peer)")
    parser.add_argument("--sparse", type=float, default=default.sparse, help="train.py --sparse before slim")
    parser.add_argument("--sparse-weights", default="",
                        help="slim's parent trained sparse from the start (train.py --sparse S --sparse-remain R, "
                        "as many epochs as --weights), instead of the sparse fine-tune")
    parser.add_argument("--max-iter", type=int, default=default.max_iter, help="EagleEye candidates")
    parser.add_argument("--delta", type=float, default=default.delta,
                        help="EagleEye's and the peer's band around the budget (a share of it)")
    parser.add_argument("--calib-images", type=int, default=default.calib_images, help="INT8 calibration images")
    parser.add_argument("--threads", type=int, default=default.threads, help="runtime threads when timing")
    parser.add_argument("--runs", type=int, default=default.runs, help="interleaved latency rounds")
    parser.add_argument("--seed", type=int, default=default.seed,
                        help="train.py --seed of every training stage (run another seed in another --work)")
    parser.add_argument("--smoke", action="store_true", help="the whole chain on the sample + a two-head classifier")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.smoke:
        chains = smoke_settings(args.work, methods=tuple(args.methods))
    else:
        fields = {f.name for f in dataclasses.fields(ChainSettings)}
        values = {k: v for k, v in vars(args).items() if k in fields}
        chains = [ChainSettings(**{**values, "methods": tuple(args.methods)})]
    for settings in chains:
        check_settings(settings)
    torch.set_num_threads(chains[0].threads)  # PyTorch rows time with the runtimes' thread count
    for settings in chains:
        run_chain(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

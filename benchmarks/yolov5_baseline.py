"""Same-machine baselines for the speed targets of issue 4: YOLOv5 v7.0's own train.py and val.py.

    python benchmarks/yolov5_baseline.py --yolov5-python /path/to/venv-with-yolov5/bin/python --epochs 3
    python benchmarks/yolov5_baseline.py --yolov5-python /path/to/venv-with-yolov5/bin/python --task val
    python benchmarks/yolov5_baseline.py --yolov5-python /path/to/venv-with-yolov5/bin/python --task schedule
    python benchmarks/yolov5_baseline.py --yolov5-python /path/to/venv-with-yolov5/bin/python --task swap-data
    python benchmarks/yolov5_baseline.py --yolov5-python /path/to/venv-with-yolov5/bin/python --task samples

Runs ``python -m yolov5.train`` / ``yolov5.val`` from PyPI ``yolov5==7.0.*`` (installed in a separate
environment: it pins old packages), offline. train: yolov5n.yaml from scratch, hyp.scratch-low, img 256,
batch 32, workers 2, seed 0, ``--noplots``; prints the training images/s per epoch parsed from its progress
bars, to compare with benchmarks/train_speed.py run in the same hour. val: the fixture checkpoint at img 256,
batch 32; prints the wall time of the whole command (what ``time python val.py ...`` shows), to compare with
ours in the same hour. The package imports roboflow and huggingface_hub and downloads a font, none of which
these runs use, so a temporary folder provides inert stand-ins, a local font and ``np.trapz`` (gone in NumPy
2.4); torch >= 2.6 needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` to unpickle v7.0's checkpoints.
The other tasks run an investigation probe from benchmarks/probes/ there (each needs this repository's requirements
importable in that environment too; their findings are in docs/training.md). schedule:
benchmarks/probes/yolov5_schedule_probe.py (learning rate, momentum and optimizer steps of every iteration, ours
against v7.0's objects and loop). swap-data / swap-loop: benchmarks/probes/yolov5_swap.py, 30 epochs by default
(our trainer on v7.0's training data set / v7.0's train.py on ours), printing the final metrics. samples:
benchmarks/probes/yolov5_sample_probe.py (v7.0's training samples against ours with v7.0's random draws replayed
into our loader; a minute).

The environment: a venv that sees this repository's venv (torch and the other shared packages come from there,
nothing large is downloaded), plus the package itself without its pinned dependencies, the one module it imports
from ultralytics, and the three libraries it needs that this repository does not (roboflow and huggingface_hub
are stood in for at run time, see above):

    python3.11 -m venv /work/v7venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /work/v7venv/lib/python3.11/site-packages/yolokit-venv.pth
    /work/v7venv/bin/pip install --no-deps yolov5==7.0.14 ultralytics==8.4.190
    /work/v7venv/bin/pip install pandas seaborn gitpython
    python benchmarks/yolov5_baseline.py --yolov5-python /work/v7venv/bin/python --epochs 1 \
        --data data/neu-det-sample.yaml   # a check: 1 epoch on the embedded sample
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "neu-det" / "neu-det.yaml"
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "fixtures" / "yolov5n-neu-det-v7.pt"

STUBS = {
    "roboflow/__init__.py": "class Roboflow:\n    pass\n",
    "roboflow/core/__init__.py": "",
    "roboflow/core/version.py": "class Version:\n    pass\n",
    "huggingface_hub/utils/__init__.py": "",
    "huggingface_hub/utils/_errors.py": "class RepositoryNotFoundError(Exception):\n    pass\n",
    "huggingface_hub/utils/_validators.py": "class HFValidationError(Exception):\n    pass\n",
    "huggingface_hub/__init__.py": (
        "from huggingface_hub.utils._validators import HFValidationError\n\n\n"
        "def list_repo_files(*args, **kwargs):\n    raise HFValidationError('offline')\n\n\n"
        "def hf_hub_download(*args, **kwargs):\n    raise HFValidationError('offline')\n"),
    "sitecustomize.py": "import numpy\n\nif not hasattr(numpy, 'trapz'):\n    numpy.trapz = numpy.trapezoid\n",
}
# "  2/29   0G  0.09  0.03  0.05  140  256: 100%|##########| 45/45 [01:02<00:00, ..." (a finished training bar)
TRAIN_BAR = re.compile(r"^\s*(\d+)/\d+\s.*\|\s*(\d+)/(\d+) \[(\d+):(\d+)<")


def mirror_dataset(root: Path, mirror: Path) -> Path:
    """The data-set tree re-created in ``mirror``: real folders, each file a symbolic link to the original.

    v7.0 writes its label caches beside the label folders (``labels/train.cache``) after resolving the folder
    paths, so the folders must be real; in the mirror the caches land in the temporary folder and the data set
    stays untouched (``../shared`` is read-only by convention).
    """
    root = root.resolve()
    for folder, _, files in os.walk(root):
        target = mirror / Path(folder).relative_to(root)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if not name.endswith(".cache"):
                (target / name).symlink_to(Path(folder) / name)
    return mirror


def prepare_offline_env(folder: Path, data: Path) -> tuple[dict[str, str], Path]:
    """Stand-in modules, a font in a private config dir, and a data YAML whose ``path`` is a mirror of the data."""
    import matplotlib

    for name, text in STUBS.items():
        (folder / "stubs" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "stubs" / name).write_text(text)
    config_dir = folder / "config"
    config_dir.mkdir()
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copy(font, config_dir / name)
    config = yaml.safe_load(data.read_text())
    config["path"] = str(mirror_dataset(data.parent / config.get("path", "."), folder / "data"))
    data_abs = folder / "data.yaml"
    data_abs.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(folder / "stubs"), "YOLOV5_CONFIG_DIR": str(config_dir),
           "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    return env, data_abs


def training_seconds_per_epoch(log: str) -> dict[int, float]:
    """Duration of each epoch's finished training bar (tqdm prints mm:ss elapsed)."""
    seconds: dict[int, float] = {}
    for line in re.split(r"[\r\n]", log):
        match = TRAIN_BAR.match(line)
        if match and match.group(2) == match.group(3):
            seconds[int(match.group(1))] = int(match.group(4)) * 60 + int(match.group(5))
    return seconds


def count_train_images(data: Path) -> int:
    import sys

    sys.path.insert(0, str(ROOT))
    from utils.data import load_data_config
    from utils.data.scan import list_image_files

    return len(list_image_files(load_data_config(data)["train"]))


def run_train(python: str, package: Path, folder: Path, env: dict[str, str], data: Path, epochs: int,
              original_data: Path, seed: int = 0) -> None:
    cmd = [python, "-m", "yolov5.train", "--cfg", str(package / "models" / "yolov5n.yaml"),
           "--weights", "", "--data", str(data), "--hyp", str(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"),
           "--img", "256", "--batch", "32", "--workers", "2", "--epochs", str(epochs), "--device", "cpu",
           "--seed", str(seed), "--noplots", "--project", str(folder / "runs")]
    print("running:", " ".join(cmd), flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    log = run.stdout + run.stderr
    seconds = training_seconds_per_epoch(log)
    if len(seconds) < epochs:  # v7.0 may still fail afterwards (torch>=2.6 weights_only in strip_optimizer)
        print(log[-3000:])
        raise SystemExit(f"YOLOv5 train.py finished {len(seconds)} of {epochs} epochs (exit code {run.returncode})")
    n_train = count_train_images(original_data)
    for epoch, s in sorted(seconds.items()):
        print(f"epoch {epoch}: training loop {s:.0f} s, {n_train / s:.1f} images/s")
    median = sorted(seconds.values())[len(seconds) // 2]
    print(f"| YOLOv5 v7.0 train.py | training images/s (median epoch) {n_train / median:.1f} |")
    summary = [line for line in re.split(r"[\r\n]", log) if line.strip().startswith("all ")]
    if summary:  # the last one is its final validation of best.pt: Images Instances P R mAP50 mAP50-95
        print(f"| YOLOv5 v7.0 train.py | final {' '.join(summary[-1].split())} |")


def run_val(python: str, folder: Path, env: dict[str, str], data: Path, weights: Path, repeats: int) -> None:
    cmd = [python, "-m", "yolov5.val", "--weights", str(weights), "--data", str(data), "--img", "256",
           "--batch", "32", "--device", "cpu", "--project", str(folder / "val")]
    print("running:", " ".join(cmd), flush=True)
    for _ in range(repeats):
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
        wall = time.perf_counter() - start
        summary = [line for line in (run.stdout + run.stderr).splitlines() if line.strip().startswith("all ")]
        if run.returncode or not summary:
            print((run.stdout + run.stderr)[-3000:])
            raise SystemExit(f"YOLOv5 val.py failed (exit code {run.returncode})")
        print(f"| YOLOv5 v7.0 val.py | {wall:.1f} s wall | {' '.join(summary[-1].split())} |")


def run_probe(python: str, folder: Path, env: dict[str, str], script: str, args: list[str],
              keep: tuple[str, ...] = ("|",)) -> int:
    """benchmarks/probes/``script`` in v7.0's environment (it needs this repository's requirements there too); prints
    the output lines that start with ``keep`` and, when it fails, the end of its standard error."""
    cmd = [python, str(ROOT / "benchmarks" / "probes" / script), *args]
    print("running:", " ".join(cmd), flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    print("\n".join(line for line in run.stdout.splitlines() if line.startswith(keep)))
    if run.returncode:
        print(run.stderr[-3000:])
    return run.returncode


def run_swap(python: str, folder: Path, env: dict[str, str], data: Path, half: str, epochs: int, seed: int) -> int:
    """benchmarks/probes/yolov5_swap.py in v7.0's environment; its output streams through (30 epochs take ~30 min)."""
    cmd = [python, str(ROOT / "benchmarks" / "probes" / "yolov5_swap.py"), "--half", half, "--data", str(data),
           "--epochs", str(epochs), "--seed", str(seed), "--project", str(folder / "swap")]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=folder).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yolov5-python", required=True, help="a python whose environment has yolov5==7.0.*")
    parser.add_argument("--task", default="train",
                        choices=["train", "val", "schedule", "swap-data", "swap-loop", "samples"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint for --task val")
    parser.add_argument("--epochs", type=int, help="default: 3 for train, 30 (the recipe) for schedule and swap")
    parser.add_argument("--seed", type=int, default=0,
                        help="train and swap: the training seed (the recipe: 0); samples: v7.0's draws")
    parser.add_argument("--repeats", type=int, default=3, help="val.py runs (--task val)")
    args = parser.parse_args()
    spec = "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('yolov5').origin).parent)"
    package = Path(subprocess.run([args.yolov5_python, "-c", spec], capture_output=True, text=True,
                                  check=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env, data = prepare_offline_env(folder, args.data)
        if args.task == "train":
            run_train(args.yolov5_python, package, folder, env, data, args.epochs or 3, args.data, args.seed)
        elif args.task == "val":
            run_val(args.yolov5_python, folder, env, data, args.weights.resolve(), args.repeats)
        elif args.task == "schedule":
            # exit code 1: some iteration differs
            return run_probe(args.yolov5_python, folder, env, "yolov5_schedule_probe.py",
                             ["--epochs", str(args.epochs or 30), "--workdir", str(folder / "probe")],
                             keep=("|", "  iteration"))
        elif args.task == "samples":
            return run_probe(args.yolov5_python, folder, env, "yolov5_sample_probe.py",
                             ["--data", str(data), "--seed", str(args.seed)])
        else:
            half = args.task.removeprefix("swap-")
            return run_swap(args.yolov5_python, folder, env, data, half, args.epochs or 30, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

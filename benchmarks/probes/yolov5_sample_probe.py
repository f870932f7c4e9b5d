"""Training samples, pixel by pixel: our DetectionDataset against YOLOv5 v7.0's LoadImagesAndLabels.

Run by ``python benchmarks/yolov5_baseline.py --yolov5-python PY --task samples`` inside the environment that has
PyPI ``yolov5==7.0.*``. v7.0 draws its augmentation from Python's ``random`` and ``np.random``, we from a NumPy
Generator, so the same seed gives different mosaics. Here every random value v7.0 draws for a sample is recorded
and replayed into our data set in its place (same mosaic partners, centre, scale, translation, HSV gains, flips),
so the two samples must agree exactly. Statistics over many samples (benchmarks/probes/augment_stats.py) cannot see a
half-pixel label offset or a change at a few pixels; this can.

Checked for each sample: the label rows (class, normalised x y w h) and the RGB tensor. Printed per mode of our
loader: ``v7-ops`` (``fast_ops = False``: colour decode, v7.0's 2s canvas + ``cv2.warpAffine``) and ``fast`` (the
default: grey images in one channel, tiles warped straight into the output by ``augment.warp_tiles``).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from utils.data import load_data_config  # noqa: E402
from utils.data.detect import DetectionDataset  # noqa: E402

HYP = ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"


class DrawRecorder:
    """Wraps the ``random`` and ``np.random`` functions v7.0's loader calls and queues what they return."""

    NAMES = ("uniform", "random", "choices", "shuffle")

    def __init__(self) -> None:
        self.queues: dict[str, deque] = defaultdict(deque)
        self._originals = {name: getattr(random, name) for name in self.NAMES}
        self._np_uniform = np.random.uniform

    def _wrap(self, name: str, func):
        def recorded(*args, **kwargs):
            out = func(*args, **kwargs)
            self.queues[name].append(list(args[0]) if name == "shuffle" else out)  # shuffle works in place
            return out
        return recorded

    def __enter__(self) -> DrawRecorder:
        for name, func in self._originals.items():
            setattr(random, name, self._wrap(name, func))
        np.random.uniform = self._wrap("np_uniform", self._np_uniform)
        return self

    def __exit__(self, *exc) -> None:
        for name, func in self._originals.items():
            setattr(random, name, func)
        np.random.uniform = self._np_uniform

    def left_over(self) -> dict[str, int]:
        return {name: len(q) for name, q in self.queues.items() if q}


class ReplayGenerator:
    """Stands in for our data set's ``np.random.Generator``, answering each call with v7.0's recorded draw.

    The calls map one to one: ``random()`` <- ``random.random`` (mosaic, mixup, flips), ``choice`` <-
    ``random.choices`` (mosaic partners), ``permutation`` <- the list after ``random.shuffle``, scalar and pair
    ``uniform`` <- ``random.uniform`` (centre, affine), ``uniform(size=3)`` <- ``np.random.uniform`` (HSV gains).
    """

    def __init__(self, recorder: DrawRecorder) -> None:
        self.q = recorder.queues

    def random(self) -> float:
        return self.q["random"].popleft()

    def choice(self, a, size):
        return np.array(self.q["choices"].popleft())

    def permutation(self, a):
        return np.array(self.q["shuffle"].popleft())

    def uniform(self, low=0.0, high=1.0, size=None):
        if size == 3:
            return self.q["np_uniform"].popleft()
        if size is None:
            return self.q["uniform"].popleft()
        return np.array([self.q["uniform"].popleft() for _ in range(size)])


def compare(v7_set, ours: DetectionDataset, indices: list[int], seed: int) -> dict[str, float]:
    """Draw each sample from v7.0, replay its draws into ours, and summarise the differences."""
    random.seed(seed)
    np.random.seed(seed)
    differing, beyond_one, signed, worst, label_err, count_mismatch = [], [], [], 0, 0.0, 0
    with DrawRecorder() as recorder:
        ours.rng = ReplayGenerator(recorder)
        for i in indices:
            img_a, lab_a, _, _ = v7_set[i]
            img_b, lab_b, _, _ = ours[i]
            if recorder.left_over():
                raise RuntimeError(f"sample {i}: draws not consumed by our loader: {recorder.left_over()}")
            d = img_a.numpy().astype(np.int16) - img_b.numpy().astype(np.int16)
            differing.append(np.count_nonzero(d) / d.size)
            beyond_one.append(np.count_nonzero(np.abs(d) > 1) / d.size)
            signed.append(float(d.mean()))
            worst = max(worst, int(np.abs(d).max()))
            if len(lab_a) != len(lab_b):
                count_mismatch += 1
            elif len(lab_a):
                label_err = max(label_err, float((lab_a[:, 1:] - lab_b[:, 1:]).abs().max()))
    return {"pixels differing": float(np.mean(differing)), "pixels off by > 1": float(np.mean(beyond_one)),
            "mean v7 - ours": float(np.mean(signed)), "largest pixel difference": worst,
            "label-count mismatches": count_mismatch, "largest label difference": label_err}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="data-set YAML with an absolute path (a writable mirror)")
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from yolov5.utils.dataloaders import LoadImagesAndLabels  # after parsing: --help works without yolov5

    train = load_data_config(args.data)["train"]
    hyp = yaml.safe_load(HYP.read_text())
    v7_set = LoadImagesAndLabels(train, args.imgsz, 32, augment=True, hyp=hyp, stride=32)
    ours = DetectionDataset(train, args.imgsz, 32, augment=True, hyp=hyp, stride=32)
    same_files = [Path(f).name for f in v7_set.im_files] == [Path(f).name for f in ours.im_files]
    same_labels = all(np.array_equal(a, b) for a, b in zip(v7_set.labels, ours.labels))
    print(f"| images | {len(v7_set.im_files)} v7.0, {ours.n} ours, same order: {same_files} |")
    print(f"| label rows | {sum(map(len, v7_set.labels))} v7.0, {sum(map(len, ours.labels))} ours, "
          f"identical: {same_labels} |")
    if not (same_files and same_labels):
        return 1
    indices = [int(i) for i in np.random.default_rng(args.seed).choice(ours.n, args.samples, replace=False)]
    for mode, fast in (("v7-ops", False), ("fast", True)):
        ours.fast_ops = fast
        result = compare(v7_set, ours, indices, args.seed)
        print(f"| {mode} | " + " | ".join(f"{k} {v:.4g}" for k, v in result.items()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

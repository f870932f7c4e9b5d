"""Augmentation statistics over many training samples: ours against YOLOv5 v7.0's own loader.

    python benchmarks/probes/augment_stats.py --yolov5-python /path/to/venv-with-yolov5/bin/python --samples 7200

Both data sets draw ``--samples`` training samples (mosaic, affine, HSV, flips with the default hyp) from the
same images; each side records per sample the number of boxes, the image's mean and standard deviation and the
share of grey padding, and per box its class, centre and size. The two samples are compared per quantity
(means with standard errors, quantiles, two-sample Kolmogorov-Smirnov p-value). Single samples cannot be
compared (the two loaders draw different random numbers); the distributions can, and a difference in any of
them is a difference in what the network is trained on. v7.0 runs from PyPI ``yolov5==7.0.*`` in a separate
environment (as in benchmarks/dataloader.py).
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from utils.train.config import DEFAULT_HYP  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "neu-det" / "neu-det.yaml"

PER_SAMPLE = ("boxes", "mean", "std", "grey_pad")
PER_BOX = ("cls", "cx", "cy", "w", "h", "area", "aspect")



def sample_stats(dataset, n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample and per-box arrays for ``n_samples`` draws of ``dataset[i]``, i in a seeded shuffled order.

    Self-contained (NumPy only): its source is also run in v7.0's environment.
    """
    import numpy as np

    order = np.random.default_rng(seed).permutation(np.arange(n_samples) % len(dataset))
    samples, boxes = [], []
    for i in order:
        img, labels = dataset[int(i)][:2]
        img, labels = img.numpy(), labels.numpy()
        grey_pad = float((img == 114).all(0).mean())
        samples.append((len(labels), float(img.mean()), float(img.std()), grey_pad))
        if len(labels):
            cls, cx, cy, w, h = labels[:, 1:6].T
            boxes.append(np.stack((cls, cx, cy, w, h, w * h, np.maximum(w / h, h / w)), 1))
    return np.array(samples, np.float64), np.concatenate(boxes, 0)


YOLOV5_SNIPPET = """
import random, numpy as np, torch, yaml
from yolov5.utils.dataloaders import LoadImagesAndLabels
{stats_code}
random.seed({seed}); np.random.seed({seed}); torch.manual_seed({seed})
hyp = yaml.safe_load(open({hyp!r}))
dataset = LoadImagesAndLabels({train!r}, {imgsz}, 32, augment=True, hyp=hyp, rect=False, stride=32)
samples, boxes = sample_stats(dataset, {n_samples}, {seed})
np.savez({out!r}, samples=samples, boxes=boxes)
"""


def ours(data: str, hyp: str, imgsz: int, n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from utils.data import load_data_config
    from utils.data.detect import DetectionDataset
    from utils.train.config import load_hyp

    config = load_data_config(data)
    dataset = DetectionDataset(config["train"], imgsz, 32, augment=True, hyp=load_hyp(hyp), seed=seed)
    return sample_stats(dataset, n_samples, seed)


def linked_split(images: Path, folder: Path) -> Path:
    """``folder``/images/<split> and ``folder``/labels/<split> as links to the real ones, so that v7.0 writes its
    label cache (next to the labels folder) into ``folder`` instead of the data set."""
    labels = Path(str(images).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"))
    for kind, target in (("images", images), ("labels", labels)):
        (folder / kind).mkdir()
        (folder / kind / images.name).symlink_to(target, target_is_directory=True)
    return folder / "images" / images.name


def yolov5(python: str, data: str, hyp: str, imgsz: int, n_samples: int,
           seed: int) -> tuple[np.ndarray, np.ndarray]:
    from utils.data import load_data_config

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "stats.npz")
        train = linked_split(Path(load_data_config(data)["train"]).resolve(), Path(tmp))
        code = YOLOV5_SNIPPET.format(stats_code=inspect.getsource(sample_stats), seed=seed, hyp=hyp, train=str(train),
                                     imgsz=imgsz, n_samples=n_samples, out=out)
        subprocess.run([python, "-c", code], check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        arrays = np.load(out)
        return arrays["samples"], arrays["boxes"]


def compare(name: str, a: np.ndarray, b: np.ndarray) -> str:
    from scipy.stats import ks_2samp

    def mean_se(x: np.ndarray) -> str:
        return f"{x.mean():9.4f} +- {x.std(ddof=1) / np.sqrt(len(x)):7.4f}"

    qa, qb = (np.quantile(x, (0.1, 0.5, 0.9)) for x in (a, b))
    quantiles = " ".join(f"{x:7.3f}/{y:<7.3f}" for x, y in zip(qa, qb))
    return f"{name:>9} {mean_se(a)} {mean_se(b)}   {quantiles} {ks_2samp(a, b).pvalue:8.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--hyp", default=str(DEFAULT_HYP), help="hyperparameter YAML (augmentation keys)")
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--samples", type=int, default=7200, help="training samples drawn on each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--yolov5-python", metavar="PYTHON", required=True,
                        help="a python whose environment has PyPI yolov5==7.0.*")
    args = parser.parse_args()
    ours_samples, ours_boxes = ours(args.data, args.hyp, args.imgsz, args.samples, args.seed)
    v7_samples, v7_boxes = yolov5(args.yolov5_python, args.data, args.hyp, args.imgsz, args.samples, args.seed)
    print(f"{args.samples} samples each; ours {len(ours_boxes)} boxes, v7.0 {len(v7_boxes)} boxes")
    print(f"{'':>9} {'ours mean +- s.e.':>20} {'v7.0 mean +- s.e.':>20}   "
          f"{'q10 ours/v7':>15} {'q50 ours/v7':>15} {'q90 ours/v7':>15} {'KS p':>8}")
    for column, name in enumerate(PER_SAMPLE):
        print(compare(name, ours_samples[:, column], v7_samples[:, column]))
    for column, name in enumerate(PER_BOX):
        print(compare(name, ours_boxes[:, column], v7_boxes[:, column]))
    nc = int(max(ours_boxes[:, 0].max(), v7_boxes[:, 0].max())) + 1
    counts = [np.bincount(b[:, 0].astype(int), minlength=nc) for b in (ours_boxes, v7_boxes)]
    print("boxes per class, ours:", counts[0].tolist(), " v7.0:", counts[1].tolist())


if __name__ == "__main__":
    main()

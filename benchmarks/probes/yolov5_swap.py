"""Swap halves with YOLOv5 v7.0 to find which half of training carries an accuracy difference.

Run by ``python benchmarks/yolov5_baseline.py --yolov5-python PY --task swap-data|swap-loop`` inside the environment
that has PyPI ``yolov5==7.0.*`` (and this repository's requirements):

- ``--half data``: our ``Trainer`` (model, loss, optimizer, EMA, validation) fed by v7.0's own
  ``LoadImagesAndLabels`` for the training split; the validation split stays ours (it is exact).
- ``--half loop``: v7.0's own ``train.py`` (its model, loss, optimizer, EMA, validation) fed by our
  ``DetectionDataset`` for the training split, through our ``create_dataloader``.

Both train the recipe of issue 4 (yolov5n.yaml from scratch, hyp.scratch-low, img 256, batch 32, workers 2).
Compare the final mAP with ``benchmarks/train_speed.py`` (ours on ours) and ``yolov5_baseline.py --task train``
(v7.0 on v7.0) at the same seeds: 30-epoch training from scratch varies by about +-0.01 mAP@.5:.95 between
seeds, so one run per cell proves little.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# before yolov5 is imported: it puts its own folder (with a benchmarks.py) on sys.path
from benchmarks import train_speed  # noqa: E402
from utils.tasks.detect import DetectTask  # noqa: E402

HYP = ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"


class DetectTaskOnV7Data(DetectTask):
    """Our detection task whose training loader is v7.0's LoadImagesAndLabels (same batch format)."""

    def build_train_loader(self):
        import torch
        from torch.utils.data import DataLoader
        from yolov5.utils.dataloaders import LoadImagesAndLabels

        from utils.data.workers import init_worker

        opts = self.options
        dataset = LoadImagesAndLabels(self.data["train"], self.imgsz, opts.batch_size, augment=True, hyp=self.hyp,
                                      rect=False, stride=self.stride, prefix="v7.0 train: ")
        generator = torch.Generator()
        generator.manual_seed(opts.seed)
        loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=True, num_workers=opts.workers,
                            collate_fn=LoadImagesAndLabels.collate_fn, worker_init_fn=init_worker, generator=generator)
        return loader, dataset


def train_ours_on_v7_data(data: str, epochs: int, seed: int, project: str) -> int:
    """benchmarks/train_speed.py with DetectTaskOnV7Data in place of DetectTask (prints the same table)."""
    argv = ["--data", data, "--epochs", str(epochs), "--seed", str(seed), "--project", project]
    return train_speed.main(argv, task_class=DetectTaskOnV7Data)


def train_v7_on_our_data(data: str, epochs: int, seed: int, project: str) -> int:
    """v7.0's train.run with its ``create_dataloader`` answering training requests with ours."""
    import yolov5
    import yolov5.train as v7_train

    from utils.data import create_dataloader

    v7_create = v7_train.create_dataloader

    def training_from_ours(path, imgsz, batch_size, stride, single_cls=False, hyp=None, augment=False, **kw):
        if not augment:  # v7.0's validation loader
            return v7_create(path, imgsz, batch_size, stride, single_cls, hyp=hyp, augment=augment, **kw)
        return create_dataloader(path, imgsz, batch_size, stride, hyp=hyp, augment=True, shuffle=True,
                                 workers=kw.get("workers", 8), seed=kw.get("seed", 0), single_cls=single_cls,
                                 prefix="ours train: ")

    v7_train.create_dataloader = training_from_ours
    models = Path(yolov5.__file__).parent / "models"
    v7_train.run(cfg=str(models / "yolov5n.yaml"), weights="", data=data, hyp=str(HYP), imgsz=256, batch_size=32,
                 workers=2, epochs=epochs, device="cpu", seed=seed, noplots=True, project=project, name="swap")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", choices=["data", "loop"], required=True,
                        help="data: our trainer on v7.0's data set; loop: v7.0's train.py on our data set")
    parser.add_argument("--data", required=True, help="data-set YAML with an absolute path")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--project", required=True)
    args = parser.parse_args()
    run = train_ours_on_v7_data if args.half == "data" else train_v7_on_our_data
    return run(args.data, args.epochs, args.seed, args.project)


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a YOLOv5-family detector or classifier.

    python train.py                               # yolov5n.yaml from scratch on the embedded NEU-DET sample
    python train.py --cfg yolov5n.yaml --data data/neu-det-sample.yaml --imgsz 256 --epochs 3 --device cpu
    python train.py ... --fp32                    # opt out of mixed precision (alias --no-amp)
    python train.py --resume                      # continue the most recent run from its last.pt
    python train.py --cfg models/cls/yolov5n-mcls-s.yaml --data ../shared/datasets/fashion-color-type/...

The task (detection or classification) is read from the model's last layer. Mixed precision is the default where
the device computes it natively (bfloat16 autocast on CPUs with AVX512-BF16 or AMX, float16 AMP on CUDA); the
run's first lines say which precision it chose and why (utils/train/precision.py).
"""

from __future__ import annotations

from utils.common.cli import run_cli
from utils.runners.train import run_train
from utils.train.config import TrainConfig, parse_train_args


def main(argv: list[str] | None = None) -> int:
    cfg: TrainConfig = parse_train_args(argv)
    run_train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""Gradient precision and step time of the CPU training layouts, against a float64 reference.

    python benchmarks/probes/grad_precision.py                      # yolov5n, batch 32 x 256 px, embedded sample
    python benchmarks/probes/grad_precision.py --imgsz 640 --batch-size 16 --layouts trainer channels-last
    python benchmarks/probes/grad_precision.py --weights ../shared/fixtures/yolov5n-neu-det-v7.pt --layouts trainer bf16

One training batch (mosaics from the data set's train split), one freshly initialised model (or a checkpoint's
trained weights, ``--weights``); for each layout
the loss and all parameter gradients are computed in float32 and compared, as one vector, with the same
computation in float64 (NCHW). Layouts: ``nchw``; ``channels-last`` (the whole model); ``trainer`` (what the
trainer uses: :func:`utils.common.torch_utils.training_memory_format`); ``compiled`` (what the trainer uses with
``--compile``: channels-last + torch.compile); ``bf16`` (what the trainer uses with ``--bf16``: channels-last,
bfloat16 autocast, loss in float32).
The step time is the median of ``--repeats`` forward+backward passes (run this alone: the VM's speed drifts).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.yolo import build_model  # noqa: E402
from utils.common.torch_utils import float_outputs, training_memory_format  # noqa: E402
from utils.data import create_dataloader, load_data_config  # noqa: E402
from utils.train.config import DEFAULT_HYP, load_hyp  # noqa: E402
from utils.train.loss import ComputeLoss, scale_loss_gains  # noqa: E402
from utils.weights.checkpoint import load_checkpoint  # noqa: E402

LAYOUTS = ("nchw", "channels-last", "trainer", "compiled", "bf16")


def loss_function(model: torch.nn.Module, hyp: dict, imgsz: int) -> ComputeLoss:
    head = model.model[-1]
    return ComputeLoss(model, scale_loss_gains(hyp, head.nc, head.nl, imgsz))


def step(model: torch.nn.Module, forward, loss_fn, images: torch.Tensor, targets: torch.Tensor,
         ) -> tuple[torch.Tensor, float]:
    """(all parameter gradients of one forward+backward as one float64 vector, its seconds)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, _ = loss_fn(forward(images), targets)
    loss.backward()
    seconds = time.perf_counter() - start
    return torch.cat([p.grad.double().flatten() for p in model.parameters()]), seconds


def layout_model(model: torch.nn.Module, layout: str, imgsz: int, batch_size: int):
    """(copy of the model in ``layout``, its forward callable, the input layout)."""
    model = copy.deepcopy(model)
    if layout == "nchw":
        return model, model, torch.contiguous_format
    if layout == "channels-last":
        return model.to(memory_format=torch.channels_last), model, torch.channels_last
    memory_format = training_memory_format(model, imgsz, batch_size, throughout=layout in ("compiled", "bf16"))
    if layout == "compiled":
        return model, torch.compile(model), memory_format
    if layout == "bf16":
        def autocast_forward(images: torch.Tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return float_outputs(model(images))

        return model, autocast_forward, memory_format
    return model, model, memory_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov5n.yaml")
    parser.add_argument("--data", default=str(ROOT / "data" / "neu-det-sample.yaml"))
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS[:3]), choices=LAYOUTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", default=None, help="start from this checkpoint's weights (its cfg and nc)")
    args = parser.parse_args()
    torch.manual_seed(0)
    hyp = load_hyp(DEFAULT_HYP)
    data = load_data_config(args.data)
    loader, _ = create_dataloader(data["train"], args.imgsz, args.batch_size, 32, hyp=hyp, augment=True, seed=0)
    images, targets = next(iter(loader))[:2]
    images = images.float() / 255
    if args.weights:  # loaded for inference: switch gradients back on
        model = load_checkpoint(args.weights).model.train().requires_grad_(True)
    else:
        model = build_model(args.cfg, nc=int(data["nc"])).train()
    reference_model = copy.deepcopy(model).double()
    reference, _ = step(reference_model, reference_model, loss_function(reference_model, hyp, args.imgsz),
                        images.double(), targets.double())
    runs = {}
    for layout in args.layouts:
        copy_, forward, memory_format = layout_model(model, layout, args.imgsz, images.shape[0])
        runs[layout] = (copy_, forward, loss_function(copy_, hyp, args.imgsz),
                        images.contiguous(memory_format=memory_format), targets)
        if layout == "compiled":
            step(*runs[layout])  # compiles
    errors, seconds = {}, {layout: [] for layout in runs}
    for _ in range(args.repeats):  # layouts interleaved, so that a drifting VM speed affects all alike
        for layout, run in runs.items():
            grads, elapsed = step(*run)
            errors[layout] = ((grads - reference).norm() / reference.norm()).item()
            seconds[layout].append(elapsed)
    print(f"{args.weights or args.cfg}, batch {images.shape[0]} x {args.imgsz} px, {torch.get_num_threads()} threads; "
          "gradient error = |g - g_float64| / |g_float64| over all parameters "
          f"{'at these weights' if args.weights else 'at initialisation'}")
    for layout in runs:
        print(f"{layout:>14}: gradient error {errors[layout]:.1e}, step {statistics.median(seconds[layout]):.3f} s "
              f"(median of {args.repeats}, layouts interleaved)")


if __name__ == "__main__":
    main()

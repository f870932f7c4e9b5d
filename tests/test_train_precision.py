"""Numerical precision of a CPU training step: the trainer's speed-ups must not change the gradients."""

from __future__ import annotations

import copy

import torch

from models.yolo import DetectionModel
from utils.common.torch_utils import set_inplace_activations, training_memory_format
from utils.data import create_dataloader, load_data_config
from utils.train.config import load_hyp
from utils.train.loss import ComputeLoss, scale_loss_gains


def _gradients(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    head = model.model[-1]
    loss, _ = ComputeLoss(model, scale_loss_gains(load_hyp(), head.nc, head.nl, images.shape[-1]))(model(images),
                                                                                                    targets)
    loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


def test_cpu_training_layout_gives_float64_gradients(sample_data_yaml):
    """yolov5n at the recipe's scale (32 mosaics of 256 px, freshly initialised, where rounding is magnified most):
    the trainer's layout and out-of-place SiLU give the gradients of a float64 NCHW step to float32 precision.

    Channels-last everywhere does not (~4e-2 here): ATen's NHWC BatchNorm sums the 524k values per channel of
    the 128 x 128 stem in one float32 total per thread; the trainer keeps such layers NCHW.
    """
    torch.manual_seed(0)
    loader, _ = create_dataloader(load_data_config(sample_data_yaml)["train"], 256, 32, 32, hyp=load_hyp(),
                                  augment=True, seed=0)
    images, targets = next(iter(loader))[:2]
    images = images.float() / 255
    model = DetectionModel("yolov5n.yaml", nc=6).train()
    reference = _gradients(copy.deepcopy(model).double(), images.double(), targets.double())

    memory_format = training_memory_format(model, 256, 32)
    set_inplace_activations(model, False)
    assert not any(m.inplace for m in model.modules() if isinstance(m, torch.nn.SiLU))
    assert memory_format == torch.contiguous_format  # the 128 x 128 stem: 32 x 16384 values per channel
    assert model.model[5].conv.weight.is_contiguous(memory_format=torch.channels_last)  # 8 x 8: channels-last
    gradients = _gradients(model, images.contiguous(memory_format=memory_format), targets)
    assert (gradients - reference).norm() <= 1e-3 * reference.norm()


def test_compiled_training_runs_channels_last_throughout():
    """Under torch.compile Inductor generates its own BatchNorm (exact in any layout), so nothing stays NCHW."""
    model = DetectionModel("yolov5n.yaml", nc=6).train()
    assert training_memory_format(copy.deepcopy(model), 256, 32) == torch.contiguous_format
    assert training_memory_format(model, 256, 32, throughout=True) == torch.channels_last
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))

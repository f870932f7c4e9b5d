"""Small PyTorch helpers: device choice, seeding, Conv+BN fusion, weight init, parameter and GFLOPs counts."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable
from copy import deepcopy

import numpy as np
import torch
from torch import nn

from utils.common.errors import FlagError

LOGGER = logging.getLogger(__name__)


def select_device(device: str | int | torch.device = "") -> torch.device:
    """``''`` -> first CUDA device if any else CPU; ``'cpu'``, ``'0'``, ``'cuda:1'`` as given. Fails clearly."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower().replace("cuda:", "")
    if name in {"", "none"}:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        return torch.device("mps")
    if not all(part.strip().isdigit() for part in name.split(",")):
        raise FlagError(f"--device {device}: expected cpu, mps or CUDA device indices such as 0 or 0,1")
    if not torch.cuda.is_available():
        raise FlagError(f"--device {device} requested but CUDA is not available; use --device cpu")
    index = int(name.split(",")[0])
    if index >= torch.cuda.device_count():
        raise FlagError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(f"cuda:{index}")


def seed_everything(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def time_sync() -> float:
    """Wall time after the current device's queued work has finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()  # else copying from trainable weights would make the fused ones non-leaf tensors with history
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d (with bias) equal to ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).requires_grad_(False).to(conv.weight.device)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(bn.bias + (conv_bias - bn.running_mean) * scale)
    return fused


_INPLACE_ACTIVATIONS = (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)


def initialize_weights(model: nn.Module) -> None:
    """YOLOv5's BatchNorm settings (eps 1e-3, momentum 0.03) and in-place activations."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3
            module.momentum = 0.03
    set_inplace_activations(model, True)


def set_inplace_activations(model: nn.Module, inplace: bool) -> None:
    """Switch every activation's ``inplace`` flag (YOLOv5 turns them all on to save memory).

    For CPU training off is faster (~5 % per step on yolov5n): autograd must keep a copy of an in-place
    SiLU's input for its backward, and that copy costs more than writing the output to a new tensor.
    """
    for module in model.modules():
        if isinstance(module, _INPLACE_ACTIVATIONS):
            module.inplace = inplace


def fastest_memory_format(model: nn.Module) -> torch.memory_format:
    """Put a model in its fastest layout and return the layout its inputs should have.

    On the CPU that is channels-last: oneDNN's NHWC convolutions run a yolov5n batch ~1.3x faster than NCHW on
    2 cores for inference (training: :func:`training_memory_format`). The model is converted in place (values
    unchanged); other devices keep the contiguous layout (not measured there).
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    memory_format = torch.channels_last if on_cpu else torch.contiguous_format
    model.to(memory_format=memory_format)
    return memory_format


# ATen's channels-last BatchNorm on the CPU sums each channel into one float32 total per thread, which drifts
# once a channel holds many values (mean and variance off by ~1e-4 relative at 524k values per channel, a
# yolov5n stem at batch 32 x 256 px); a freshly initialised detector magnifies that into a ~4 % error of its
# gradients. The NCHW kernels sum in short vector blocks (~1e-7). Layers whose BatchNorm would reduce over
# more values per channel than this train in NCHW.
CHANNELS_LAST_BN_MAX_VALUES = 2**16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively here (AVX512-BF16 or AMX); elsewhere it emulates it, slowly."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def float_outputs(outputs):
    """``outputs`` (a tensor, or lists, tuples and dicts of them) with floating tensors in float32: the loss of a
    bfloat16-autocast forward is computed in float32, so that its sums and IoUs keep float32's precision."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: float_outputs(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float_outputs(value) for value in outputs)
    return outputs


def training_memory_format(model: nn.Module, imgsz: int, batch_size: int, throughout: bool = False,
                           ) -> torch.memory_format:
    """Put a model in its training layout and return the layout its input batches should have.

    On the CPU: channels-last (a yolov5n step ~1.35x faster than NCHW), except the top-level layers at high
    resolution, whose BatchNorm would see more than ``CHANNELS_LAST_BN_MAX_VALUES`` values per channel at this
    batch and image size; they stay NCHW, where BatchNorm statistics and gradients are as exact as float32
    allows (see the comment above). ``throughout`` puts the whole model channels-last: under torch.compile
    Inductor generates its own BatchNorm, exact in any layout (a step ~4 % faster than with the NCHW stem,
    0.75 s against 0.78 s, benchmarks/probes/grad_precision.py); under bfloat16 autocast float32 exactness is moot.
    Other devices keep the contiguous layout.
    """
    memory_format = fastest_memory_format(model)
    layers = getattr(model, "model", None)
    if throughout or memory_format != torch.channels_last or not isinstance(layers, nn.Sequential):
        return memory_format
    nchw = [pixels is not None and batch_size * pixels > CHANNELS_LAST_BN_MAX_VALUES
            for pixels in layer_output_pixels(model, imgsz)]
    for layer, keep_nchw in zip(layers, nchw):
        if keep_nchw:
            layer.to(memory_format=torch.contiguous_format)
    return torch.contiguous_format if nchw[0] else torch.channels_last  # a channels-last input would make the stem CL


def layer_output_pixels(model: nn.Module, imgsz: int) -> list[int | None]:
    """Height x width of each top-level layer's output (``model.model[i]``; None where it returns no single
    feature map) for an ``imgsz`` x ``imgsz`` image: one forward pass in eval mode, so no BatchNorm statistic moves.
    """
    pixels: dict[int, int] = {}

    def record(index: int):
        def hook(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                pixels[index] = output.shape[-2] * output.shape[-1]
        return hook

    hooks = [layer.register_forward_hook(record(i)) for i, layer in enumerate(model.model)]
    was_training = model.training
    parameter = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, model_input_channels(model), imgsz, imgsz, device=parameter.device,
                              dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [pixels.get(i) for i in range(len(model.model))]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_input_channels(model: nn.Module) -> int:
    return int(model.yaml.get("ch", 3)) if hasattr(model, "yaml") else 3


def _thop_macs(model: nn.Module, h: int, w: int) -> float:
    import thop

    probe = deepcopy(model).float().cpu().eval()
    image = torch.zeros(1, model_input_channels(model), h, w)
    with torch.no_grad():
        return float(thop.profile(probe, inputs=(image,), verbose=False)[0])


def model_gflops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float | None:
    """GFLOPs (2 x multiply-accumulates, thop's count) at ``imgsz``.

    Counted at the largest stride (min 32) and scaled by area when that is exact: for convolutional models
    every layer's cost grows with the input area. Models with layers that do not (global-pool SE branches,
    window attention) are detected by comparing the count at 1x and 2x the stride, and then profiled at
    ``imgsz`` itself.
    """
    try:
        import thop  # noqa: F401
    except ImportError:  # thop is in requirements; a trimmed install still gets params
        return None
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    stride = max(int(model.stride.max()), 32) if getattr(model, "stride", None) is not None else 32
    small, double = _thop_macs(model, stride, stride), _thop_macs(model, 2 * stride, 2 * stride)
    if abs(double - 4 * small) <= 1e-6 * double:
        return small * 2 / 1e9 * (h / stride) * (w / stride)
    return _thop_macs(model, h, w) * 2 / 1e9


def model_summary(model: nn.Module, imgsz: int | tuple[int, int] = 640, verbose: bool = False) -> dict:
    """Layers, parameters, gradients and GFLOPs, logged the way YOLOv5 prints them and returned as a dict."""
    n_params = count_parameters(model)
    n_grads = count_parameters(model, trainable_only=True)
    n_layers = len(list(model.modules()))
    gflops = model_gflops(model, imgsz)
    if verbose:
        for name, p in model.named_parameters():
            LOGGER.info("%-60s %10d %20s", name, p.numel(), list(p.shape))
    size = imgsz if isinstance(imgsz, int) else "x".join(map(str, imgsz))
    flops_text = f", {gflops:.1f} GFLOPs at {size}" if gflops is not None else ""
    LOGGER.info("summary: %d layers, %d parameters, %d gradients%s", n_layers, n_params, n_grads, flops_text)
    return {"layers": n_layers, "parameters": n_params, "gradients": n_grads, "gflops": gflops}


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], count: int | None = None,
                          device: torch.device | str | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics as a plain average over uint8 image ``batches`` (at most
    ``count``); returns the number of batches used.

    Two uses, one computation: "precise BN" after training epochs (Wu & Johnson, 2021: with YOLOv5's BN momentum
    of 0.03 the running statistics trail the weights by ~30 steps, so the eval-mode network, or a backbone frozen
    in eval mode, sees wrong features) and EagleEye's adaptive BN for pruned candidates (their surviving channels
    see other inputs than the trained statistics describe; a candidate's score after this step predicts its score
    after fine-tuning). ``batches`` may be a generator over a loader: one batch past ``count`` is drawn before
    stopping, as iterating the loader directly does.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches is None or (count is not None and count < 1):
        return 0
    device = device if device is not None else next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average = plain mean over the batches below
    model.train()
    used = 0
    try:
        with torch.no_grad():
            for images in batches:
                if count is not None and used >= count:
                    break
                model(images.to(device).float() / 255)
                used += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return used

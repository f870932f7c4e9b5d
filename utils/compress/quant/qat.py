"""Quantization-aware training of detectors and classifiers with torchao's PT2E flow, behind the usual YOLO model
interface.

How a model becomes trainable with fake quantization:

1. BatchNorm is folded into the convolutions first (frozen statistics, as TensorRT and ModelOpt's QAT do):
   every BatchNorm2d fed by a convolution whose output nothing else reads, in Conv blocks and zoo blocks
   alike (ShuffleNetV2 branches, stems), found from the graph of one forward by ``model.fuse()``
   (:mod:`models.fusion`, no list of block classes). The graph then holds plain biased convolutions, so eval
   and training mode compute the same thing and converting to INT8 is quick (torchao's own Conv+BN QAT
   rewrite, which keeps BN learning, took 46-65 s to convert yolov5n against 1.8 s folded, and doubles the
   graph). A BatchNorm that no single convolution feeds (a YAML ``nn.BatchNorm2d`` row after a Concat) is not
   folded: it stays a batch_norm op of the graph that keeps learning (batch statistics in training mode,
   running statistics in eval mode, switched by :meth:`QATModel.train`), and stays a float op of the INT8
   graph;
2. the model (training mode, NCHW) is captured by ``torch.export`` with a free batch size and free
   height/width (multiples of the stride), so training batches, the last short batch and validation's
   rectangular batches all run through one graph;
3. torchao's ``prepare_qat_pt2e`` inserts fake quantizers where :mod:`utils.compress.quant.quantizer` says (inputs and
   weights of every convolution, symmetric INT8);
4. a few training batches calibrate the activation ranges before fake quantization is switched on.

A detector's captured graph returns the Detect head's raw maps (the training output); :class:`QATDetector`
decodes them in eval mode exactly as ``Detect`` does, and exposes ``model[-1]`` (a weightless ``Detect`` holding
anchors and strides). A classifier's graph returns its logits (a dict per head for multi-head models) in both
modes; :class:`QATClassifier` passes them through and carries ``heads`` and the uncertainty head balance, if the
model has one. Both expose ``stride``, ``names`` and ``yaml``, so the loss, the EMA, validation and
``checkpoint_dict`` work unchanged. ``eval()`` freezes the observers (validation never moves a range); ``train()``
lets them follow the data again. Both also switch the graph's dropout ops (and any BatchNorm op left).

A checkpoint holds only the YAML, a plain-data recipe and the state dict (weights, BN statistics, observer
ranges, scales): :func:`rebuild_qat_model` builds the float model from the YAML, repeats steps 1-2 and loads the
tensors, so loading needs nothing beyond ``torch.load(weights_only=True)``; the same torch and torchao
versions must prepare it (the recipe records them, a mismatch of the graph is refused naming them).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from utils.common.errors import UserError

LOGGER = logging.getLogger(__name__)

RECIPE_FORMAT = 1
TORCHAO_HINT = "pip install 'torchao>=0.13' (listed in requirements.txt; pure Python, no extra dependencies)"


def require_torchao() -> Any:
    """The ``torchao`` module, or a :class:`UserError` saying how to install it."""
    try:
        import torchao
        from torchao.quantization.pt2e import quantize_pt2e  # noqa: F401  (the part QAT needs)
    except ImportError as exc:
        raise UserError(f"--qat needs the torchao package, which is not installed ({exc}); {TORCHAO_HINT}") from None
    return torchao


def check_qat_flags(cfg: Any) -> None:
    """``train.py --qat`` flag checks, before anything loads: what QAT cannot combine with, and the library."""
    import os

    conflicts = {"--compile": cfg.compile, "--freeze": cfg.freeze, "--freeze-schedule": cfg.freeze_schedule,
                 "--evolve": cfg.evolve, "--heads-mode sequential": getattr(cfg, "heads_mode", "") == "sequential",
                 "torchrun (DDP)": int(os.environ.get("WORLD_SIZE", 1)) > 1}
    given = [flag for flag, value in conflicts.items() if value]
    if given:
        raise UserError(f"--qat cannot be combined with {', '.join(given)}: the fake-quantized graph is one traced "
                        "module without per-layer names or a compiled variant; drop those flags")
    if cfg.bf16:
        LOGGER.info("--qat trains in float32: bfloat16 autocast is off (its rounding would come on top of the 8-bit "
                    "rounding the exported INT8 model has)")
    require_torchao()


def check_qat_supported(model: nn.Module, source: str = "the model") -> None:
    """Refuse, with the reason, models that QAT does not handle: those ending in neither a Detect head nor a
    classification head."""
    from models.registry import task_of
    from models.yaml_config import ModelConfigError

    head = model.model[-1] if hasattr(model, "model") else model
    try:
        task_of(head)
    except ModelConfigError:
        raise UserError(f"--qat: {source} ends in {type(head).__name__}, neither a Detect head nor a classification "
                        "head; quantization-aware training supports detectors and classifiers only") from None


def qat_recipe(stride: int) -> dict[str, Any]:
    """Plain data recorded in the checkpoint: enough to prepare the same graph again and to refuse a mismatch."""
    import torchao

    from utils.compress.quant.quantizer import PLACEMENT, SCHEME

    return {"method": "qat", "library": "torchao", "library_version": str(torchao.__version__),
            "torch": str(torch.__version__), "scheme": SCHEME, "placement": PLACEMENT, "batchnorm": "folded before QAT",
            "stride": int(stride), "format": RECIPE_FORMAT}


class QATModel(nn.Module):
    """What every fake-quantized model shares: the prepared torch.export graph (``body``), the YAML, class names,
    strides, the recipe, and mode switching that also freezes or frees the observers."""

    def __init__(self, graph: torch.fx.GraphModule, head: nn.Module, yaml: dict, names: list[str],
                 stride: torch.Tensor, recipe: dict[str, Any]):
        super().__init__()
        self.body = graph
        self.model = [head]  # not registered: ``model[-1]`` is what the loss, task and export code read
        self.yaml = yaml
        self.names = list(names)
        self.stride = stride
        self.quantization = recipe
        self._graph_training = True

    def train(self, mode: bool = True) -> QATModel:
        """Also rewrite the graph's BatchNorm/dropout ops for the mode, and run observers only while training."""
        from torchao.quantization.pt2e import (
            disable_observer,
            enable_observer,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )
        from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR

        self.training = mode  # nn.Module.train would call the graph's train(), which torchao forbids
        for child in self.children():
            if child is not self.body:
                child.train(mode)
        if mode != self._graph_training:
            setattr(self.body, _EXPORTED_TRAINING_ATTR, self._graph_training)  # a deepcopy may have dropped it
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.body)
            self._graph_training = mode
        self.body.apply(enable_observer if mode else disable_observer)
        return self


class QATDetector(QATModel):
    """A fake-quantized detector: the graph returns the raw maps, decoded here as ``Detect`` does.

    Training mode returns the raw per-level maps (bs, na, ny, nx, no), eval mode ``(decoded, raw)`` or, for
    exporters, only ``decoded`` (``export_decoded_only``), like ``DetectionModel``.
    """

    def __init__(self, graph: torch.fx.GraphModule, decoder: nn.Module, yaml: dict, names: list[str],
                 stride: torch.Tensor, recipe: dict[str, Any]):
        super().__init__(graph, decoder, yaml, names, stride, recipe)
        self.decoder = decoder
        self.export_decoded_only = False

    def forward(self, images: torch.Tensor) -> Any:
        raw = list(self.body(images))
        if self.training:
            return raw
        bs = images.shape[0]
        decoded = torch.cat([self.decoder._decode(p, i).view(bs, -1, self.decoder.no) for i, p in enumerate(raw)], 1)
        return decoded if self.export_decoded_only else (decoded, raw)


class ClassifierHeadInfo(nn.Module):
    """Weightless stand-in for a classifier's head at ``model[-1]`` (its weights live in the graph): names the
    registered head class it stands for (so :func:`models.yolo.task_of` answers "classify") and the heads."""

    def __init__(self, heads: list[dict[str, Any]], stands_for: type[nn.Module]):
        super().__init__()
        self.heads = heads
        self.stands_for = stands_for


class QATClassifier(QATModel):
    """A fake-quantized classifier: logits (``{head: logits}`` for multi-head models) in both modes.

    ``head_balance`` (learned per-head loss weights, ``head_balance: uncertainty``) stays a registered
    submodule so the optimiser trains it and the checkpoint keeps it, as in ``ClassificationModel``.
    """

    def __init__(self, graph: torch.fx.GraphModule, yaml: dict, names: list[str], stride: torch.Tensor,
                 recipe: dict[str, Any], heads: list[dict[str, Any]], head_class: type[nn.Module],
                 head_balance: nn.Module | None = None):
        super().__init__(graph, ClassifierHeadInfo(heads, head_class), yaml, names, stride, recipe)
        self.heads = heads
        if head_balance is not None:
            self.head_balance = head_balance

    def forward(self, images: torch.Tensor) -> Any:
        return self.body(images)


def _weightless_detect(head: nn.Module) -> nn.Module:
    """A ``Detect`` with the head's anchors and strides but no convolutions: decoding and loss metadata only."""
    from models.heads import Detect

    decoder = Detect(head.nc, head.anchors.view(head.nl, -1).tolist(), ch=())
    decoder.anchors.copy_(head.anchors)
    decoder.stride = head.stride.clone()
    return decoder


def _training_graph(model: nn.Module, stride: int) -> torch.fx.GraphModule:
    """``torch.export`` of the model in training mode with free batch and height/width (multiples of stride)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height_cells", min=1, max=1024)
    width = torch.export.Dim("width_cells", min=1, max=1024)
    example = torch.zeros(2, 3, 2 * stride, 2 * stride)  # sizes of 1 would be specialised by torch.export
    shapes = {"x": {0: batch, 2: stride * height, 3: stride * width}}
    return torch.export.export(model, (example,), dynamic_shapes=shapes).module()


def prepare_qat(model: nn.Module, recipe: dict[str, Any] | None = None) -> QATModel:
    """Fold BN, capture ``model`` (a float detector or classifier) and insert fake quantizers; not calibrated yet.

    ``model`` itself is changed (fused as ``model.fuse()`` folds for inference: every Conv2d -> BatchNorm2d pair
    of its graph; training mode; NCHW layout: the graph is captured for that layout).
    """
    require_torchao()
    check_qat_supported(model)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from models.registry import task_of
    from utils.compress.quant.quantizer import tensorrt_quantizer

    head = model.model[-1]
    stride = max(int(torch.as_tensor(model.stride).max()), 32)
    recipe = recipe or qat_recipe(stride)
    model = model.float().train().to(memory_format=torch.contiguous_format)
    with torch.no_grad():  # fusing under autograd would leave non-leaf weights
        model.fuse()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    head_balance = getattr(model, "head_balance", None)
    if head_balance is not None:  # a loss weight, not part of the forward: keep it out of the captured graph
        del model.head_balance
    graph = prepare_qat_pt2e(_training_graph(model, stride), tensorrt_quantizer())
    names, strides = list(getattr(model, "names", [])), torch.as_tensor(model.stride).clone()
    if task_of(head) == "detect":
        return QATDetector(graph, _weightless_detect(head), _plain_yaml(model), names, strides, recipe)
    return QATClassifier(graph, _plain_yaml(model), names, strides, recipe, list(model.heads), type(head),
                         head_balance)


def _plain_yaml(model: nn.Module) -> dict:
    return {k: v for k, v in dict(getattr(model, "yaml", {})).items() if k != "yaml_file"}


@torch.no_grad()
def calibrate(model: QATModel, batches: Iterable[torch.Tensor]) -> int:
    """Set the activation ranges from ``batches`` (BatchNorm in eval mode, so nothing else changes), then switch
    fake quantization on. Returns the number of images seen."""
    from torchao.quantization.pt2e import disable_fake_quant, enable_fake_quant, enable_observer

    model.eval()
    model.body.apply(disable_fake_quant)
    model.body.apply(enable_observer)
    seen = 0
    for images in batches:
        model(images)
        seen += images.shape[0]
    model.body.apply(enable_fake_quant)
    model.train()
    if not seen:
        raise UserError("--qat: no calibration images (the training loader is empty)")
    return seen


def calibration_batches(loader: Iterable, preprocess: Any, device: torch.device, limit: int) -> Iterable[torch.Tensor]:
    """Up to ``limit`` preprocessed image batches from a training loader (augmented, as training will see)."""
    for index, raw in enumerate(loader):
        if index >= limit:
            return
        yield preprocess(raw, device)["images"].contiguous()


def prepare_for_training(model: nn.Module, loader: Iterable, preprocess: Any, device: torch.device,
                         batches: int = 8) -> QATModel:
    """What ``train.py --qat`` does before its first epoch: prepare, calibrate on training batches, log it."""
    qat = prepare_qat(model).to(device)
    images = calibrate(qat, calibration_batches(loader, preprocess, device, batches))
    LOGGER.info("QAT: %s; %s; activation ranges calibrated on %d training images (torchao %s)",
                qat.quantization["scheme"], qat.quantization["placement"], images, qat.quantization["library_version"])
    return qat


class QuantizationAwareTraining:
    """Training plug-in for ``--qat``: once the float model and the loaders exist (before the optimizer and the EMA
    see the model), replace the model by its fake-quantized graph, calibrated on training batches; the graph was
    captured in the plain NCHW layout, so training batches stay in it."""

    def on_loaders_built(self, trainer: Any) -> None:
        trainer.model = prepare_for_training(trainer.model, trainer.train_loader, trainer.task.preprocess,
                                             trainer.device)
        trainer.memory_format = torch.contiguous_format


def is_qat_checkpoint(data: dict[str, Any]) -> bool:
    return isinstance(data.get("quantization"), dict) and data["quantization"].get("method") == "qat"


def rebuild_qat_model(data: dict[str, Any], source: str) -> QATModel:
    """The :class:`QATModel` of a loaded checkpoint dict (our format with a ``quantization`` recipe)."""
    from models.yolo import build_model
    from utils.common.errors import CheckpointError

    recipe = data["quantization"]
    if recipe.get("library") != "torchao" or int(recipe.get("format", 0)) > RECIPE_FORMAT:
        raise CheckpointError(f"{source}: quantization recipe {recipe} is not one this version can rebuild")
    require_torchao()
    model = build_model(data["yaml"])
    model.names = list(data.get("names") or model.names)
    qat = prepare_qat(model, recipe)
    state = data["state_dict"]
    check_same_graph(qat.state_dict(), state, recipe, source)
    qat.load_state_dict(state)  # observers and fake quantizers resize their per-channel buffers themselves
    return qat.eval()


def check_same_graph(own: dict[str, Any], state: dict[str, Any], recipe: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose tensors are not those of the graph prepared here, saying why it differs."""
    from utils.common.errors import CheckpointError

    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    folded = [k.removeprefix("body.").removesuffix(".running_var") for k in unexpected if k.endswith(".running_var")]
    if folded:
        raise CheckpointError(
            f"{source}: the checkpoint's QAT graph keeps BatchNorm {folded[0]}, which "
            "QAT now folds into the convolution feeding it (every Conv-BatchNorm pair, zoo blocks included): it "
            "was written by an earlier version that folded Conv blocks only; run --qat again from the float weights")
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the QAT graph prepared here does not match the checkpoint's (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); it was saved with torch {recipe.get('torch')} and torchao "
            f"{recipe.get('library_version')}: load it with those versions")


def quantized_graph(model: QATModel) -> nn.Module:
    """An eval copy whose graph holds real INT8 weights and quantize/dequantize ops (torchao's ``convert_pt2e``:
    BatchNorm folded into the convolutions), a detector's decoding included: what the ONNX export traces."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    copied = copy.deepcopy(model).eval()
    copied.body = convert_pt2e(copied.body)
    if isinstance(copied, QATDetector):
        copied.export_decoded_only = True
    return copied


@torch.no_grad()
def float_model_with_qat_weights(model: QATModel) -> nn.Module:
    """The plain float model (built from the YAML) carrying the QAT-trained weights: BatchNorm was folded before
    QAT, so the BN of each pair ``fuse()`` folds (the same pairs: same YAML, same graph) becomes the identity
    (scale 1, shift = the folded bias, statistics 0 / 1 - eps) and its convolution takes the folded weight (and
    a zero bias, if it has one: the folded bias holds it).

    What this is for: a graph that other INT8 tools can quantize their own way (ONNX Runtime's static
    quantizer puts a quantizer on every output, the placement its integer kernels need) from weights that
    learned to live on an 8-bit grid. Activation ranges are calibrated again by that tool.
    """
    from models.yolo import build_model

    plain = build_model(model.yaml)
    plain.names = list(model.names)
    trained = {k.removeprefix("body."): v for k, v in model.state_dict().items() if k.startswith("body.model.")}
    own = plain.state_dict()
    for pair in plain.conv_bn_pairs():
        conv, bn = plain.get_submodule(pair.conv), plain.get_submodule(pair.bn)
        conv.weight.copy_(trained.pop(f"{pair.conv}.weight"))
        if conv.bias is not None:
            conv.bias.zero_()
        bn.weight.fill_(1.0)
        bn.bias.copy_(trained.pop(f"{pair.conv}.bias"))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    for key, value in trained.items():  # unfolded convolutions (heads), unfolded BatchNorms, linear layers
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"QAT weight {key} has no place in the float model built from the YAML")
        own[key].copy_(value)
    if hasattr(model, "head_balance"):
        plain.head_balance.load_state_dict(model.head_balance.state_dict())
    return plain.eval()

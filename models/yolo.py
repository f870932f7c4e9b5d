"""Model builder: ``parse_model`` turns a YAML into an ``nn.Sequential`` of registered blocks.

The models keep YOLOv5 v7.0's import paths and attribute names (``models.yolo.DetectionModel`` and
``models.yolo.ClassificationModel`` with ``yaml, model, save, names, stride``; each layer with
``i, f, type, np``) so official checkpoints unpickle into these classes. Run
``python models/yolo.py --cfg yolov5s.yaml`` for the layer table and profile (:mod:`models.report`).

Importing any ``models`` module registers every block (``models/__init__.py``), so a YAML may name any of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # executed as `python models/yolo.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging
from typing import Any

import torch
from torch import nn

from models.activations import activation_scope, parse_activation
from models.channels import apply_widths
from models.classify import HeadUncertaintyWeights, MultiHeadClassify, is_classifier_config, normalize_heads
from models.fusion import ConvBN, conv_bn_pairs, fold_conv_bn
from models.heads import Detect
from models.registry import REGISTRY, BuildContext, task_of
from models.yaml_config import (
    ModelConfigError,
    check_model_numbers,
    last_module_name,
    layer_rows,
    load_model_yaml,
    model_symbols,
    resolve_arg,
    scaled_repeats,
)
from utils.common.torch_utils import initialize_weights, model_summary

LOGGER = logging.getLogger(__name__)

__all__ = ["BaseModel", "ClassificationModel", "Detect", "DetectionModel", "Model", "build_model", "main",
           "parse_model"]


def _check_from(index: int, f: int | list[int], where: str) -> list[int]:
    """Absolute indices of the layers a row reads; ``-1`` is the previous layer (the image for layer 0)."""
    sources = [f] if isinstance(f, int) else list(f)
    if not sources or not all(isinstance(j, int) for j in sources):
        raise ModelConfigError(f"{where}: layer {index}: 'from' must be an int or a list of ints, got {f!r}")
    absolute = [j if j >= 0 else index + j for j in sources]
    lowest = -1 if index == 0 else 0
    for j, a in zip(sources, absolute):
        if not lowest <= a < index:
            raise ModelConfigError(f"{where}: layer {index}: 'from' index {j} does not name an earlier layer")
    return absolute


def _build_layer(spec, ctor_args: list, n: int) -> nn.Module:
    if n > 1:
        return nn.Sequential(*(spec.cls(*ctor_args) for _ in range(n)))
    return spec.cls(*ctor_args)


def parse_model(cfg: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of ``cfg`` for ``ch[0]`` input channels; returns (layers, indices whose output is kept).

    Every block is bound through its registry spec: the builder knows no class by name.
    """
    where = cfg.get("yaml_file", "<dict>")
    check_model_numbers(cfg)
    if cfg.get("activation"):
        try:
            parse_activation(cfg["activation"])
        except (ValueError, SyntaxError) as exc:
            raise ModelConfigError(f"{where}: activation: {exc}") from None
    symbols = model_symbols(cfg)
    ctx = BuildContext(cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), symbols)
    LOGGER.info("%3s%18s%3s%10s  %-40s%-30s", "", "from", "n", "params", "module", "arguments")
    layers, save, channels = [], [], []
    with activation_scope(cfg.get("activation")):
        for i, (_, (f, n, name, raw_args)) in enumerate(layer_rows(cfg)):
            try:
                spec = REGISTRY.get(name)
            except KeyError as exc:
                raise ModelConfigError(f"{where}: layer {i}: {exc.args[0]}") from None
            sources = _check_from(i, f, where)
            c_in = [channels[j] for j in sources] if i else [ch[0]]
            args = _resolve_args(raw_args, symbols, where, i)
            depth = scaled_repeats(n, ctx.depth_multiple)
            try:  # a constructor only turns the row's numbers into parameters: its errors are the row's
                ctor_args, n_outer = spec.bind(c_in, args, ctx, depth)
                module = _build_layer(spec, ctor_args, n_outer)
            except (TypeError, ValueError, IndexError, RuntimeError) as exc:
                raise ModelConfigError(
                    f"{where}: layer {i} ({name} {raw_args}): {exc}; expected {spec.signature()}"
                ) from exc
            _check_geometry(module, f"{where}: layer {i} ({name} {raw_args})")
            c_out = spec.out_channels(c_in, ctor_args)
            _annotate(module, i, f, name, spec)
            save.extend(a for j, a in zip([f] if isinstance(f, int) else f, sources) if j != -1)
            LOGGER.info("%3s%18s%3s%10.0f  %-40s%-30s", i, f, depth, module.np, module.type, ctor_args)
            layers.append(module)
            channels.append(c_out)
    layers = nn.Sequential(*layers)
    _apply_pruned_widths(layers, cfg.get("pruned"), where)
    return layers, sorted(set(save))


def _apply_pruned_widths(layers: nn.Sequential, pruned: dict | None, where: str) -> None:
    """A pruned model's YAML lists the leaves whose widths the pruning tools changed (see models/channels.py)."""
    if pruned is None:
        return
    if not isinstance(pruned, dict) or not isinstance(pruned.get("widths", {}), dict):
        raise ModelConfigError(f"{where}: 'pruned' must be a mapping with a 'widths' table")
    try:
        apply_widths(layers, pruned.get("widths", {}), where)
    except ValueError as exc:
        raise ModelConfigError(str(exc)) from None


def _check_geometry(module: nn.Module, where: str) -> None:
    """Kernels, strides and channel counts of a built layer must be >= 1: a 0 would only fail inside the first
    forward pass, with a message from the convolution library instead of the YAML row."""
    for sub in module.modules():
        sizes: dict[str, tuple] = {}
        if isinstance(sub, nn.modules.conv._ConvNd):
            sizes = {"kernel": sub.kernel_size, "stride": sub.stride, "dilation": sub.dilation,
                     "channels": (sub.in_channels, sub.out_channels)}
        elif isinstance(sub, (nn.MaxPool2d, nn.AvgPool2d)):
            sizes = {"kernel": _pair(sub.kernel_size), "stride": _pair(sub.stride)}
        for what, values in sizes.items():
            if any(int(v) < 1 for v in values):
                raise ModelConfigError(f"{where}: {what} {tuple(values)} of {type(sub).__name__} must be >= 1")


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _resolve_args(raw_args: list, symbols: dict, where: str, index: int) -> list:
    missing = [a for a in raw_args if isinstance(a, str) and a in {"nc", "anchors"} and a not in symbols]
    if missing:
        raise ModelConfigError(f"{where}: layer {index}: uses '{missing[0]}' but the YAML defines no '{missing[0]}'")
    return [resolve_arg(a, symbols) for a in raw_args]


def _annotate(module: nn.Module, index: int, f, name: str, spec) -> None:
    """The per-layer attributes v7.0 checkpoints carry and the forward pass reads."""
    module.i, module.f = index, f
    module.type = f"{spec.cls.__module__}.{spec.cls.__name__}".replace("torch.nn.modules.", "nn.")
    module.np = sum(p.numel() for p in module.parameters())


class BaseModel(nn.Module):
    """Runs the layer graph: each layer reads ``f`` (previous layer or saved outputs)."""

    def forward(self, x: torch.Tensor, profile: bool = False):
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    def probe_forward(self, x: torch.Tensor):
        """:meth:`forward` for the build-time dry run: a layer whose inputs do not fit together (a YAML row
        reading the wrong layers) is named with its file and index instead of failing deep inside torch."""
        outputs: list[torch.Tensor | None] = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            try:
                x = layer(x)
            except RuntimeError as exc:
                where = self.yaml.get("yaml_file") or "<dict>"
                raise ModelConfigError(f"{where}: layer {layer.i} ({layer.type.rsplit('.', 1)[-1]}, from {layer.f}) "
                                       f"cannot run on its inputs: {exc}") from exc
            outputs.append(x if layer.i in self.save else None)
        return x

    def fuse(self) -> BaseModel:
        """Fold every BatchNorm into the convolution that feeds it (eval-mode statistics, so for inference, and for
        QAT, which trains with BN frozen into the weights): Conv blocks and every zoo block alike.

        The pairs are read from the graph of one forward (:meth:`conv_bn_pairs`, :mod:`models.fusion`); a
        convolution whose output anything else reads is not folded, and a BatchNorm not fed by one convolution
        alone (a YAML ``nn.BatchNorm2d`` row after a Concat) stays a BatchNorm. Folding twice changes nothing.
        """
        fold_conv_bn(self, self.conv_bn_pairs())
        return self

    def conv_bn_pairs(self) -> list[ConvBN]:
        """The Conv2d -> BatchNorm2d pairs :meth:`fuse` folds, by module name, from one eval forward of a zero
        image of two strides' side (at least 64 px, as QAT captures its graph); the model is left unchanged."""
        parameter = next(self.parameters())
        side = 2 * max(int(torch.as_tensor(getattr(self, "stride", 32)).max()), 32)
        channels = int(getattr(self, "yaml", {}).get("ch", 3))
        example = torch.zeros(1, channels, side, side, device=parameter.device, dtype=parameter.dtype)
        return conv_bn_pairs(self, example)

    def info(self, imgsz: int | tuple[int, int] = 640, verbose: bool = False) -> dict:
        return model_summary(self, imgsz, verbose)

    def backbone_indices(self) -> list[int]:
        """Indices of the YAML's backbone section (``--freeze backbone``)."""
        return list(range(len(self.yaml.get("backbone", []))))


class DetectionModel(BaseModel):
    """A detector from a YAML: strides from a dry forward, anchors in grid units, bias priors."""

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None,
                 anchors=None, depth_multiple: float | None = None, width_multiple: float | None = None):
        super().__init__()
        self.yaml = load_model_yaml(cfg)
        self.yaml_file = self.yaml.get("yaml_file", "")
        overrides = {"nc": nc, "anchors": anchors, "depth_multiple": depth_multiple, "width_multiple": width_multiple}
        for key, value in overrides.items():
            if value is not None:
                self.yaml[key] = value
        if "nc" not in self.yaml:
            raise ModelConfigError(f"{self.yaml_file or '<dict>'}: no 'nc' (number of classes) given")
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        self.model, self.save = parse_model(self.yaml, ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)
        self._init_head(ch)
        initialize_weights(self)

    def _init_head(self, ch: int) -> None:
        head = self.model[-1]
        if not isinstance(head, Detect):
            raise ModelConfigError(f"{self.yaml_file}: last layer must be Detect for a DetectionModel")
        side = 256
        head.inplace = self.inplace
        self.train()
        with torch.no_grad():
            maps = self.probe_forward(torch.zeros(1, ch, side, side))
        head.stride = torch.tensor([side / m.shape[-2] for m in maps])
        head.anchors /= head.stride.view(-1, 1, 1)
        _check_anchor_order(head)
        self.stride = head.stride
        head.initialize_biases()

    @property
    def nc(self) -> int:
        return self.model[-1].nc

    def _apply(self, fn):
        """Keep Detect's plain-tensor ``stride`` on the model's device and dtype (as v7.0 does)."""
        self = super()._apply(fn)
        head = self.model[-1]
        if isinstance(head, Detect) and head.stride is not None:
            head.stride = fn(head.stride)
            self.stride = head.stride
        return self


Model = DetectionModel  # v7.0 alias, kept for checkpoints and user code


def _check_anchor_order(head: Detect) -> None:
    """Anchors must grow with stride; flip them if the YAML lists them the other way round."""
    area = head.anchors.prod(-1).mean(-1).view(-1)
    delta_area = area[-1] - area[0]
    delta_stride = head.stride[-1] - head.stride[0]
    if delta_area and delta_area.sign() != delta_stride.sign():
        LOGGER.info("reversing anchor order to match strides")
        head.anchors[:] = head.anchors.flip(0)


class ClassificationModel(BaseModel):
    """A classifier from a YAML (backbone + Classify / MultiHeadClassify), v7.0 attribute names.

    ``heads`` is always a list of ``{name, names}`` (one entry for ``Classify``); ``names`` is the flat class
    list (``'head/class'`` for multi-head models) so code that only knows ``names`` still sees every output.
    The head spec is written back into ``yaml`` so a checkpoint rebuilt from its YAML has the same heads.
    """

    def __init__(self, cfg: str | Path | dict = "yolov5s-cls.yaml", ch: int = 3, nc: int | None = None,
                 heads: list | None = None):
        super().__init__()
        self.yaml = load_model_yaml(cfg)
        self.yaml_file = self.yaml.get("yaml_file", "")
        if not is_classifier_config(self.yaml):
            raise ModelConfigError(f"{self.yaml_file or '<dict>'}: last layer must be Classify or MultiHeadClassify")
        self._apply_overrides(nc, heads)
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        self.model, self.save = parse_model(self.yaml, ch=[ch])
        self.heads = self._head_spec()
        self.names = self._flat_names()
        initialize_weights(self)
        self.stride = self._measure_stride(ch)
        if self.yaml.get("head_balance") == "uncertainty":
            self.head_balance = HeadUncertaintyWeights(len(self.heads))

    def _apply_overrides(self, nc: int | None, heads: list | None) -> None:
        if heads is not None:
            spec = normalize_heads(heads)
            self.yaml["heads"] = spec
            for k, head in enumerate(spec, 1):
                if f"nc{k}" in self.yaml:
                    self.yaml[f"nc{k}"] = len(head["names"])
            if len(spec) == 1 and last_module_name(self.yaml) == "Classify":
                self.yaml["nc"], self.yaml["names"] = len(spec[0]["names"]), spec[0]["names"]
                self.yaml["head_name"] = spec[0]["name"]
        if nc is not None:
            self.yaml["nc"] = nc
            if len(self.yaml.get("names") or []) != nc:
                self.yaml.pop("names", None)
        if "nc" not in self.yaml and last_module_name(self.yaml) == "Classify":
            raise ModelConfigError(f"{self.yaml_file or '<dict>'}: no 'nc' (number of classes) given")

    def _head_spec(self) -> list[dict[str, Any]]:
        head = self.model[-1]
        if isinstance(head, MultiHeadClassify):
            given = normalize_heads(self.yaml["heads"]) if self.yaml.get("heads") else []
            if given and [len(h["names"]) for h in given] != head.ncs:
                raise ModelConfigError(f"{self.yaml_file}: the head row's class counts {head.ncs} do not match "
                                       f"'heads' {[len(h['names']) for h in given]}")
            spec = given or [{"name": n, "names": [str(i) for i in range(c)]}
                             for n, c in zip(head.head_names, head.ncs)]
            self.yaml["heads"] = spec
            return spec
        nc = head.linear.out_features
        names = self.yaml.get("names") or [str(i) for i in range(nc)]
        return [{"name": self.yaml.get("head_name", "class"), "names": list(names)}]

    def _flat_names(self) -> list[str]:
        if len(self.heads) == 1 and not isinstance(self.model[-1], MultiHeadClassify):
            return list(self.heads[0]["names"])
        return [f"{h['name']}/{n}" for h in self.heads for n in h["names"]]

    def _measure_stride(self, ch: int, side: int = 64) -> torch.Tensor:
        """Largest down-sampling of any conv in a dry forward (32 for YOLOv5 backbones), read by exporters."""
        smallest: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: smallest.append(min(out.shape[-2:])))
                 for m in self.modules() if isinstance(m, nn.Conv2d)]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.probe_forward(torch.zeros(1, ch, side, side))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        return torch.tensor([float(side // max(min(smallest), 1))])

    @property
    def nc(self) -> int:
        """Total outputs over all heads (``len(names)``)."""
        return len(self.names)

    @property
    def multi_head(self) -> bool:
        return isinstance(self.model[-1], MultiHeadClassify)

    def head_prefix(self, k: int) -> str:
        """Parameter-name prefix of head ``k`` (the whole head layer for single-head models)."""
        last = len(self.model) - 1
        return f"model.{last}.branches.{k}." if self.multi_head else f"model.{last}."

    def shared_prefixes(self) -> list[str]:
        """Prefixes of the layers every head uses (all layers before the head)."""
        return [f"model.{i}." for i in range(len(self.model) - 1)]


def build_model(cfg: str | Path | dict, nc: int | None = None, ch: int = 3) -> BaseModel:
    """Detector or classifier, chosen by the task of the YAML's last layer."""
    config = load_model_yaml(cfg)
    if task_of(config) == "detect":
        return DetectionModel(config, ch=ch, nc=nc)
    return ClassificationModel(config, ch=ch, nc=nc)


def main(argv: list[str] | None = None) -> int:
    """``python models/yolo.py``: build the YAML and print its layer table, cost and roofline."""
    from models import report  # the command line's flags and printing; building models needs none of it

    args = report.parse_args(argv)
    report.check_report_args(args)
    cfg = load_model_yaml(args.cfg)
    for key in ("depth_multiple", "width_multiple"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    report.print_report(build_model(cfg, nc=args.nc).eval(), args)
    return 0


if __name__ == "__main__":
    from utils.common.cli import run_cli

    raise SystemExit(run_cli(main))

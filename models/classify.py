"""Classifiers on YOLOv5 backbones: single-head ``Classify`` (v7.0 layout) and ``MultiHeadClassify``.

Both heads are ordinary registered blocks, so a classifier YAML is a detection backbone plus one head row and
is built by the same :func:`models.yolo.parse_model`; the model class, ``ClassificationModel``, sits next to
``DetectionModel`` in :mod:`models.yolo` (as in YOLOv5 v7.0), so this module needs nothing from the builder.

Multi-head sizes (after the edge-device design this issue started from):

* ``s``: one classifier per head on the shared backbone features (cheapest);
* ``m``: the last backbone stage (strided conv + C3) duplicated per head, then the classifier, so each head
  owns deeper features (the YAML's backbone stops one stage earlier);
* ``l``: ``m`` plus an independent 3x3 input conv per head in front of its stage. The seed gave every data
  source its own stem; with one image tensor per batch that would run the backbone once per head, so the
  per-head input conv sits at the head's input instead.

Conv variants (``conv: plain | dp | dw``) replace every 3x3 conv of the head (and, in the ``-dp``/``-dw`` YAMLs,
of the backbone via :class:`DPConv`, :class:`DWSConv`, :class:`C3Light`): ``dp`` factorises 3x3 into
3x1 + 1x3 + 1x1 over half the channels, ``dw`` is depthwise-separable. ``fc: false`` is the seed's no-FC
classifier: two convs (1x1 to ``hidden``, 1x1 to ``nc``) and a spatial mean, so the exported graph holds only
Conv/ReduceMean and no Gemm; mathematically a 1x1 conv followed by the mean equals pool then linear.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.common import C3, Conv, autopad
from models.registry import REGISTRY, BuildContext, Example, ModuleSpec, Pruning, make_divisible, out_none, register
from models.yaml_config import ModelConfigError, last_module_name

LOGGER = logging.getLogger(__name__)

__all__ = [
    "C3Light",
    "Classify",
    "DPConv",
    "DWSConv",
    "HeadUncertaintyWeights",
    "MultiHeadClassify",
    "as_head_dict",
    "heads_of",
    "is_classifier_config",
    "normalize_heads",
]

CONV_VARIANTS = ("plain", "dp", "dw")
HEAD_SIZES = ("s", "m", "l")
DEFAULT_HIDDEN = 1280  # v7.0 Classify width (EfficientNet-B0's last conv)


# ---------------------------------------------------------------------------------------------- conv variants
@register(repeat="outer", example=[32, 3, 2])
class DPConv(nn.Module):
    """A 3x3 conv factorised as 3x1 -> 1x3 -> 1x1 (``e`` of the output channels inside).

    For c1 = c2 = c this costs 2.75 c^2 weights instead of 9 c^2. The stride is split over the two
    separable convs (vertical then horizontal), so the output grid equals the 3x3 conv's.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, e: float = 0.5):
        super().__init__()
        hidden = max(int(c2 * e), 8)
        self.cv1 = Conv(c1, hidden, (k, 1), (s, 1), autopad((k, 1)))
        self.cv2 = Conv(hidden, hidden, (1, k), (1, s), autopad((1, k)))
        self.cv3 = Conv(hidden, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.cv1(x)))


@register(repeat="outer", example=[32, 3, 2])
class DWSConv(nn.Module):
    """Depthwise-separable conv: k x k depthwise (groups = c1) then 1x1 pointwise; ~(k^2 + c2)/(k^2 c2) of Conv."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__()
        self.dw = Conv(c1, c1, k, s, g=c1)
        self.pw = Conv(c1, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


def make_conv(variant: str, c1: int, c2: int, k: int = 3, s: int = 1) -> nn.Module:
    """A ``k x k`` conv in the requested variant; 1x1 convs and non-3x3 kernels stay plain."""
    if variant not in CONV_VARIANTS:
        raise ValueError(f"conv variant '{variant}' unknown; use one of {CONV_VARIANTS}")
    if k == 3 and variant == "dp":
        return DPConv(c1, c2, 3, s)
    if k == 3 and variant == "dw":
        return DWSConv(c1, c2, 3, s)
    return Conv(c1, c2, k, s)


class BottleneckLight(nn.Module):
    """Bottleneck whose 3x3 conv is a variant (dp/dw); residual when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, variant: str = "dp"):
        super().__init__()
        self.cv1 = Conv(c1, c2, 1, 1)
        self.cv2 = make_conv(variant, c2, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@register(repeat="inner", example=(Example([32, True, "dp"], n=2), Example([16, False, "dw"])))
class C3Light(nn.Module):
    """C3 whose bottlenecks use a conv variant: YAML ``[-1, n, C3Light, [c2, shortcut, 'dp' | 'dw']]``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, variant: str = "dp", e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(BottleneckLight(hidden, hidden, shortcut, variant) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


def make_c3(variant: str, c1: int, c2: int, n: int) -> nn.Module:
    return C3(c1, c2, n) if variant == "plain" else C3Light(c1, c2, n, True, variant)


# ---------------------------------------------------------------------------------------------- Classify
def _bind_classify(spec: ModuleSpec, c_in: list[int], args: list, ctx: BuildContext, n: int):
    """``[nc, k, s, p, g, dropout, hidden]`` (v7.0 order); several ``from`` layers pass a channel list."""
    if not args:
        raise TypeError("Classify expects [nc, ...]")
    c1 = c_in[0] if len(c_in) == 1 else list(c_in)
    return [c1, *args], 1


@register(c1=False, width_args=(), out=out_none, coupling="head", multi_input=True, bind_fn=_bind_classify,
          pruning=Pruning(fixed_outputs=("linear",)), task="classify",
          example=(Example(["nc", 1, 1, None, 1, 0.0, 32], symbols={"nc": 3}),  # hidden 32 instead of 1280
                   Example(["nc", 1, 1, None, 1, 0.1, 32], inputs=(16, 32), symbols={"nc": 3})))
class Classify(nn.Module):
    """v7.0 classification head: Conv to 1280, global average pool, dropout, linear -> (b, nc) logits.

    Attribute names (``conv, pool, drop, linear``) are v7.0's so ``-cls`` checkpoints unpickle and load. With
    several input layers (``from: [5, 7, 9]``) each gets its own conv and pool and the pooled vectors are
    concatenated before the linear layer (v7.0 concatenated the maps, which needs equal resolutions).
    """

    def __init__(self, c1: int | Sequence[int], c2: int, k: int = 1, s: int = 1, p=None, g: int = 1,
                 dropout_p: float = 0.0, hidden: int = DEFAULT_HIDDEN):
        super().__init__()
        if isinstance(c1, int):
            self.conv = Conv(c1, hidden, k, s, autopad(k, p), g)
            n_inputs = 1
        else:
            self.conv = nn.ModuleList(Conv(c, hidden, k, s, autopad(k, p), g) for c in c1)
            n_inputs = len(c1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(p=dropout_p, inplace=True)
        self.linear = nn.Linear(hidden * n_inputs, c2)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.conv, nn.ModuleList):
            pooled = [self.pool(conv(xi)) for conv, xi in zip(self.conv, x)]
            features = torch.cat(pooled, 1)
        else:
            if isinstance(x, list):
                x = torch.cat(x, 1)
            features = self.pool(self.conv(x))
        return self.linear(self.drop(features.flatten(1)))


# ---------------------------------------------------------------------------------------------- multi-head
def normalize_heads(spec: Any) -> list[dict[str, Any]]:
    """``heads`` in any accepted spelling -> ``[{'name': str, 'names': [str, ...]}, ...]``.

    Accepted: a list of ``{name, names}`` or ``{name, nc}`` dicts (data and model YAMLs) or a list of class
    counts (the seed's ``[nc1, nc2, nc3]``, named ``head1..``). Class names default to their indices.
    """
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ModelConfigError(f"heads must be a non-empty list, got {spec!r}")
    heads = []
    for k, entry in enumerate(spec):
        if isinstance(entry, int):
            entry = {"nc": entry}
        if not isinstance(entry, dict):
            raise ModelConfigError(f"heads[{k}]: expected a dict with name/names or an int, got {entry!r}")
        names = entry.get("names")
        if names is None:
            if not isinstance(entry.get("nc"), int) or entry["nc"] < 1:
                raise ModelConfigError(f"heads[{k}]: give 'names' or a positive 'nc'")
            names = [str(i) for i in range(entry["nc"])]
        if isinstance(names, dict):
            names = [names[i] for i in sorted(names)]
        heads.append({"name": str(entry.get("name") or f"head{k + 1}"), "names": [str(n) for n in names]})
    if len({h["name"] for h in heads}) != len(heads):
        raise ModelConfigError(f"head names must be unique, got {[h['name'] for h in heads]}")
    return heads


def _bind_multihead(spec: ModuleSpec, c_in: list[int], args: list, ctx: BuildContext, n: int):
    """``[heads, {size, stage: [c, n], hidden, conv, fc, dropout}]``; stage width/depth follow the multiples."""
    if not args:
        raise TypeError("MultiHeadClassify expects [heads, options]")
    heads, options = args[0], args[1] if len(args) > 1 else {}
    if isinstance(options, str):  # [heads, s]: size only
        options = {"size": options}
    if not isinstance(options, dict) or len(args) > 2:
        raise TypeError("MultiHeadClassify expects [heads, {size, stage, hidden, conv, fc, dropout}]")
    options = dict(options)
    stage = options.pop("stage", None)
    if stage is not None:
        channels, depth = stage
        stage = [make_divisible(channels * ctx.width_multiple, 8), max(round(depth * ctx.depth_multiple), 1)]
    c1 = c_in[0] if len(c_in) == 1 else list(c_in)
    return [c1, heads, options.pop("size", "s"), stage, *_ordered_options(options)], 1


def _ordered_options(options: dict) -> list:
    known = {"hidden": DEFAULT_HIDDEN, "conv": "plain", "fc": True, "dropout": 0.0}
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"MultiHeadClassify: unknown option(s) {sorted(unknown)}; known: size, stage, {list(known)}")
    return [options.get(key, default) for key, default in known.items()]


class ClassifierTail(nn.Module):
    """Features -> logits for one head: conv 1x1 to ``hidden``, then pool + linear (fc) or conv 1x1 + mean."""

    def __init__(self, c1: int | Sequence[int], nc: int, hidden: int, fc: bool, dropout: float):
        super().__init__()
        inputs = [c1] if isinstance(c1, int) else list(c1)
        self.conv = nn.ModuleList(Conv(c, hidden, 1, 1) for c in inputs)
        self.fc = fc
        self.drop = nn.Dropout(p=dropout)
        if fc:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(hidden * len(inputs), nc)
        else:
            if len(inputs) > 1:
                raise ValueError("the no-FC classifier takes one input layer")
            self.classifier = nn.Conv2d(hidden, nc, 1)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        xs = x if isinstance(x, list) else [x]
        if not self.fc:
            return self.classifier(self.drop(self.conv[0](xs[0]))).mean((2, 3))
        pooled = torch.cat([self.pool(conv(xi)) for conv, xi in zip(self.conv, xs)], 1)
        return self.linear(self.drop(pooled.flatten(1)))


class HeadBranch(nn.Module):
    """One head's own layers: optional input conv (l), optional duplicated stage (m, l), classifier."""

    def __init__(self, c1: int | Sequence[int], nc: int, size: str, stage: list[int] | None, hidden: int,
                 conv: str, fc: bool, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        if size in {"m", "l"}:
            if not isinstance(c1, int) or stage is None:
                raise ValueError(f"head size '{size}' needs one input layer and 'stage: [channels, depth]'")
            if size == "l":
                layers.append(make_conv(conv, c1, c1, 3, 1))
            layers += [make_conv(conv, c1, stage[0], 3, 2), make_c3(conv, stage[0], stage[0], stage[1])]
            c1 = stage[0]
        self.features = nn.Sequential(*layers)
        self.tail = ClassifierTail(c1, nc, hidden, fc, dropout)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return self.tail(self.features(x) if len(self.features) else x)


@register(c1=False, width_args=(), out=out_none, coupling="head", multi_input=True, bind_fn=_bind_multihead,
          pruning=Pruning(fixed_outputs=("branches.*.tail.linear", "branches.*.tail.classifier")), task="classify",
          example=(Example(["heads", {"size": "m", "stage": [32, 1], "hidden": 32, "conv": "dp"}],
                           symbols={"heads": [2, 3]}),
                   Example(["heads", {"size": "l", "stage": [32, 1], "hidden": 32, "conv": "dw", "fc": False}],
                           symbols={"heads": [2, 3]}),
                   Example(["heads", {"hidden": 32}], inputs=(16, 32), symbols={"heads": [2, 3]})))
class MultiHeadClassify(nn.Module):
    """Several classifiers on shared features; returns ``{head_name: logits (b, nc_k)}`` in heads order.

    Each head's parameters live under ``branches.<k>.`` so training schedules can select one head.
    """

    def __init__(self, c1: int | Sequence[int], heads: Any, size: str = "s", stage: list[int] | None = None,
                 hidden: int = DEFAULT_HIDDEN, conv: str = "plain", fc: bool = True, dropout: float = 0.0):
        super().__init__()
        if size not in HEAD_SIZES:
            raise ValueError(f"head size '{size}' unknown; use one of {HEAD_SIZES}")
        spec = normalize_heads(heads)
        self.head_names = [h["name"] for h in spec]
        self.ncs = [len(h["names"]) for h in spec]
        self.size, self.conv_variant = size, conv
        self.branches = nn.ModuleList(
            HeadBranch(c1, nc, size, stage, hidden, conv, fc, dropout) for nc in self.ncs
        )

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: branch(x) for name, branch in zip(self.head_names, self.branches)}


# ---------------------------------------------------------------------------------------------- loss weights
class HeadUncertaintyWeights(nn.Module):
    """Learnable per-head log-variances ``s_k`` for uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    The weighted loss is ``sum_k exp(-s_k) * L_k + s_k / 2`` (the paper's classification form,
    ``L/sigma^2 + log sigma`` with ``s = log sigma^2``). A head with a high loss gets a larger variance and
    hence a smaller weight; the ``s_k / 2`` term keeps the variances from growing without bound. The module is
    attached to the model, so the training loop's optimiser updates ``log_vars`` with the other weights.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(n_heads))

    def forward(self, losses: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of per-head ``losses``; heads where ``active`` is False (no labels) add nothing."""
        terms = torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars
        if active is not None:
            terms = terms * active.to(terms.dtype)
        return terms.sum()


# ---------------------------------------------------------------------------------------------- YAML helpers
def is_classifier_config(cfg: dict) -> bool:
    """True when the YAML's last layer is a classification head (``Classify``, ``MultiHeadClassify``)."""
    name = last_module_name(cfg)
    return name in REGISTRY and REGISTRY.get(name).task == "classify"


def as_head_dict(preds: torch.Tensor | dict[str, torch.Tensor], heads: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Single-head models return a tensor; name it after the only head so all code sees ``{head: logits}``."""
    return preds if isinstance(preds, dict) else {heads[0]["name"]: preds}


def heads_of(model: nn.Module) -> list[dict[str, Any]]:
    """``model.heads``, or one head ``class`` from ``model.names`` for classifiers unpickled from v7.0 files."""
    heads = getattr(model, "heads", None)
    if heads:
        return list(heads)
    names = getattr(model, "names", None) or [str(i) for i in range(model.model[-1].linear.out_features)]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    return [{"name": "class", "names": [str(n) for n in names]}]

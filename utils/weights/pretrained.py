"""Load torchvision ImageNet backbones into zoo models whose backbone rows reproduce the torchvision layout.

The key map is built from the *structure* of both networks: our backbone blocks are walked in order, each
block's torchvision counterpart is named from the torchvision layout (``features.<i>.block.<j>`` etc.), and
every pair is checked to be the same kind of block (expand conv present or not, SE or not, stride) before any
tensor is copied. Nothing is matched by state-dict order, so a YAML whose backbone differs fails loudly.

Supported (``arch``):

* ``mobilenet_v3_small`` / ``mobilenet_v3_large``: stem + all inverted residuals (``features[0:12]`` /
  ``features[0:16]``) -> ``ConvBNHswish`` + ``MobileNetV3Block`` rows (``models/zoo/*mobilenetv3s.yaml``).
* ``shufflenet_v2_x1_0``: ``conv1`` + ``stage2..4`` -> ``ShuffleStem`` + ``ShuffleBlock`` rows
  (``models/zoo/yolov5l-shufflenetv2.yaml``).
* ``efficientnet_b0``: torchvision has no EfficientNet-Lite; B0 has Lite0's exact table, so its stem and every
  MBConv's expand/depthwise/project conv + BN map onto our ``MBConv`` rows. B0's SE layers have no Lite0
  counterpart and are skipped (reported as unused), and B0 was trained with SiLU, not ReLU6: treat it as
  an initialisation, not as a drop-in ImageNet Lite0.

Weights are never downloaded. Put the file there yourself, e.g. on a machine with internet::

    torch.save(torchvision.models.mobilenet_v3_small(weights="IMAGENET1K_V1").state_dict(), "mobilenet_v3_small.pth")
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.backbones import ConvBNHswish, EfficientStem, MBConv, MobileNetV3Block, ShuffleBlock, ShuffleStem
from utils.common.errors import FlagError, MissingFileError, UserError

LOGGER = logging.getLogger(__name__)

__all__ = ["ARCHS", "BackboneMismatchError", "TransferResult", "arch_from_file_name", "build_key_map",
           "load_torchvision_backbone"]

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# BatchNorm eps each torchvision model was trained with; our builder sets 1e-3 everywhere (YOLOv5's value).
TORCHVISION_BN_EPS = {
    "mobilenet_v3_small": 1e-3,
    "mobilenet_v3_large": 1e-3,
    "shufflenet_v2_x1_0": 1e-5,
    "efficientnet_b0": 1e-5,
}
ARCHS = tuple(TORCHVISION_BN_EPS)


class BackboneMismatchError(UserError, ValueError):
    """A torchvision state_dict that does not fit the model's backbone (the message names both keys)."""


@dataclass
class TransferResult:
    """What a load did: tensors copied, tensors in the model, and source tensors nothing maps to."""

    transferred: int
    total: int
    unused: list[str] = field(default_factory=list)


def _conv_bn(src: str, dst: str) -> dict[str, str]:
    """torchvision ``Conv2dNormActivation`` (``.0`` conv, ``.1`` BN) -> our ``Conv`` (``.conv``, ``.bn``)."""
    keys = {f"{src}.0.weight": f"{dst}.conv.weight"}
    keys.update({f"{src}.1.{k}": f"{dst}.bn.{k}" for k in BN_KEYS})
    return keys


def _plain_bn(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.{k}": f"{dst}.{k}" for k in BN_KEYS}


def _se(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.{fc}.{p}": f"{dst}.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}


def _backbone_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(state-dict prefix, block) for every backbone block in order; repeated rows are nn.Sequential."""
    n_backbone = len(model.yaml.get("backbone", [])) if hasattr(model, "yaml") else len(model.model)
    for i, layer in enumerate(model.model[:n_backbone]):
        if isinstance(layer, nn.Sequential):
            for j, block in enumerate(layer):
                yield f"model.{i}.{j}", block
        else:
            yield f"model.{i}", layer


def _blocks_after_stem(model: nn.Module, stem_cls: type, arch: str) -> tuple[list[tuple[str, nn.Module]], str]:
    """The backbone's (prefix, block) list and the stem's prefix, after checking layer 0 is ``stem_cls``."""
    blocks = list(_backbone_blocks(model))
    prefix, stem = blocks[0]
    if not isinstance(stem, stem_cls):
        raise BackboneMismatchError(f"{arch}: backbone layer 0 must be {stem_cls.__name__}, got {type(stem).__name__}")
    return blocks, prefix


def _mobilenet_v3_map(model: nn.Module, source: dict[str, torch.Tensor]) -> dict[str, str]:
    """features.0 -> stem; features.i.block.j -> [expand?, dw, se?, project] of our i-th bneck."""
    blocks, prefix = _blocks_after_stem(model, ConvBNHswish, "mobilenet_v3")
    key_map = _conv_bn("features.0", prefix)
    n_source = _count_indexed(source, r"features\.(\d+)\.block\.") - 1  # features.1 .. features.n
    ours = [(p, b) for p, b in blocks[1:] if isinstance(b, MobileNetV3Block)]
    if len(ours) < n_source:
        raise BackboneMismatchError(f"mobilenet_v3: the file has {n_source} inverted residuals, the model's backbone "
                         f"{len(ours)}; the YAML does not reproduce this torchvision layout")
    for i, (prefix, block) in enumerate(ours[:n_source], start=1):
        parts = [("expand", not isinstance(block.expand, nn.Identity)), ("dw", True),
                 ("se", not isinstance(block.se, nn.Identity)), ("project", True)]
        present = [name for name, used in parts if used]
        for j, name in enumerate(present):
            src, dst = f"features.{i}.block.{j}", f"{prefix}.{name}"
            key_map.update(_se(src, dst) if name == "se" else _conv_bn(src, dst))
    return key_map


_SHUFFLE_BRANCH1 = {"0": "dw_conv", "1": "dw_bn", "2": "pw_conv", "3": "pw_bn"}
_SHUFFLE_BRANCH2 = {"0": "pw1_conv", "1": "pw1_bn", "3": "dw_conv", "4": "dw_bn", "5": "pw2_conv", "6": "pw2_bn"}


def _shufflenet_v2_map(model: nn.Module, source: dict[str, torch.Tensor]) -> dict[str, str]:
    """conv1 -> ShuffleStem; stage{2,3,4}.k -> the ShuffleBlocks in network order, strides checked."""
    blocks, prefix = _blocks_after_stem(model, ShuffleStem, "shufflenet_v2")
    key_map = {"conv1.0.weight": f"{prefix}.conv.weight", **_plain_bn("conv1.1", f"{prefix}.bn")}
    units = [f"stage{s}.{k}" for s in (2, 3, 4) for k in range(_count_indexed(source, rf"stage{s}\.(\d+)\."))]
    ours = [(p, b) for p, b in blocks[1:] if isinstance(b, ShuffleBlock)]
    if len(ours) < len(units):
        raise BackboneMismatchError(f"shufflenet_v2: the file has {len(units)} units, the model's backbone {len(ours)}")
    for unit, (dst, block) in zip(units, ours):
        source_stride = 2 if f"{unit}.branch1.0.weight" in source else 1
        if source_stride != block.stride:
            raise BackboneMismatchError(f"shufflenet_v2: {unit} has stride {source_stride} but {dst} has "
                                        f"{block.stride}")
        for branch, names in (("branch1", _SHUFFLE_BRANCH1), ("branch2", _SHUFFLE_BRANCH2)):
            if branch == "branch1" and block.stride == 1:
                continue
            for index, name in names.items():
                keys = ("weight",) if name.endswith("conv") else BN_KEYS
                key_map.update({f"{unit}.{branch}.{index}.{k}": f"{dst}.{branch}.{name}.{k}" for k in keys})
    return key_map


def _efficientnet_b0_map(model: nn.Module, source: dict[str, torch.Tensor]) -> dict[str, str]:
    """features.0 -> EfficientStem; features.s.b.block.j -> [expand?, dw, (SE skipped), project]."""
    blocks, prefix = _blocks_after_stem(model, EfficientStem, "efficientnet_b0")
    key_map = _conv_bn("features.0", prefix)
    stage_sizes = {s: _count_indexed(source, rf"features\.{s}\.(\d+)\.") for s in range(1, 8)}
    units = [f"features.{s}.{b}" for s, size in stage_sizes.items() for b in range(size)]
    ours = [(p, b) for p, b in blocks[1:] if isinstance(b, MBConv)]
    if len(ours) < len(units):
        raise BackboneMismatchError(f"efficientnet_b0: the file has {len(units)} MBConvs, the model's backbone "
                                    f"{len(ours)}")
    for unit, (dst, block) in zip(units, ours):
        expands = not isinstance(block.expand, nn.Identity)
        names = ["expand", "dw", None, "project"] if expands else ["dw", None, "project"]  # None: B0's SE
        for j, name in enumerate(names):
            if name is not None:
                key_map.update(_conv_bn(f"{unit}.block.{j}", f"{dst}.{name}"))
    return key_map


MAPPERS = {
    "mobilenet_v3_small": _mobilenet_v3_map,
    "mobilenet_v3_large": _mobilenet_v3_map,
    "shufflenet_v2_x1_0": _shufflenet_v2_map,
    "efficientnet_b0": _efficientnet_b0_map,
}


def _count_indexed(source: dict[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` over the source keys (0 if none match)."""
    indices = [int(m.group(1)) for key in source if (m := re.match(pattern, key))]
    return max(indices) + 1 if indices else 0


def build_key_map(model: nn.Module, source: dict[str, torch.Tensor], arch: str) -> dict[str, str]:
    """torchvision key -> our key for every tensor of ``arch`` our backbone has a counterpart for."""
    if arch not in MAPPERS:
        raise BackboneMismatchError(f"unsupported arch '{arch}'; supported: {', '.join(ARCHS)}")
    return MAPPERS[arch](model, source)


def _read_state_dict(pth_path: Path, arch: str) -> dict[str, torch.Tensor]:
    if not pth_path.is_file():
        raise MissingFileError(
            f"{pth_path} not found. This tool never downloads weights: on a machine with internet run\n"
            f"  torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), '{pth_path.name}')\n"
            f"and copy the file to {pth_path.resolve()}")
    from utils.weights.checkpoint import read_checkpoint

    state = read_checkpoint(pth_path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def arch_from_file_name(pth_path: str | Path) -> str:
    """The torchvision architecture a ``.pth`` file is named after (``mobilenet_v3_small.pth``, also with a
    prefix or suffix such as ``imagenet-mobilenet_v3_small-v1.pth``); train.py's ``--weights x.pth`` uses it."""
    stem = Path(pth_path).stem.lower().replace("-", "_")
    matches = [arch for arch in ARCHS if arch in stem]
    if len(matches) != 1:
        raise FlagError(f"--weights {pth_path}: name the torchvision state_dict file after its architecture, one "
                        f"of {', '.join(f'{a}.pth' for a in ARCHS)}, so that the backbone map is known")
    return matches[0]


def load_torchvision_backbone(model: nn.Module, pth_path: str | Path, arch: str) -> TransferResult:
    """Copy a torchvision ``state_dict`` file into ``model``'s backbone; returns what was transferred.

    Raises ``ValueError`` naming both keys on any shape mismatch (nothing is copied then), and
    ``FileNotFoundError`` saying how to produce the file when it is missing. The transferred BatchNorm
    layers get torchvision's eps, since their running statistics were computed with it.
    """
    source = _read_state_dict(Path(pth_path), arch)
    key_map = build_key_map(model, source, arch)
    target = model.state_dict()
    for src, dst in key_map.items():
        if src not in source:
            raise BackboneMismatchError(f"{arch}: key '{src}' expected by the layer map is missing from {pth_path}")
        if dst not in target:
            raise BackboneMismatchError(f"{arch}: layer map names '{dst}', which the model does not have")
        if source[src].shape != target[dst].shape:
            raise BackboneMismatchError(f"{arch}: shape mismatch for '{src}' {tuple(source[src].shape)} -> '{dst}' "
                             f"{tuple(target[dst].shape)}")
    with torch.no_grad():
        for src, dst in key_map.items():
            target[dst].copy_(source[src])
    _set_bn_eps(model, {dst.rsplit(".", 1)[0] for dst in key_map.values()}, TORCHVISION_BN_EPS[arch])
    result = TransferResult(len(key_map), len(target), sorted(set(source) - set(key_map)))
    LOGGER.info("Transferred %d/%d items from %s (%s; %d source tensors unused)",
                result.transferred, result.total, pth_path, arch, len(result.unused))
    return result


def _set_bn_eps(model: nn.Module, prefixes: set[str], eps: float) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and name in prefixes:
            module.eps = eps

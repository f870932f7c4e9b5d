"""Folding BatchNorm into the convolution that feeds it, for any model: the pairs are read from the graph of one
eval forward, not from a list of block classes.

Why a recorded forward: a zoo block may keep its BatchNorms in an ``nn.Sequential``, under its own attribute names,
or (a YAML ``nn.BatchNorm2d`` row) in another layer than its convolution; only the computation says which
convolution feeds which BatchNorm and whether anything else reads that convolution's output. The ATen ops of one
eval forward (``TorchDispatchMode``, the level ``torch.export`` traces at) say it for every model that runs, with
no tracing restrictions, at the cost of one small forward: ~0.4 s for yolov5s on a CPU (``torch.fx``'s
``make_fx`` builds the same graph as an ``fx.Graph`` but took ~2 s; ``torch.fx.symbolic_trace`` cannot follow
``Detect``'s shape-dependent decoding).

A pair is folded when, in that forward:

* an ``nn.Conv2d`` and an ``nn.BatchNorm2d`` (affine, with running statistics) each ran exactly once and each
  is reachable under one name only (folding a shared module would change its other uses);
* each module computed exactly one op from its own input and its own tensors (a convolution with padding
  modes other than zeros, or a subclass that does more, is left alone);
* the BatchNorm read the convolution's output, and no other op read it (nor is it a model output).

Everything else stays, in particular a BatchNorm fed by a concatenation or any op other than one convolution.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from utils.common.torch_utils import fuse_conv_and_bn

__all__ = ["ConvBN", "conv_bn_pairs", "fold_conv_bn"]


@dataclass(frozen=True)
class ConvBN:
    """A foldable pair by qualified module names (``model.1.branch2.pw1_conv``, ``model.1.branch2.pw1_bn``)."""

    conv: str
    bn: str


class _OpRecorder(TorchDispatchMode):
    """Records, for every ATen op a forward runs, which op produced each tensor and how many ops read it.

    Tensors are keyed by ``id``; every tensor seen is kept alive until the recorder goes, so no id is reused.
    """

    def __init__(self):
        super().__init__()
        self.producer: dict[int, tuple] = {}  # id(tensor) -> positional arguments of the op that made it
        self.reads: Counter[int] = Counter()
        self._alive: list[torch.Tensor] = []

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No: the recorder runs in eager code only, and wrapping it in ``torch._dynamo.disable`` would import
        Dynamo on first use (~2 s, more than the whole recording, on every ``val.py`` start)."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.read(tree_leaves((args, kwargs)))
        for tensor in _tensors(tree_leaves(out)):
            self.producer.setdefault(id(tensor), args)  # an in-place op returns its input: keep who made it
            self._alive.append(tensor)
        return out

    def read(self, leaves: list[Any]) -> None:
        for tensor in _tensors(leaves):
            self.reads[id(tensor)] += 1
            self._alive.append(tensor)


def _tensors(leaves: list[Any]) -> list[torch.Tensor]:
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _record_calls(model: nn.Module, example: torch.Tensor) -> tuple[_OpRecorder, dict[nn.Module, list[tuple]]]:
    """One eval, no-grad forward of ``model`` on ``example`` with the ops recorded and, per Conv2d/BatchNorm2d,
    the (input, output) of each call. Training flags are restored afterwards, module by module."""
    calls: dict[nn.Module, list[tuple]] = {}
    leaves = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    hooks = [m.register_forward_hook(_remember_call(calls)) for m in leaves]
    modes = {m: m.training for m in model.modules()}
    recorder = _OpRecorder()
    try:
        model.eval()
        with torch.no_grad(), recorder:
            output = model(example)
            recorder.read(tree_leaves(output))  # a model output has a reader outside the graph
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return recorder, calls


def _remember_call(calls: dict[nn.Module, list[tuple]]):
    """A forward hook appending (positional input or None, output) to ``calls[module]``."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        calls.setdefault(module, []).append((args[0] if args else None, output))

    return hook


def _single_call(calls: dict[nn.Module, list[tuple]], module: nn.Module) -> tuple | None:
    made = calls.get(module, [])
    return made[0] if len(made) == 1 else None


def _is_one_op(recorder: _OpRecorder, call: tuple, own: tuple) -> bool:
    """The module's output came from one op whose leading arguments are its input and its own tensors."""
    x, y = call
    args = recorder.producer.get(id(y), ())
    expected = (x, *own)
    return len(args) >= len(expected) and all(a is b for a, b in zip(args, expected))


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[ConvBN]:
    """The Conv2d -> BatchNorm2d pairs of ``model`` that :func:`fold_conv_bn` can fold exactly (see the module
    docstring for the rule), found from one forward on ``example``; ``model`` is left as it was."""
    recorder, calls = _record_calls(model, example)
    aliases = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {m: name for name, m in model.named_modules()}
    conv_by_output: dict[int, nn.Module] = {}
    for module in calls:
        call = _single_call(calls, module)
        if isinstance(module, nn.Conv2d) and call and _is_one_op(recorder, call, (module.weight, module.bias)):
            conv_by_output[id(call[1])] = module
    pairs = []
    for bn in calls:
        call = _single_call(calls, bn)
        if not (isinstance(bn, nn.BatchNorm2d) and call and bn.affine and bn.track_running_stats):
            continue
        conv = conv_by_output.get(id(call[0]))
        if conv is None or recorder.reads[id(call[0])] != 1 or aliases[id(conv)] != 1 or aliases[id(bn)] != 1:
            continue
        if _is_one_op(recorder, call, (bn.weight, bn.bias, bn.running_mean, bn.running_var)):
            pairs.append(ConvBN(names[conv], names[bn]))
    return pairs


@torch.no_grad()
def fold_conv_bn(model: nn.Module, pairs: list[ConvBN]) -> nn.Module:
    """Replace each pair's convolution with ``fuse_conv_and_bn(conv, bn)`` (eval-mode BN folded into its weight
    and bias) and its BatchNorm with ``nn.Identity``, in place; the module names stay, so state-dict keys do."""
    for pair in pairs:
        conv, bn = model.get_submodule(pair.conv), model.get_submodule(pair.bn)
        model.set_submodule(pair.conv, fuse_conv_and_bn(conv, bn).train(conv.training))
        model.set_submodule(pair.bn, nn.Identity())
    return model

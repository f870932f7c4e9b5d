"""Module registry: every block a YAML row may name, with how that row becomes constructor arguments.

A YAML row is ``[from, n, Module, args]``. What differs between blocks is only *how* the row is bound:

* whether the constructor takes the input channels first (``c1``),
* which YAML arguments are channel counts that ``width_multiple`` scales (``width_args``),
* whether the depth repeat ``n`` is handed to the constructor (``repeat="inner"``: C3, BottleneckCSP),
  repeats the whole block (``"outer"``) or is meaningless (``"fixed"``),
* how the output channel count follows (``out``),
* how the block couples channels (``coupling``) and which of its channels the pruning tools must keep
  (``pruning``),
* for a head, which task a model ending in it performs (``task``: "detect", "classify"); everything that needs
  to know asks :func:`task_of`, which reads this declaration,
* a small YAML row it builds from (``example``) and whether it exports to ONNX (``onnx``), which the contract
  test (``tests/test_registry.py``) reads to build, run and export every registered block.

Each block declares this once with :func:`register`; ``parse_model`` reads the declarations and never lists
classes. Adding a block therefore means one class plus one decorator.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

Repeat = Literal["inner", "outer", "fixed"]
# How output channels relate to input channels, read by the pruning tools (roadmap item 7):
#   "free"      output channels can shrink independently (Conv, C3's cv3, ...)
#   "tied"      output channels equal input channels and must shrink with them (depthwise, attention, BN)
#   "rearrange" output holds the input's values, regrouped into more or fewer channels (Contract, Expand)
#   "concat"    output is the concatenation of the inputs
#   "head"      a prediction head; its outputs are fixed by the task
Coupling = Literal["free", "tied", "rearrange", "concat", "head"]


@dataclass(frozen=True)
class Pruning:
    """Which channels of a block channel pruning (:mod:`utils.compress.prune`) must keep.

    The couplings *between* channels (residual adds, concatenations, depthwise convs, gates) are found by
    tracing the model; what a trace cannot see is declared here, once per block:

    * ``whole``: sub-modules (dotted paths relative to the block, ``*`` wildcards; ``""`` is the whole block)
      none of whose channels may be removed, nor any channel coupled to them. For blocks whose forward
      depends on the channel count beyond the weights' shapes: reductions over channels (CBAM's spatial
      branch), reshapes by head count (attention), channel shuffles, LayerNorm over channels, grouped convs.
    * ``fixed_outputs``: sub-modules whose output channels are fixed by the task (a head's predictions);
      their input channels may still shrink.
    * ``scalar_params``: bare ``nn.Parameter`` attributes that hold no per-channel values (BiFPN's one weight
      per input); the trace would otherwise guess a channel dimension for them and couple it to channels.
    """

    whole: tuple[str, ...] = ()
    fixed_outputs: tuple[str, ...] = ()
    scalar_params: tuple[str, ...] = ()


PRUNE_FREELY = Pruning()
KEEP_WHOLE = Pruning(whole=("",))


@dataclass(frozen=True, eq=False)
class Example:
    """A one-line YAML use of a block: what the registry contract test builds, runs and exports.

    The test makes each input with a ``Conv`` row from a 3-channel image (``inputs`` gives their channels,
    multiples of 8 as the stem rounds to 8; a multi-input block reads all of them, all of one size) and then
    adds ``[from, n, <name>, args]``. ``symbols`` are the
    top-level YAML keys the arguments name (``nc``, ``anchors``, ``heads``), so heads build exactly as in a
    model YAML. Keep channels small: the contract test runs every registered block.
    """

    args: list = field(default_factory=list)
    inputs: tuple[int, ...] = (16,)
    n: int = 1
    symbols: dict[str, Any] = field(default_factory=dict)


def as_examples(example: list | Example | Sequence[Example] | None) -> tuple[Example, ...]:
    """``example=`` as :func:`register` accepts it -> a tuple of :class:`Example` (empty when not declared).

    A plain list is the YAML arguments of one example on a single 16-channel input; several examples are
    for blocks whose sub-modules differ between variants (a declared pruning path may exist in one only).
    """
    if example is None:
        return ()
    if isinstance(example, Example):
        return (example,)
    if isinstance(example, list):
        return (Example(args=example),)
    if isinstance(example, tuple) and example and all(isinstance(e, Example) for e in example):
        return example
    raise TypeError(f"example must be a list of YAML args, an Example or a tuple of Examples, got {example!r}")


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round channels up to a multiple of ``divisor`` (hardware-friendly widths, as YOLOv5 does)."""
    return int(math.ceil(x / divisor) * divisor)


@dataclass(frozen=True)
class BuildContext:
    """Model-wide values a row may refer to: multipliers and the names allowed in YAML arguments."""

    depth_multiple: float = 1.0
    width_multiple: float = 1.0
    symbols: dict[str, Any] = field(default_factory=dict)  # nc, anchors, nc1..., heads


def out_first_arg(c_in: Sequence[int], args: list) -> int:
    """Output channels are the constructor's second argument (after c1): Conv, C3, SPPF, ..."""
    return args[1]


def out_same(c_in: Sequence[int], args: list) -> int:
    """Output channels equal the (single) input's: Upsample, BatchNorm2d, attention blocks."""
    return c_in[0]


def out_sum(c_in: Sequence[int], args: list) -> int:
    """Concatenation: output channels are the sum of all inputs."""
    return sum(c_in)


def out_none(c_in: Sequence[int], args: list) -> int:
    """Heads end the graph; nothing consumes their channels."""
    return 0


@dataclass(frozen=True)
class ModuleSpec:
    """How one registered block consumes a YAML row."""

    name: str
    cls: type[nn.Module]
    c1: bool = True
    width_args: tuple[int, ...] = (0,)
    repeat: Repeat = "outer"
    out: Callable[[Sequence[int], list], int] = out_first_arg
    coupling: Coupling = "free"
    multi_input: bool = False
    bind_fn: Callable[[ModuleSpec, list[int], list, BuildContext, int], tuple[list, int]] | None = None
    pruning: Pruning = PRUNE_FREELY
    task: str | None = None  # heads: the task of a model that ends in this block
    examples: tuple[Example, ...] = ()  # see Example; the contract test fails a block that declares none
    onnx: bool = True  # the block exports to ONNX and ONNX Runtime reproduces it (the contract test checks)

    def bind(self, c_in: list[int], args: list, ctx: BuildContext, n: int) -> tuple[list, int]:
        """Turn YAML args into constructor args; returns ``(ctor_args, n_outer)``.

        ``n_outer`` is how many times ``parse_model`` stacks the block (1 when the block repeats inside).
        """
        if self.bind_fn is not None:
            return self.bind_fn(self, c_in, args, ctx, n)
        args = list(args)
        for i in self.width_args:
            if i < len(args) and isinstance(args[i], int):
                args[i] = make_divisible(args[i] * ctx.width_multiple, 8)
        if self.c1:
            args.insert(0, c_in if self.multi_input else c_in[0])
        if self.repeat == "inner":
            args.insert(2 if self.c1 else 1, n)
            return args, 1
        if self.repeat == "fixed":
            return args, 1
        return args, n

    def out_channels(self, c_in: list[int], ctor_args: list) -> int:
        return self.out(c_in, ctor_args)

    def signature(self) -> str:
        return f"{self.name}{inspect.signature(self.cls)}"


class Registry:
    """Name -> ModuleSpec. YAML module names resolve only through here (no ``eval``)."""

    def __init__(self) -> None:
        self._specs: dict[str, ModuleSpec] = {}

    def add(self, spec: ModuleSpec, aliases: Sequence[str] = ()) -> None:
        for key in (spec.name, *aliases):
            if key in self._specs and self._specs[key].cls is not spec.cls:
                raise KeyError(f"module name '{key}' is registered twice")
            self._specs[key] = spec

    def get(self, name: str) -> ModuleSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown module '{name}'; known: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def spec_for(self, cls: type) -> ModuleSpec | None:
        """The spec registered for exactly ``cls`` (None when the class is not a registered block)."""
        return next((spec for spec in self._specs.values() if spec.cls is cls), None)
    def remove(self, name: str) -> ModuleSpec:
        """Unregister ``name`` and every alias of its class (a block registered for a test, then dropped)."""
        spec = self.get(name)
        for key in [k for k, s in self._specs.items() if s.cls is spec.cls]:
            del self._specs[key]
        return spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ModuleSpec]:
        """Unique specs (aliases collapsed), in registration order."""
        seen: dict[type, ModuleSpec] = {}
        for spec in self._specs.values():
            seen.setdefault(spec.cls, spec)
        return list(seen.values())

    def classes(self) -> list[type[nn.Module]]:
        return [spec.cls for spec in self.specs()]


REGISTRY = Registry()


def register(
    *,
    name: str | None = None,
    aliases: Sequence[str] = (),
    c1: bool = True,
    width_args: tuple[int, ...] = (0,),
    repeat: Repeat = "outer",
    out: Callable[[Sequence[int], list], int] = out_first_arg,
    coupling: Coupling = "free",
    multi_input: bool = False,
    bind_fn: Callable | None = None,
    pruning: Pruning = PRUNE_FREELY,
    task: str | None = None,
    example: list | Example | Sequence[Example] | None = None,
    onnx: bool = True,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: declare how a block is built from a YAML row (see module docstring).

    ``example`` is a small row's YAML arguments (``[64, 3, 2]``), or an :class:`Example` (several input
    layers, a repeat, YAML symbols), or a tuple of them; ``onnx=False`` says the block does not export to
    ONNX. Both are read by the registry contract test, which builds every registered block from its example.
    """

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        spec = ModuleSpec(
            name=name or cls.__name__,
            cls=cls,
            c1=c1,
            width_args=width_args,
            repeat=repeat,
            out=out,
            coupling=coupling,
            multi_input=multi_input,
            bind_fn=bind_fn,
            pruning=pruning,
            task=task,
            examples=as_examples(example),
            onnx=onnx,
        )
        REGISTRY.add(spec, aliases)
        return cls

    return wrap


def register_external(cls: type[nn.Module], **kwargs: Any) -> None:
    """Register a class we do not own (``torch.nn`` layers) under its YAML names."""
    register(**kwargs)(cls)


def task_of(model_or_cfg: nn.Module | str | Path | dict) -> str:
    """'detect' or 'classify': the ``task`` that the registry entry of the model's head declares.

    ``model_or_cfg`` is a model (its last layer; a stand-in head, such as a quantization-aware model's, names the
    registered head it stands for in ``stands_for``) or a model YAML (path, bare name or dict: its last row).
    This is the one place that answers the question; everything else asks here.
    """
    from models.yaml_config import ModelConfigError, layer_rows, load_model_yaml

    if isinstance(model_or_cfg, nn.Module):
        head = model_or_cfg.model[-1] if hasattr(model_or_cfg, "model") else model_or_cfg
        head_class = getattr(head, "stands_for", type(head))
        spec, where = REGISTRY.spec_for(head_class), f"the model's last layer ({head_class.__name__})"
    else:
        cfg = load_model_yaml(model_or_cfg)
        rows = layer_rows(cfg)  # a YAML without its sections or with malformed rows is refused here, by name
        if not rows:
            raise ModelConfigError(f"{cfg.get('yaml_file', '<dict>')}: no layers in 'backbone' and 'head'")
        name = rows[-1][1][2]
        spec = REGISTRY.get(name) if name in REGISTRY else None
        where = f"{cfg.get('yaml_file', '<dict>')}: the last layer ({name})"
    if spec is None or spec.task is None:
        heads = sorted({s.name for s in REGISTRY.specs() if s.task})
        raise ModelConfigError(f"{where} is not the head of a known task; a model must end in one of "
                               f"{', '.join(heads)}")
    return spec.task

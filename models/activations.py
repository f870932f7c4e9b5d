"""Activation chosen by name per model build.

YOLOv5 v7.0 set the activation by assigning a class attribute (``Conv.default_act = eval(act)``), which leaks
into every model built later in the same process. Here the builder opens an :func:`activation_scope` for the
duration of one ``parse_model`` call; blocks ask :func:`make_activation` for a fresh module. Outside a scope
the default is SiLU, as in YOLOv5 v6+.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator

from torch import nn

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "SiLU": nn.SiLU,
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": nn.LeakyReLU,
    "Hardswish": nn.Hardswish,
    "Hardsigmoid": nn.Hardsigmoid,
    "Mish": nn.Mish,
    "GELU": nn.GELU,
    "Sigmoid": nn.Sigmoid,
    "Identity": nn.Identity,
}

_SPEC = re.compile(r"^\s*(?:nn\.)?(?P<name>\w+)\s*(?:\((?P<args>.*)\))?\s*$")
_current: contextvars.ContextVar[tuple[str, tuple]] = contextvars.ContextVar("activation", default=("SiLU", ()))


def parse_activation(spec: str) -> tuple[str, tuple]:
    """``'nn.LeakyReLU(0.1)'`` -> ``('LeakyReLU', (0.1,))``; only names in :data:`ACTIVATIONS` are accepted."""
    match = _SPEC.match(spec or "")
    if not match or match["name"] not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{spec}'; known: {', '.join(ACTIVATIONS)}")
    raw = match["args"]
    args = ast.literal_eval(f"({raw},)") if raw and raw.strip() else ()
    return match["name"], tuple(args)


@contextlib.contextmanager
def activation_scope(spec: str | None) -> Iterator[None]:
    """Blocks built inside use ``spec`` (e.g. ``'nn.ReLU()'``); the previous choice is restored after."""
    token = _current.set(parse_activation(spec) if spec else ("SiLU", ()))
    try:
        yield
    finally:
        _current.reset(token)


def make_activation() -> nn.Module:
    """A new instance of the activation in force (inplace where the class supports it)."""
    name, args = _current.get()
    cls = ACTIVATIONS[name]
    if name in {"SiLU", "ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "Mish"} and not args:
        return cls(inplace=True)
    if name == "LeakyReLU":
        return cls(*args, inplace=True) if args else cls(0.1, inplace=True)
    return cls(*args)


def current_activation_name() -> str:
    return _current.get()[0]

"""A fake latency runtime for tests: each model's batch-1 latency is known exactly (a cost per MAC that differs 5x
between layers, so time is not FLOPs, plus fixed per-layer and per-call costs), its per-node profile is exact,
and it records the input size of every model it opens. Registered with
:func:`utils.compress.prune.runtimes.registered_runtime` for the duration of a test, it stands in for ONNX Runtime
or OpenVINO wherever a latency budget is measured (the pruning tools, the peer, benchmarks/compress.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from utils.compress.prune.runtimes import Runtime

IMGSZ = 64  # the size the fake's costs are counted at


def conv_macs(model: nn.Module, imgsz: int = IMGSZ) -> dict[int, float]:
    """MACs of each layer's convolutions, counted by hooks on the model itself (independent of CostModel)."""
    totals: dict[int, float] = {}
    hooks = []
    for index, layer in enumerate(model.model):
        for module in layer.modules():
            if isinstance(module, nn.Conv2d):
                def hook(conv, inputs, output, index=index):
                    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
                    totals[index] = totals.get(index, 0.0) + float(output.numel() * per_output)
                hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, imgsz, imgsz))
    for h in hooks:
        h.remove()
    return totals


def per_mac(layer: int) -> float:
    """The fake's known cost of one MAC in ``layer`` (ms): layers differ by 5x, so time is not FLOPs."""
    return (1 + 4 * (layer % 3 == 0)) * 1e-6


FREE_LAYER_MS = 0.05  # a layer without convolutions (Concat, Upsample)
UNMAPPED_MS = 0.1  # a node named after no layer
CALL_MS = 0.2  # per-call overhead no profile shows


def fake_ms(model: nn.Module) -> float:
    """The fake runtime's latency of a (prepared or not) model: the ground truth the tests check plans against."""
    macs = conv_macs(model)
    return (sum(per_mac(i) * m for i, m in macs.items()) + FREE_LAYER_MS * (len(model.model) - len(macs))
            + UNMAPPED_MS + CALL_MS)


def fake_runtime(step: int = 16, name: str = "fake") -> type[Runtime]:
    """A runtime class whose model latency is :func:`fake_ms` and whose conv probes cost one unit per ``step``
    output channels begun; ``profiled`` lists each profile call and ``opened`` the input size of each model opened
    (a fresh class per test: no shared state)."""

    class Fake(Runtime):
        profiled: list[int] = []
        opened: list[int] = []

        def version(self) -> str:
            return "fake 1.0"

        def open(self, model, example, folder, samples=None):
            type(self).opened.append(example.shape[-1])
            return model

        def profile(self, handle, runs):
            type(self).profiled.append(1)
            macs = conv_macs(handle)
            nodes = {f"/model.{i}/conv/Conv": per_mac(i) * macs[i] if i in macs else FREE_LAYER_MS
                     for i in range(len(handle.model))}
            return {**nodes, "ReorderOutput": UNMAPPED_MS}

        def latency(self, handles, runs):
            return [fake_ms(h) if hasattr(h, "yaml") else 0.5 + math.ceil(h[0].out_channels / step)
                    for h in handles]

    Fake.name = name
    return Fake

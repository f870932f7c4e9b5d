"""Which channels of a model can be removed, and which must go together.

Torch-Pruning's dependency graph (DepGraph, Fang et al. CVPR 2023) traces one forward pass and follows every
channel through residual adds, concatenations, splits, depthwise convs and gates; each *group* it returns is a
set of channels that can only be removed together. What a trace cannot know comes from the registry: each
block's :class:`~models.registry.Pruning` declaration names the sub-modules that must keep all their channels
(``whole``) and the head outputs fixed by the task (``fixed_outputs``; a ``coupling="head"`` block without
one keeps every output). A group that touches a kept channel, a leaf we cannot slice (LayerNorm, attention,
grouped convs, bare parameters) or no BatchNorm to rank its channels by is dropped, and the layers it would
have cut are reported as kept whole.

The result is plain data (leaf paths and index tensors), so that pruning a model (:mod:`utils.compress.prune.surgery`)
and loading a pruned one (:mod:`models.channels`) never need the library.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from models.channels import SLICEABLE, is_depthwise, replace_module
from models.registry import REGISTRY, ModuleSpec, Pruning

Axis = Literal["out", "in"]


@dataclass(frozen=True)
class Member:
    """One leaf's share of a group: channel ``index[k]`` of its ``axis`` belongs to group channel ``root[k]``."""

    path: str  # below the layer list, e.g. "2.cv1.conv"
    axis: Axis
    index: torch.Tensor
    root: torch.Tensor

    @property
    def layer(self) -> int:
        return int(self.path.split(".", 1)[0])


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together; ``size`` group channels, each present in every member."""

    name: str  # the leaf whose output channels the group is rooted at
    size: int
    members: tuple[Member, ...]

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.members})


@dataclass
class ChannelAnalysis:
    """Prunable groups of a model, and what was kept whole (layer index -> reasons) for the report."""

    groups: list[ChannelGroup]
    kept_whole: dict[int, set[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Constraints:
    whole: frozenset[str]  # leaf paths none of whose channels may go
    fixed_outputs: frozenset[str]  # leaf paths whose output channels may not go
    reasons: dict[str, str]  # leaf path -> why (for the report)


def trace_channels(model: nn.Module, imgsz: int = 64) -> ChannelAnalysis:
    """The groups Torch-Pruning's trace finds, filtered by the registry's declarations (no numerical check)."""
    import torch_pruning as tp

    layers = model.model
    constraints = declared_constraints(layers)
    weight = next(model.parameters())
    example = torch.zeros(1, model.yaml.get("ch", 3), imgsz, imgsz, dtype=weight.dtype, device=weight.device)
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    try:
        for p in frozen:  # the trace follows autograd; loaded checkpoints often come with gradients off
            p.requires_grad_(True)
        with _stubbed(model, _outermost(constraints.whole), example):
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, forward_fn=forward_with_raw_heads, output_transform=flatten_outputs,
                verbose=False, ignored_params=declared_scalar_params(layers))
            names = {module: path for path, module in layers.named_modules()}
        analysis = ChannelAnalysis(groups=[])
        for path in _outermost(constraints.whole):
            analysis.kept_whole.setdefault(int(path.split(".", 1)[0]), set()).add(constraints.reasons[path])
        for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            _add_group(analysis, group, graph, names, constraints, layers)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return analysis


def forward_with_raw_heads(model: nn.Module, example: torch.Tensor) -> Any:
    """The traced forward pass (Torch-Pruning has just put the model in eval mode): the heads
    (``coupling="head"``) return their raw predictions, as in training.

    An eval-mode ``Detect`` also decodes: it reshapes every level to (batch, cells, outputs) and concatenates the
    levels along the cells. The trace follows that concatenation as if it joined channels, and Torch-Pruning's
    index maps through it cost more the more cells and levels there are (one prediction conv of a P2 detector
    took minutes to group at 64 px). The decoding holds no parameters and only rearranges the prediction convs'
    outputs, whose channels are fixed by the task anyway, so leaving it out changes no group. Only the head's own
    flag is set (not its children's): BatchNorm layers inside a head stay in eval mode and keep their statistics.
    """
    specs = {spec.cls: spec for spec in REGISTRY.specs()}
    for layer in model.model:
        spec = specs.get(type(layer))
        if spec is not None and spec.coupling == "head":
            layer.training = True
    return model(example)


class _TraceStub(nn.Conv2d):
    """Stands in for a kept-whole block while Torch-Pruning traces: a 1x1 conv with the block's input and output
    channels and output size. The trace then sees one node coupling the block's inputs and outputs (every group
    touching them is dropped, as the block's path is kept whole) and never the block's reshapes and splits,
    which can defeat it (a channel shuffle crashes the trace)."""

    def __init__(self, c_in: int, c_out: int, out_size: tuple[int, int]):
        super().__init__(c_in, c_out, 1, bias=False)
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(super().forward(x), size=self.out_size)


@contextlib.contextmanager
def _stubbed(model: nn.Module, paths: list[str], example: torch.Tensor) -> Iterator[None]:
    """Replace the modules at ``paths`` (below ``model.model``) by trace stubs for the duration of the block."""
    layers = model.model
    shapes: dict[str, tuple[int, int, tuple[int, int]]] = {}

    def recorder(path: str):
        def record(_module, inputs, output):
            if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                shapes[path] = (inputs[0].shape[1], output.shape[1], tuple(output.shape[2:]))
        return record

    hooks = [layers.get_submodule(path).register_forward_hook(recorder(path)) for path in paths]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    originals = {path: layers.get_submodule(path) for path in shapes}
    weight = example
    for path, (c_in, c_out, size) in shapes.items():
        stub = _TraceStub(c_in, c_out, size).to(weight.device, weight.dtype)
        for attribute in ("i", "f", "type", "np"):  # a whole layer: the model's forward reads these
            if hasattr(originals[path], attribute):
                setattr(stub, attribute, getattr(originals[path], attribute))
        replace_module(layers, path, stub)
    try:
        yield
    finally:
        for path, module in originals.items():
            replace_module(layers, path, module)


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """Every tensor a model returns (Detect: decoded + raw maps; multi-head classifiers: a dict)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in flatten_outputs(item)]


def _add_group(analysis: ChannelAnalysis, group: Any, graph: Any, names: dict, constraints: _Constraints,
               layers: nn.Module) -> None:
    members: list[Member] = []
    problem = ""
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            problem = problem or f"couples to a bare parameter ({graph._param_to_name.get(module, '?')})"
            continue
        if module not in names:
            continue  # Torch-Pruning's own nodes for concat, split and element-wise ops
        path = names[module]
        axis: Axis = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        problem = problem or _member_problem(module, path, axis, constraints)
        members.append(Member(path, axis, torch.tensor(item.idxs), torch.tensor(item.root_idxs)))
    if not any(isinstance(layers.get_submodule(m.path), nn.BatchNorm2d) for m in members):
        return  # nothing to rank these channels by (e.g. an SE block's squeeze width); not a pruning target
    if problem:
        for layer in sorted({m.layer for m in members if m.axis == "out"}):
            analysis.kept_whole.setdefault(layer, set()).add(problem)
        return
    root = members[0]
    analysis.groups.append(ChannelGroup(root.path, int(root.root.max()) + 1, tuple(members)))


def uniform_map(roots: torch.Tensor) -> bool:
    """Each group channel a member holds sits at the same number of its positions (a concatenation's inputs
    each hold only part of a group's channels, but every channel they hold the same number of times)."""
    counts = torch.bincount(roots)
    present = counts[counts > 0]
    return bool((present == present[0]).all())


def _member_problem(module: nn.Module, path: str, axis: Axis, constraints: _Constraints) -> str:
    """Why this member makes its group unprunable ('' when it does not)."""
    if path in constraints.whole:
        return constraints.reasons[path]
    if axis == "out" and path in constraints.fixed_outputs:
        return constraints.reasons[path]
    if not isinstance(module, SLICEABLE):
        return f"couples to a {type(module).__name__} ({path})"
    if isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module):
        return f"couples to a grouped convolution ({path})"
    return ""


def declared_constraints(layers: nn.Module) -> _Constraints:
    """Module paths the registry's ``Pruning`` declarations protect, found by walking every registered block."""
    specs = {spec.cls: spec for spec in REGISTRY.specs()}
    whole: set[str] = set()
    fixed: set[str] = set()
    reasons: dict[str, str] = {}
    for block_path, block in layers.named_modules():
        spec = specs.get(type(block))
        if spec is None:
            continue
        policy = _effective_policy(spec)
        for sub_path, _ in block.named_modules():
            full = f"{block_path}.{sub_path}" if sub_path else block_path
            if _matches(sub_path, policy.whole):
                whole.add(full)
                reasons.setdefault(full, f"{spec.name} keeps its channels ({full})")
            if _matches(sub_path, policy.fixed_outputs):
                fixed.add(full)
                reasons.setdefault(full, f"{spec.name} outputs are fixed by the task")
    return _Constraints(frozenset(whole), frozenset(fixed), reasons)


def _outermost(paths: frozenset[str]) -> list[str]:
    """The paths none of whose parents is in ``paths`` (a kept-whole block, not each of its parts)."""
    return sorted(p for p in paths if not any(p.startswith(f"{q}.") for q in paths))


def declared_scalar_params(layers: nn.Module) -> list[nn.Parameter]:
    """The bare parameters blocks declare free of channels (``Pruning.scalar_params``)."""
    specs = {spec.cls: spec for spec in REGISTRY.specs()}
    found = []
    for block in layers.modules():
        spec = specs.get(type(block))
        if spec is not None:
            found += [getattr(block, name) for name in spec.pruning.scalar_params]
    return found


def _effective_policy(spec: ModuleSpec) -> Pruning:
    """A head that declares nothing keeps all of its outputs."""
    if spec.coupling == "head" and not spec.pruning.fixed_outputs and not spec.pruning.whole:
        return Pruning(fixed_outputs=("",))
    return spec.pruning


def _matches(leaf_path: str, patterns: tuple[str, ...]) -> bool:
    """``''`` matches every leaf of the block; ``'m'`` matches ``m`` and everything below it; ``*`` wildcards."""
    for pattern in patterns:
        if pattern == "" or fnmatch.fnmatchcase(leaf_path, pattern):
            return True
        if fnmatch.fnmatchcase(leaf_path, f"{pattern}.*"):
            return True
    return False


def _where(block_path: str, leaf_path: str) -> str:
    return f"{block_path}.{leaf_path}" if leaf_path else block_path


def batchnorm_members(group: ChannelGroup, layers: nn.Module) -> list[tuple[Member, nn.BatchNorm2d]]:
    """The group's BatchNorm layers, whose scales rank its channels (Network Slimming)."""
    found = []
    for member in group.members:
        module = layers.get_submodule(member.path)
        if isinstance(module, nn.BatchNorm2d):
            found.append((member, module))
    return found


def reduce_to_group(group: ChannelGroup, per_member: list[tuple[Member, torch.Tensor]],
                    how: Literal["max", "sum"] = "max") -> torch.Tensor:
    """One score per group channel from per-member channel scores (``values[k]`` for ``member.index[k]``)."""
    out = torch.zeros(group.size)
    for member, values in per_member:
        picked = values[member.index]
        if how == "max":
            out.scatter_reduce_(0, member.root, picked, reduce="amax", include_self=True)
        else:
            out.scatter_add_(0, member.root, picked)
    return out


def leaves_by_axis(groups: list[ChannelGroup]) -> dict[tuple[str, Axis], list[tuple[int, Member]]]:
    """(leaf path, axis) -> the (group number, member) entries that cut it."""
    table: dict[tuple[str, Axis], list[tuple[int, Member]]] = defaultdict(list)
    for number, group in enumerate(groups):
        for member in group.members:
            table[(member.path, member.axis)].append((number, member))
    return table

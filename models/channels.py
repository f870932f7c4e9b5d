"""Channel surgery on leaf modules, and the ``pruned.widths`` table of a pruned model's YAML.

A pruned model is its original YAML plus a table of the leaves whose widths changed::

    pruned:
      widths:            # leaf (path below the layer list): [out, in] for convs and linears, [n] for norms
        2.cv1.conv: [24, 32]
        2.cv1.bn: [24]

``parse_model`` builds the rows as usual and then gives each listed leaf its width (:func:`apply_widths`), so
a pruned model needs nothing but the YAML and a state_dict to load; the pruning tools produce the table from
the same :func:`slice_leaf` that cuts a trained model's weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

Widths = dict[str, list[int]]
SLICEABLE = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter per input channel: in, out and groups shrink together."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def leaf_widths(module: nn.Module) -> list[int]:
    """The widths the table records for one leaf: ``[out, in]`` or ``[n]``."""
    if isinstance(module, nn.Conv2d):
        return [module.out_channels, module.in_channels]
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features]
    if isinstance(module, nn.BatchNorm2d):
        return [module.num_features]
    raise TypeError(f"{type(module).__name__} has no prunable widths")


def slice_leaf(module: nn.Module, keep_out: torch.Tensor, keep_in: torch.Tensor | None = None) -> nn.Module:
    """A new leaf holding only the kept output (and input) channels of ``module``, weights copied.

    ``keep_in`` is ignored for BatchNorm and depthwise convs, whose inputs are their outputs.
    """
    keep_out = keep_out.long()
    if isinstance(module, nn.BatchNorm2d):
        new = _slice_batchnorm(module, keep_out)
    elif isinstance(module, nn.Conv2d):
        new = _slice_conv(module, keep_out, keep_out if is_depthwise(module) else keep_in.long())
    elif isinstance(module, nn.Linear):
        new = _slice_linear(module, keep_out, keep_in.long())
    else:
        raise TypeError(f"cannot slice channels of {type(module).__name__}")
    return new.train(module.training)


def _slice_conv(conv: nn.Conv2d, keep_out: torch.Tensor, keep_in: torch.Tensor) -> nn.Conv2d:
    depthwise = is_depthwise(conv)
    if conv.groups > 1 and not depthwise:
        raise TypeError(f"grouped convolution (groups={conv.groups}) cannot be sliced channel by channel")
    new = nn.Conv2d(len(keep_in), len(keep_out), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    groups=len(keep_out) if depthwise else 1, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        weight = conv.weight[keep_out]
        new.weight.copy_(weight if depthwise else weight[:, keep_in])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[keep_out])
    return new


def _slice_batchnorm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    reference = bn.running_mean if bn.track_running_stats else bn.weight
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _slice_linear(linear: nn.Linear, keep_out: torch.Tensor, keep_in: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep_in), len(keep_out), bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep_out][:, keep_in])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep_out])
    return new


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` below ``root`` (``'2.cv1.conv'``)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def apply_widths(layers: nn.Module, widths: Mapping[str, Sequence[int]], where: str = "<yaml>") -> None:
    """Give each leaf named in a ``pruned.widths`` table its recorded width (freshly initialised weights).

    Raises ``ValueError`` naming the YAML and the entry when a path or a width does not fit the model.
    """
    for path, sizes in widths.items():
        try:
            module = layers.get_submodule(str(path))
        except AttributeError:
            raise ValueError(f"{where}: pruned.widths names '{path}', which is not a module of this model") from None
        expected = 1 if isinstance(module, nn.BatchNorm2d) else 2
        if not isinstance(module, SLICEABLE) or not _valid_sizes(sizes, expected):
            raise ValueError(f"{where}: pruned.widths['{path}'] = {sizes!r} does not fit its "
                             f"{type(module).__name__} (expected {expected} positive integer(s))")
        current = leaf_widths(module)
        if any(new > old for new, old in zip(sizes, current)):
            raise ValueError(f"{where}: pruned.widths['{path}'] = {list(sizes)} is wider than the YAML's {current}")
        keep_out = torch.arange(sizes[0])
        keep_in = torch.arange(sizes[1]) if expected == 2 else None
        replace_module(layers, str(path), slice_leaf(module, keep_out, keep_in))
    for layer in layers:
        layer.np = sum(p.numel() for p in layer.parameters())


def _valid_sizes(sizes: object, expected: int) -> bool:
    return (isinstance(sizes, (list, tuple)) and len(sizes) == expected
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes))


def widths_table(original: nn.Module, pruned: nn.Module) -> Widths:
    """The ``pruned.widths`` entries: every sliceable leaf of ``pruned`` whose widths differ from ``original``."""
    before = dict(original.named_modules())
    table: Widths = {}
    for path, module in pruned.named_modules():
        if isinstance(module, SLICEABLE) and path in before and leaf_widths(module) != leaf_widths(before[path]):
            table[path] = leaf_widths(module)
    return table

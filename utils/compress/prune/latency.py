"""A latency budget: a plan's batch-1 time on a named runtime, predicted from a per-layer table measured once.

Halving a model's FLOPs does not halve its time (yolov5s at 640, batch 1: 1.48-1.59x on ONNX Runtime, 1.64x
on OpenVINO; docs/prune.md): operators whose cost does not follow the multiply-adds (the stem's image input,
Detect's decoding, upsampling, concatenations, per-operator overhead) stay, and a runtime runs some widths
faster than others. So ``--latency-ms`` / ``--speedup`` budget time itself, measured on the runtime the user
deploys to (:mod:`utils.compress.prune.runtimes`).

**The table.** The model is cut to a few uniform widths (:data:`UNIFORM_WIDTHS`: every group keeps 100, 75,
50, 25 % of its channels, rounded as the plan will be), each is exported for the runtime, profiled per graph
node (the runtime's own counters, so each layer is timed *in context*: its real input layout, fusions and
caches, which timing isolated convolutions would miss) and timed as a whole (batch 1, stated threads,
interleaved rounds). Node names carry the YAML layer they come from (``/model.N/...``), so per-node times sum
to per-layer times.

**The prediction.** Under a plan, each layer's time is interpolated (piecewise linear, extrapolated linearly
at the narrow end, never below zero) against its share of its own MACs (layers without convolutions:
against the whole model's MACs share), from the table's points. What the per-layer times do not explain (nodes
named after no layer, the runtime's per-call overhead, the difference between profiled and whole-call time)
is a remainder, interpolated against the whole model's MACs share; it is fitted so that the predicted total
equals the measured total at every profiled point exactly. :class:`LatencyModel` offers the interface of
:class:`~utils.compress.prune.cost.CostModel` (``ratio(counts)``, plus ``ms(counts)``), so EagleEye's search
and slimming's budget bisection take either unchanged, and a candidate costs microseconds, as before.

**The cache.** Measuring takes seconds to minutes (one export per point; NNCF quantization for
``openvino-int8``), so the table is written to ``latency_tables.json`` beside ``--path`` and reused when its
key matches: the architecture (the YAML with its pruned widths, hashed), runtime and its version, CPU model,
image size, threads, and the widths profiled (with ``--min-keep`` and the width multiple that shape them). A
key that differs is measured again, saying which fields differed; the new table is added beside the old.

**The width multiple.** Runtimes block channels (16 floats per AVX-512 register), so a width just past a
block costs a whole block. :func:`measure_multiple` times one representative convolution of the model (the
prunable one with the most MACs, its input width and size) at output widths from 17 to 64 and picks
the largest multiple of (1, 4, 8, 16, 32) whose rounding up costs at most :data:`MULTIPLE_TOLERANCE` more
latency per channel asked for than the best one: channels the runtime computes anyway are kept, channels
it would charge for are not. That becomes ``--round``'s default when ``--runtime`` is given.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.channels import is_depthwise
from utils.common.timing import cpu_model
from utils.compress.prune.cost import CostModel
from utils.compress.prune.groups import ChannelGroup
from utils.compress.prune.io import write_text_atomic
from utils.compress.prune.plan import MIN_KEEP, keep_count, plan_from_counts
from utils.compress.prune.runtimes import Runtime
from utils.compress.prune.surgery import prune_model
from utils.export.common import prepare_for_export

LOGGER = logging.getLogger(__name__)

UNIFORM_WIDTHS = (1.0, 0.75, 0.5, 0.25)  # the points of the table (share of each group's channels kept)
PROFILE_RUNS = 10  # profiled calls per point (median per node)
TIMING_RUNS = 20  # interleaved rounds timing whole calls (median)
# output widths the width-multiple probe times: 17-64 at each multiple of 4 and just past it, so that every
# width rounded up to 4, 8, 16 or 32 is measured too
PROBE_WIDTHS = tuple(w for w in range(17, 65) if w % 4 in (0, 1))
PROBE_RUNS = 7
# the probe widths are timed in this many independent sets of rounds and each width keeps its fastest median: a
# burst of load on a shared machine inflates a median, never deflates a minimum (on 2026-12-07 one single set chose
# multiple 1 where four quiet ones chose 16 or 32, and the slimmed model ran 30 % slower than predicted)
PROBE_REPEATS = 3
MULTIPLES = (1, 4, 8, 16, 32)
MULTIPLE_TOLERANCE = 0.03  # a multiple within 3 % of the best latency per channel counts as as fast
CALIBRATION_IMAGES = 16  # training images calibrating an INT8 runtime's quantizer
TABLE_FILE = "latency_tables.json"
_LAYER = re.compile(r"/model\.(\d+)/")


@dataclass(frozen=True)
class LatencySettings:
    """What a latency measurement holds for: the runtime (by name), image size, threads, and how the table's
    uniform widths are rounded (``min_keep``, ``multiple``)."""

    runtime: str
    imgsz: int
    threads: int
    min_keep: float = MIN_KEEP
    multiple: int = 8


@dataclass
class ProfilePoint:
    """One profiled uniform width: its keep counts, the whole-call median ms, per-layer profiled ms, and the
    profiled ms of nodes named after no layer."""

    width: float
    counts: dict[int, int]
    ms: float
    layers: dict[int, float]
    unmapped: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProfilePoint:
        return cls(float(data["width"]), {int(k): int(v) for k, v in data["counts"].items()}, float(data["ms"]),
                   {int(k): float(v) for k, v in data["layers"].items()}, float(data["unmapped"]))


class Curve:
    """Piecewise-linear y(x) through points (equal x averaged), constant beyond the largest x (1.0: the unpruned
    layer); beyond the smallest, linear and never below zero (``extrapolate``) or constant."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], extrapolate: bool = True):
        pooled: dict[float, list[float]] = {}
        for x, y in zip(xs, ys):
            pooled.setdefault(round(float(x), 12), []).append(float(y))
        self.xs = sorted(pooled)
        self.ys = [sum(pooled[x]) / len(pooled[x]) for x in self.xs]
        self.extrapolate = extrapolate

    def __call__(self, x: float) -> float:
        if len(self.xs) == 1 or x >= self.xs[-1]:
            return self.ys[-1]
        if x >= self.xs[0]:
            return float(np.interp(x, self.xs, self.ys))
        if not self.extrapolate:
            return self.ys[0]
        slope = (self.ys[1] - self.ys[0]) / (self.xs[1] - self.xs[0])
        return max(0.0, self.ys[0] + slope * (x - self.xs[0]))


class LatencyModel:
    """Predicted batch-1 ms of a plan on one runtime (see the module docstring); ``ratio`` is what the
    searches budget, as :class:`CostModel`'s."""

    quantity = "latency"

    def __init__(self, cost: CostModel, points: Sequence[ProfilePoint]):
        if not points:
            raise ValueError("a latency model needs at least one profiled point")
        self.cost = cost
        self.points = list(points)
        self._full_layers = cost.layer_macs({})
        shares = [self._shares(p.counts) for p in self.points]
        layers = sorted({layer for p in self.points for layer in p.layers})
        self.curves = {layer: Curve([s[layer] for s in shares], [p.layers.get(layer, 0.0) for p in self.points])
                       for layer in layers}
        explained = [sum(curve(s[layer]) for layer, curve in self.curves.items()) for s in shares]
        self.remainder = Curve([s[-1] for s in shares], [p.ms - e for p, e in zip(self.points, explained)],
                               extrapolate=False)
        self.full = self.ms({})

    def _shares(self, counts: Mapping[int, int]) -> dict[int, float]:
        """Layer -> share of its own MACs kept (the whole model's share for layers without MACs, and at -1)."""
        macs = self.cost.layer_macs(counts)
        total = sum(macs.values()) / self.cost.full
        shares = {layer: macs[layer] / full for layer, full in self._full_layers.items() if full > 0}
        return _WithDefault(shares, total)

    def ms(self, counts: Mapping[int, int]) -> float:
        """Predicted ms per batch-1 call when group ``i`` keeps ``counts[i]`` channels."""
        shares = self._shares(counts)
        return sum(curve(shares[layer]) for layer, curve in self.curves.items()) + self.remainder(shares[-1])

    def ratio(self, counts: Mapping[int, int]) -> float:
        return self.ms(counts) / self.full

    def flops_ratio(self, counts: Mapping[int, int]) -> float:
        return self.cost.ratio(counts)

    def layer_ms(self, counts: Mapping[int, int]) -> dict[int, float]:
        """Predicted ms of each profiled layer (the remainder excluded), for reports."""
        shares = self._shares(counts)
        return {layer: curve(shares[layer]) for layer, curve in self.curves.items()}


class _WithDefault(dict):
    """Shares by layer; a layer without MACs (and the key -1) reads the whole model's share."""

    def __init__(self, shares: dict[int, float], total: float):
        super().__init__(shares)
        self.total = total

    def __missing__(self, key: int) -> float:
        return self.total


# ---------------------------------------------------------------------------------------------- measuring
def uniform_counts(sizes: Sequence[int], width: float, min_keep: float, multiple: int) -> dict[int, int]:
    """Every group keeping ``width`` of its channels, rounded as plans are (:func:`keep_count`)."""
    return {i: keep_count(width * size, size, min_keep, multiple) for i, size in enumerate(sizes)}


def layer_times(node_ms: Mapping[str, float]) -> tuple[dict[int, float], float]:
    """Per-node ms summed per YAML layer (node names carry ``/model.N/``), and the ms of the other nodes."""
    layers: dict[int, float] = {}
    unmapped = 0.0
    for name, ms in node_ms.items():
        found = _LAYER.search(name)
        if found:
            layers[int(found.group(1))] = layers.get(int(found.group(1)), 0.0) + ms
        else:
            unmapped += ms
    return layers, unmapped


def example_input(model: nn.Module, imgsz: int) -> torch.Tensor:
    return torch.zeros(1, model.yaml.get("ch", 3), imgsz, imgsz)


def cut_to_counts(model: nn.Module, groups: list[ChannelGroup], counts: Mapping[int, int]) -> nn.Module:
    """``model`` with group i keeping its first ``counts[i]`` channels: a model to time (which channels are kept
    does not change the time)."""
    order = [torch.arange(g.size, 0, -1).float() for g in groups]
    return prune_model(model, groups, plan_from_counts(order, dict(counts)), record=False)


def open_plans(runtime: Runtime, model: nn.Module, groups: list[ChannelGroup], plans: Sequence[Mapping[int, int]],
               imgsz: int, folder: Path, samples: Sequence[np.ndarray] | None = None) -> list[Any]:
    """Each plan's model (:func:`cut_to_counts`) opened on ``runtime``."""
    return [runtime.open(prepare_for_export(cut_to_counts(model, groups, counts)), example_input(model, imgsz),
                         folder, samples) for counts in plans]


def measure_points(model: nn.Module, groups: list[ChannelGroup], runtime: Runtime, settings: LatencySettings,
                   samples: Sequence[np.ndarray] | None = None) -> list[ProfilePoint]:
    """Profile and time the model at the uniform widths (each distinct plan once)."""
    sizes = [g.size for g in groups]
    widths: dict[tuple, tuple[float, dict[int, int]]] = {}
    for width in UNIFORM_WIDTHS:
        counts = uniform_counts(sizes, width, settings.min_keep, settings.multiple)
        widths.setdefault(tuple(sorted(counts.items())), (width, counts))
    plans = list(widths.values())
    with tempfile.TemporaryDirectory(prefix="prune-latency-") as tmp:
        handles = open_plans(runtime, model, groups, [counts for _, counts in plans], settings.imgsz, Path(tmp),
                             samples)
        profiles = [runtime.profile(handle, PROFILE_RUNS) for handle in handles]
        totals = runtime.latency(handles, TIMING_RUNS)
    return [ProfilePoint(width, counts, total, *layer_times(profile))
            for (width, counts), profile, total in zip(plans, profiles, totals)]


def measure_chosen(model: nn.Module, pruned: nn.Module, runtime: Runtime, imgsz: int,
                   samples: Sequence[np.ndarray] | None = None) -> tuple[float, float]:
    """(unpruned ms, pruned ms) of the two models exported for ``runtime``, timed in the same interleaved
    rounds (a busy moment of the machine slows both alike)."""
    with tempfile.TemporaryDirectory(prefix="prune-latency-") as tmp:
        handles = [runtime.open(prepare_for_export(m), example_input(model, imgsz), Path(tmp), samples)
                   for m in (model, pruned)]
        original, chosen = runtime.latency(handles, TIMING_RUNS)
    return original, chosen


# ---------------------------------------------------------------------------------------------- the cache
def architecture_hash(model: nn.Module) -> str:
    """The model's YAML (rows, multiples, pruned widths) hashed: what the latency depends on, not the weights."""
    text = json.dumps({k: v for k, v in model.yaml.items() if k != "yaml_file"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_key(model: nn.Module, runtime: Runtime, settings: LatencySettings) -> dict[str, Any]:
    return {"model": architecture_hash(model), "runtime": runtime.name, "version": runtime.version(),
            "cpu": cpu_model(), "imgsz": settings.imgsz, "threads": settings.threads,
            "widths": list(UNIFORM_WIDTHS), "min_keep": settings.min_keep, "multiple": settings.multiple}


class TableCache:
    """``latency_tables.json``: a list of measurements, each with its kind (``table`` or ``multiple``), key and
    data. Lookups match the whole key; a miss names what differed from the closest entry of that runtime."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _entries(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        try:
            entries = json.loads(self.path.read_text()).get("entries", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            LOGGER.warning("%s is not a latency table file (%s): measuring again; it will be replaced", self.path,
                           exc)
            return []
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("key"), dict)]

    def find(self, kind: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored data for ``(kind, key)``, or None (logging why an entry of the same runtime did not fit)."""
        entries = [e for e in self._entries() if e.get("kind") == kind]
        for entry in entries:
            if entry["key"] == dict(key):
                return entry
        same_runtime = [e for e in entries if e["key"].get("runtime") == key.get("runtime")]
        if same_runtime:
            closest = min(same_runtime, key=lambda e: len(_differences(e["key"], key)))
            LOGGER.info("latency %s in %s was measured for %s: measuring again", kind, self.path,
                        "; ".join(_differences(closest["key"], key)))
        return None

    def store(self, kind: str, key: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        """Add (or replace) the entry ``(kind, key)``; the file is replaced atomically."""
        kept = [e for e in self._entries() if not (e.get("kind") == kind and e["key"] == dict(key))]
        entry = {"kind": kind, "key": dict(key), "measured": datetime.datetime.now().isoformat(timespec="seconds"),
                 **data}
        write_text_atomic(self.path, json.dumps({"entries": [*kept, entry]}, indent=1) + "\n")


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    return [f"{name} {stored.get(name)} (now {wanted.get(name)})" for name in sorted(set(stored) | set(wanted))
            if stored.get(name) != wanted.get(name)]


def latency_model(model: nn.Module, cost: CostModel, groups: list[ChannelGroup], runtime: Runtime,
                  settings: LatencySettings, cache: TableCache,
                  samples: Sequence[np.ndarray] | None = None) -> LatencyModel:
    """The latency model of ``model`` on ``runtime``: from the cache when its key matches, else measured and
    stored."""
    key = table_key(model, runtime, settings)
    entry = cache.find("table", key)
    if entry is not None:
        points = [ProfilePoint.from_json(p) for p in entry["points"]]
        LOGGER.info("latency table for %s read from %s (measured %s)", runtime.name, cache.path, entry["measured"])
    else:
        LOGGER.info("measuring the latency table on %s (%d threads, %d px, batch 1): widths %s", runtime.name,
                    settings.threads, settings.imgsz, ", ".join(f"{w:.0%}" for w in UNIFORM_WIDTHS))
        points = measure_points(model, groups, runtime, settings, samples)
        cache.store("table", key, {"points": [asdict(p) for p in points]})
    result = LatencyModel(cost, points)
    LOGGER.info("%s", format_points(result))
    return result


def format_points(model: LatencyModel) -> str:
    """The table's points: whole-call ms, the part the layers explain, MACs share."""
    lines = ["width  MACs share  measured ms  layers ms  rest ms"]
    for point in model.points:
        layers = sum(point.layers.values())
        lines.append(f"{point.width:5.0%}  {model.cost.ratio(point.counts):10.3f}  {point.ms:11.2f}  {layers:9.2f}  "
                     f"{point.ms - layers:7.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the multiple
@dataclass(frozen=True)
class ConvProbe:
    """The convolution the width multiple is measured on: input channels, kernel, stride, input size."""

    in_channels: int
    kernel: int
    stride: int
    height: int
    width: int

    def module(self, out_channels: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(self.in_channels, out_channels, self.kernel, self.stride, self.kernel // 2),
                             nn.SiLU()).eval()

    def example(self) -> torch.Tensor:
        return torch.zeros(1, self.in_channels, self.height, self.width)


def representative_conv(model: nn.Module, groups: list[ChannelGroup], imgsz: int) -> ConvProbe:
    """The prunable (output-channel), ungrouped convolution with the most MACs at ``imgsz`` that does not read
    the image itself (its 3 input channels take a special path in most runtimes)."""
    paths = {m.path for g in groups for m in g.members if m.axis == "out"}
    found: dict[str, tuple[float, ConvProbe]] = {}
    hooks = []
    for path in paths:
        module = model.model.get_submodule(path)
        if isinstance(module, nn.Conv2d) and module.groups == 1 and not is_depthwise(module) \
                and module.in_channels != model.yaml.get("ch", 3):
            hooks.append(module.register_forward_hook(_probe_recorder(path, found)))
    try:
        with torch.no_grad():
            model.eval()(example_input(model, imgsz))
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise ValueError("no prunable convolution to measure the width multiple on")
    return max(found.values(), key=lambda item: item[0])[1]


def _probe_recorder(path: str, found: dict[str, tuple[float, ConvProbe]]):
    def record(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        height, width = inputs[0].shape[-2:]
        macs = float(output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        found[path] = (macs, ConvProbe(module.in_channels, module.kernel_size[0], module.stride[0], int(height),
                                       int(width)))
    return record


def round_up(width: int, multiple: int) -> int:
    return math.ceil(width / multiple) * multiple


def choose_multiple(latency: Mapping[int, float], wanted: Sequence[int] = PROBE_WIDTHS,
                    tolerance: float = MULTIPLE_TOLERANCE) -> tuple[int, dict[int, float]]:
    """The largest of :data:`MULTIPLES` whose mean latency per channel asked for (each width in ``wanted``
    rounded up to it, ``latency`` of the rounded width divided by the width asked for) is within ``tolerance``
    of the best; also returns each multiple's mean, relative to no rounding."""
    costs = {m: sum(latency[round_up(w, m)] / w for w in wanted) / len(wanted)
             for m in MULTIPLES if all(round_up(w, m) in latency for w in wanted)}
    best = min(costs.values())
    chosen = max(m for m, value in costs.items() if value <= best * (1 + tolerance))
    return chosen, {m: value / costs[1] for m, value in costs.items()}


def measure_multiple(model: nn.Module, groups: list[ChannelGroup], runtime: Runtime, imgsz: int,
                     cache: TableCache) -> int:
    """The width multiple ``runtime`` runs fastest, measured on the model's representative convolution (cached
    like the table); logs the latency per channel of each multiple."""
    probe = representative_conv(model, groups, imgsz)
    key = {"probe": asdict(probe), "runtime": runtime.name, "version": runtime.version(), "cpu": cpu_model(),
           "threads": runtime.threads, "widths": [PROBE_WIDTHS[0], PROBE_WIDTHS[-1]], "repeats": PROBE_REPEATS}
    entry = cache.find("multiple", key)
    if entry is None:
        LOGGER.info("measuring the width multiple %s runs fastest: a %dx%d conv from %d channels at %dx%d, output "
                    "widths %d-%d", runtime.name, probe.kernel, probe.kernel, probe.in_channels, probe.height,
                    probe.width, PROBE_WIDTHS[0], PROBE_WIDTHS[-1])
        with tempfile.TemporaryDirectory(prefix="prune-multiple-") as tmp:
            handles = [runtime.open(probe.module(w), probe.example(), Path(tmp)) for w in PROBE_WIDTHS]
            sets = [runtime.latency(handles, PROBE_RUNS) for _ in range(PROBE_REPEATS)]
            latency = {w: min(medians) for w, medians in zip(PROBE_WIDTHS, zip(*sets, strict=True), strict=True)}
        cache.store("multiple", key, {"ms": {str(w): ms for w, ms in latency.items()}})
    else:
        latency = {int(w): float(ms) for w, ms in entry["ms"].items()}
    chosen, relative = choose_multiple(latency)
    LOGGER.info("width multiple on %s: %d (latency per channel asked for, relative to no rounding: %s)",
                runtime.name, chosen, ", ".join(f"{m}: {v:.3f}" for m, v in relative.items()))
    return chosen

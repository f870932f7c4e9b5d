"""Training precision: chosen once per run from the flags and the device, logged, and recorded for ``--resume``.

YOLOv5 v7.0 trains with float16 AMP wherever the device supports it (CUDA). This toolkit does the same and
carries it to CPUs that compute bfloat16 natively (AVX512-BF16 or AMX), where bfloat16 autocast trains ~1.7x
faster than float32 at the same accuracy (docs/training.md). Elsewhere float32 stays the default: a CPU that
emulates bfloat16 would be slower, not faster. Weights, optimizer state, EMA and validation stay float32 in
every precision; only the forward and backward run under autocast.

The choice is written into the run's config (``precision`` in opt.yaml and in last.pt's training state), so
that ``--resume`` continues in the precision the run started with, on another machine too, and says so where
that machine cannot (float16 AMP recorded, no CUDA device now).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from utils.common.errors import UserError
from utils.common.torch_utils import cpu_has_native_bf16

LOGGER = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DESCRIPTIONS = {"bf16": "bfloat16 autocast", "fp16": "float16 AMP with gradient scaling", "fp32": "float32"}


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in: ``name`` is 'bf16', 'fp16' or 'fp32'; ``reason`` says why it was chosen."""

    name: str
    reason: str

    @property
    def autocast(self) -> bool:
        return self.name != "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype:
        """The dtype for ``torch.autocast`` (float16 when ``autocast`` is off: autocast rejects float32 on CPU)."""
        return torch.bfloat16 if self.name == "bf16" else torch.float16

    @property
    def grad_scaling(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's exponent range."""
        return self.name == "fp16"

    def describe(self) -> str:
        return f"{DESCRIPTIONS[self.name]} ({self.reason})"


def requested_precision(cfg: Any) -> str:
    """The one precision the flags ask for ('auto' when none); flags that ask for different ones are a UserError.

    ``--bf16``, ``--fp32`` (alias ``--no-amp``) and ``--precision NAME`` are three ways to ask; any of them may be
    given, repeated or combined as long as they agree.
    """
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision}: choose one of {', '.join(PRECISIONS)}")
    asked = {}
    if cfg.bf16:
        asked["--bf16"] = "bf16"
    if cfg.fp32:
        asked["--fp32/--no-amp"] = "fp32"
    if cfg.precision != "auto":
        asked[f"--precision {cfg.precision}"] = cfg.precision
    if len(set(asked.values())) > 1:
        raise UserError(f"{' and '.join(asked)} ask for different training precisions: give only one of them")
    if getattr(cfg, "qat", False):  # fake quantization trains in float32
        if set(asked.values()) - {"fp32"}:
            raise UserError(f"--qat trains in float32 (fake quantization): drop {' and '.join(asked)}")
        return "fp32"
    return next(iter(asked.values()), "auto")


def resolve_precision(request: str, device: torch.device) -> Precision:
    """The precision to train in on ``device`` for ``request`` ('auto', 'bf16', 'fp16' or 'fp32').

    auto: bfloat16 autocast on a CPU with native bfloat16, float16 AMP on CUDA, float32 elsewhere. An explicit
    request is honoured wherever the device can run it (bfloat16 on a CPU without native support: emulated and
    slower, with a warning) and is a UserError where it cannot.
    """
    kind = device.type
    if request == "auto":
        return _automatic(kind)
    if request == "fp32":
        return Precision("fp32", "requested")
    if request == "fp16":
        if kind != "cuda":
            raise UserError(f"--precision fp16: float16 AMP needs a CUDA device, this run uses {kind}; "
                            "use --bf16 or --fp32")
        return Precision("fp16", "requested")
    if kind == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise UserError(f"--bf16: CUDA device {device} has no bfloat16 support; drop --bf16 for float16 AMP")
        return Precision("bf16", "requested, instead of CUDA's float16 AMP")
    if kind != "cpu":
        raise UserError(f"--bf16: bfloat16 autocast is supported on the CPU and CUDA, not on {kind}; use --fp32")
    if not cpu_has_native_bf16():
        LOGGER.warning("--bf16: this CPU has neither AVX512-BF16 nor AMX, bfloat16 is emulated and slower")
        return Precision("bf16", "requested; this CPU emulates bfloat16, which is slower than float32")
    return Precision("bf16", "requested")


def _automatic(kind: str) -> Precision:
    if kind == "cuda":
        return Precision("fp16", "CUDA, as YOLOv5 v7.0; --bf16 for bfloat16, --fp32 to train in float32")
    if kind == "cpu" and cpu_has_native_bf16():
        return Precision("bf16", f"the CPU has {native_bf16_features()}; --fp32 to train in float32")
    if kind == "cpu":
        return Precision("fp32", "this CPU has neither AVX512-BF16 nor AMX; --bf16 to emulate bfloat16 anyway (slower)")
    return Precision("fp32", f"no mixed precision on {kind}")


def native_bf16_features() -> str:
    """Which of the CPU's instruction sets compute bfloat16 natively, for the log ('AVX512-BF16', 'AMX', both)."""
    try:
        found = [name for name, present in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                            ("AMX", torch.cpu._is_amx_tile_supported())) if present]
    except AttributeError:  # private helpers of torch.cpu; a build without them still has oneDNN's answer
        found = []
    return " and ".join(found) or "native bfloat16"


def with_precision(cfg: Any, name: str) -> Any:
    """``cfg`` recording ``name`` as its precision; a ``--bf16``/``--fp32`` flag that no longer applies is cleared,
    so that the recorded config never contradicts itself."""
    return dataclasses.replace(cfg, precision=name, bf16=cfg.bf16 and name == "bf16",
                               fp32=cfg.fp32 and name == "fp32")


def resumed_precision(saved: dict[str, Any], device: torch.device) -> tuple[str, str]:
    """(precision, log message) for resuming a run whose saved config is ``saved`` on ``device``.

    The recorded precision continues wherever the device can run it. float16 AMP recorded on CUDA and resumed
    without CUDA, or bfloat16 recorded and resumed on a CUDA device without it, changes to this device's
    automatic choice, and the message says so. Runs saved before the precision was recorded trained in
    bfloat16 with ``--bf16`` and otherwise in float32 on the CPU and float16 AMP on CUDA.
    """
    recorded = saved.get("precision")
    if recorded in (None, "auto"):
        recorded = "bf16" if saved.get("bf16") else "fp16" if device.type == "cuda" else "fp32"
    runnable = {"fp32": True, "fp16": device.type == "cuda",
                "bf16": device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())}
    if runnable.get(recorded, False):
        return recorded, f"continuing in {DESCRIPTIONS[recorded]}, the precision this run trained in"
    chosen = _automatic(device.type).name
    return chosen, (f"this run trained in {DESCRIPTIONS[recorded]}, which {device.type} cannot run: "
                    f"continuing in {DESCRIPTIONS[chosen]} (the precision changes from here on)")

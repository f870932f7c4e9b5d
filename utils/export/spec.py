"""What an export format is: one :class:`ExportFormat` per format, read by export.py, val.py, detect.py.

A description says how the artifact is named (a file suffix, or a folder suffix plus the file that marks such
a folder), what the format supports (free input axes, ``--half`` on which devices, INT8 and how, a QAT
checkpoint's trained INT8 graph, ``--nms``), which packages export and run it, the function that exports it
and the :class:`~utils.export.backend.Backend` that loads and runs it. Each format module defines its
description as ``FORMAT`` next to its exporter and backend; :mod:`utils.export.registry` holds them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.common.errors import UserError

if TYPE_CHECKING:
    from utils.export import ExportOptions
    from utils.export.backend import Backend
    from utils.export.job import ExportJob

ALL_AXES = ("batch", "height", "width")

# An exporter writes its artifact(s) for one export job and returns artifact key -> path (see ExportJob).
Exporter = Callable[["ExportJob"], dict[str, Path]]
# Checks of flags only one format has rules for, run before anything is loaded or written:
# (options, whether --include names the format, whether a QAT checkpoint exports its trained QDQ graph).
FlagCheck = Callable[["ExportOptions", bool, bool], None]


class MissingPackageError(UserError, RuntimeError):
    """A format was asked for whose package is not installed here; the message says what to install."""


@dataclass(frozen=True)
class Requirement:
    """A package a format needs, checked before any work starts.

    ``probe`` replaces the plain "is it installed" check where more is needed (TensorRT: a visible GPU too);
    it raises :class:`MissingPackageError` with its own message, which is prefixed with what needed it.
    """

    module: str
    hint: str
    probe: Callable[[], Any] | None = None

    def available(self) -> bool:
        """Whether the package is installed (not imported: OpenVINO or TensorRT take seconds to import)."""
        return importlib.util.find_spec(self.module) is not None

    def check(self, purpose: str) -> None:
        """Raise (before anything is written) when ``purpose`` cannot be done here."""
        if self.probe is not None:
            try:
                self.probe()
            except MissingPackageError as exc:  # name what it was needed for
                raise MissingPackageError(f"{purpose}: {exc}") from None
        elif not self.available():
            raise MissingPackageError(f"{purpose} needs the '{self.module}' package, which is not installed: "
                                      f"{self.hint}")


@dataclass(frozen=True)
class ExportFormat:
    """One export format: naming, capabilities, exporter and backend.

    ``suffix`` follows the weights' stem: ``".onnx"`` (a file, its sidecar ``x.onnx.json`` beside it) or, with
    ``marker`` set, ``"_openvino_model"`` (a folder holding a ``marker`` file and ``metadata.json``).
    ``export`` is None for what cannot be exported to (the ``.pt`` checkpoint); ``export_qat`` writes a
    quantization-aware-trained checkpoint's trained INT8 graph (None: such checkpoints are refused).
    ``built_from`` (``qat_built_from`` for QAT checkpoints) names formats exported first because this one is
    built from their artifact. ``half_devices``: the device types ``--half`` export needs (None: any device).
    ``int8`` says how ``--int8`` quantizes (None: refused); ``int8_suffix`` makes
    the INT8 artifact a copy beside the float one (``x_int8.onnx``) instead of the artifact itself.
    ``runtime`` is the name a sidecar's measured ``cpu_runtime`` uses for this backend; ``also_runs`` lists
    suffixes of other formats' files the backend runs too (OpenVINO runs ``.onnx``). ``check_flags`` refuses
    flag values only this format has rules for (the ONNX exporter's opsets), before any work.
    """

    name: str
    title: str
    suffix: str
    backend: type[Backend]
    marker: str | None = None
    export: Exporter | None = None
    export_qat: Exporter | None = None
    built_from: tuple[str, ...] = ()
    qat_built_from: tuple[str, ...] = ()
    dynamic: tuple[str, ...] = ALL_AXES
    half_devices: tuple[str, ...] | None = None
    int8: str | None = None
    int8_suffix: str | None = None
    opset: bool = False
    nms: bool = False
    devices: tuple[str, ...] = ("cpu",)
    runtime: str = ""
    also_runs: tuple[str, ...] = ()
    export_requires: tuple[Requirement, ...] = ()
    run_requires: tuple[Requirement, ...] = ()
    check_flags: FlagCheck | None = None

    def __post_init__(self) -> None:
        if not self.runtime:
            object.__setattr__(self, "runtime", self.name)
        unknown = set(self.dynamic) - set(ALL_AXES)
        if unknown:
            raise ValueError(f"export format {self.name}: unknown dynamic axes {sorted(unknown)}")
        if self.marker is None and not (self.suffix.startswith(".") and Path(f"x{self.suffix}").suffix == self.suffix):
            raise ValueError(f"export format {self.name}: a file suffix looks like '.onnx', got {self.suffix!r} (a "
                             "folder format also names its marker file)")

    @property
    def folder(self) -> bool:
        """Whether the artifact is a folder (sidecar inside) rather than a file (sidecar beside)."""
        return self.marker is not None

    @property
    def exportable(self) -> bool:
        return self.export is not None

    @property
    def int8_key(self) -> str:
        """The key of the INT8 copy among export_model's artifacts (``onnx_int8``)."""
        return f"{self.name}_int8"

    def artifacts(self, folder: Path, stem: str) -> dict[str, Path]:
        """Artifact key -> path for weights named ``stem`` exported into ``folder``."""
        paths = {self.name: folder / f"{stem}{self.suffix}"}
        if self.int8_suffix:
            paths[self.int8_key] = folder / f"{stem}{self.int8_suffix}"
        return paths

    def outputs(self, requested: bool, int8: bool, qat: bool) -> list[str]:
        """The artifact keys one export writes: ``requested`` (named in ``--include``, not only built from),
        ``int8`` (``--int8``), ``qat`` (a QAT checkpoint's trained graph)."""
        if qat:
            return [self.int8_key if self.int8_suffix else self.name]
        keys = [self.name]
        if int8 and requested and self.int8_suffix:
            keys.append(self.int8_key)
        return keys

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is an artifact of this format: a folder with its marker file, or a file with its suffix
        (a path that does not exist yet counts by its suffix)."""
        if self.folder:
            return path.is_dir() and any(path.glob(self.marker))
        return path.suffix == self.suffix

    def runs(self, path: Path, device_type: str) -> bool:
        """Whether this backend runs the file ``path`` (its own or one in ``also_runs``) on ``device_type``."""
        return device_type in self.devices and not path.is_dir() and path.suffix in (self.suffix, *self.also_runs)

    def check_export(self, options: ExportOptions | None = None, trained_qdq: bool = False) -> None:
        """Raise before any work when this format cannot be exported here or with ``options``."""
        for requirement in self.export_requires:
            requirement.check(f"--include {self.name}")
        if options is not None and self.check_flags is not None:
            self.check_flags(options, self.name in options.include, trained_qdq)

    def check_run(self, artifact: Path) -> None:
        for requirement in self.run_requires:
            requirement.check(f"{artifact} ({self.title})")

    def can_run(self) -> bool:
        """Whether every package the backend needs is installed here (no probing)."""
        return all(requirement.available() for requirement in self.run_requires)

"""The export formats: name / artifact -> :class:`~utils.export.spec.ExportFormat`.

export.py's ``--include`` (help and validation), :func:`utils.export.export_model`, :func:`load_backend` (so val.py
and detect.py) and the INT8 runtime choice read this registry and name no format.
Adding a format is one module defining ``FORMAT`` (its description, exporter and backend) registered here, or,
from outside the project, :func:`register_format` (reversible with :func:`unregister_format`, or for a block of
code with :func:`registered_format`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from utils.common.errors import FlagError, MissingFileError
from utils.export import ncnn, onnx, openvino, pytorch, tensorrt, torchscript
from utils.export.backend import Backend
from utils.export.common import read_metadata
from utils.export.spec import ExportFormat

LOGGER = logging.getLogger(__name__)

# the order formats are exported in, and listed in help and messages
BUILTIN_FORMATS = (pytorch.FORMAT, torchscript.FORMAT, onnx.FORMAT, openvino.FORMAT, ncnn.FORMAT, tensorrt.FORMAT)


class FormatRegistry:
    """Registered formats in registration order; lookups by name and by artifact path."""

    def __init__(self, formats: Iterable[ExportFormat] = ()) -> None:
        self._formats: dict[str, ExportFormat] = {}
        for fmt in formats:
            self.register(fmt)

    def register(self, fmt: ExportFormat) -> ExportFormat:
        """Add ``fmt``; a name, file suffix or folder marker already taken is refused (artifacts would be
        ambiguous)."""
        if fmt.name in self._formats:
            raise ValueError(f"export format '{fmt.name}' is registered already")
        for other in self._formats.values():
            if other.suffix == fmt.suffix or (fmt.folder and other.marker == fmt.marker):
                raise ValueError(f"export format '{fmt.name}': its artifacts ({fmt.suffix}, {fmt.marker or 'a file'}) "
                                 f"would be taken for '{other.name}' artifacts ({other.suffix}, "
                                 f"{other.marker or 'a file'})")
        self._formats[fmt.name] = fmt
        return fmt

    def unregister(self, name: str) -> ExportFormat:
        """Remove the format ``name`` (what :meth:`register` added); returns its description."""
        return self._formats.pop(self.get(name).name)

    @contextmanager
    def registered(self, fmt: ExportFormat) -> Iterator[ExportFormat]:
        """``fmt`` registered for the duration of a ``with`` block."""
        self.register(fmt)
        try:
            yield fmt
        finally:
            self.unregister(fmt.name)

    def get(self, name: str) -> ExportFormat:
        try:
            return self._formats[name]
        except KeyError:
            raise FlagError(f"unknown export format '{name}'; known: {', '.join(self._formats)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._formats

    def formats(self) -> list[ExportFormat]:
        return list(self._formats.values())

    def exportable(self) -> list[ExportFormat]:
        """The formats ``--include`` can name, in export order."""
        return [fmt for fmt in self._formats.values() if fmt.exportable]

    def exportable_names(self) -> list[str]:
        return [fmt.name for fmt in self.exportable()]

    def for_artifact(self, path: Path) -> ExportFormat:
        """The format of ``path``: a folder by the marker file it holds, a file (or a path not written yet) by its
        suffix; a FlagError listing what is known otherwise."""
        path = Path(path)
        if path.is_dir():
            for fmt in self._formats.values():
                if fmt.folder and fmt.holds(path):
                    return fmt
        for fmt in self._formats.values():
            if not fmt.folder and fmt.holds(path):
                return fmt
        if path.is_dir():
            markers = " or ".join(f"{fmt.marker} ({fmt.title})" for fmt in self._formats.values() if fmt.folder)
            raise FlagError(f"{path}: a folder artifact must hold {markers}")
        suffixes = ", ".join(fmt.suffix for fmt in self._formats.values() if not fmt.folder)
        raise FlagError(f"{path}: unknown artifact type; expected {suffixes} or an export folder")

    def runners(self, path: Path, device_type: str) -> list[ExportFormat]:
        """The formats whose backend runs the file ``path`` on ``device_type`` (its own format's and those that
        read it too, as OpenVINO reads ``.onnx``)."""
        return [fmt for fmt in self._formats.values() if fmt.runs(Path(path), device_type)]

    def plan(self, include: Iterable[str], qat: bool = False) -> list[ExportFormat]:
        """The formats one export writes, in export order: those in ``include`` and those they are built from
        (``built_from``, or ``qat_built_from`` for a QAT checkpoint's trained graph), each after its sources."""
        ordered: list[ExportFormat] = []

        def visit(fmt: ExportFormat) -> None:
            if fmt in ordered:
                return
            for source in fmt.qat_built_from if qat else fmt.built_from:
                visit(self.get(source))
            ordered.append(fmt)

        wanted = set(include)
        for fmt in self.exportable():
            if fmt.name in wanted:
                visit(fmt)
        return ordered


REGISTRY = FormatRegistry(BUILTIN_FORMATS)


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Register ``fmt`` (a format defined outside the project); export.py, val.py and detect.py then take it."""
    return REGISTRY.register(fmt)


def unregister_format(name: str) -> ExportFormat:
    return REGISTRY.unregister(name)


def registered_format(fmt: ExportFormat):
    """Context manager: ``fmt`` registered inside the ``with`` block only."""
    return REGISTRY.registered(fmt)


def backend_class(weights: str | Path) -> type[Backend]:
    """Which backend serves ``weights``: the registered format holding it (by contents for folders, by suffix
    for files)."""
    return REGISTRY.for_artifact(Path(weights)).backend


def load_backend(weights: str | Path, device: str = "cpu", fp16: bool = False,
                 threads: int | None = None) -> Backend:
    """Open any artifact written by export.py (or a .pt checkpoint) behind the :class:`Backend` interface.

    ``threads`` caps the CPU threads of runtimes that take a cap (ONNX Runtime, OpenVINO, NCNN; PyTorch:
    ``torch.set_num_threads``). On the CPU, a file whose sidecar records the runtime export measured fastest
    (``cpu_runtime``, see utils/export/runtime.py) opens with that runtime when it is installed here.
    """
    path = Path(weights)
    if not path.exists():
        raise MissingFileError(f"{path} not found")
    fmt = REGISTRY.for_artifact(path)
    fmt = measured_runtime(path, fmt, torch.device(device).type)
    fmt.check_run(path)
    extra: dict[str, Any] = {"threads": threads} if threads else {}
    return fmt.backend(path, device=device, fp16=fp16, **extra)


def measured_runtime(path: Path, fmt: ExportFormat, device_type: str) -> ExportFormat:
    """The registered format whose backend export measured as the fastest CPU runtime of ``path`` (its sidecar's
    ``cpu_runtime``), when another backend than ``fmt``'s runs such files on the CPU and is installed; else
    ``fmt``."""
    if device_type != "cpu":
        return fmt
    others = [other for other in REGISTRY.runners(path, "cpu") if other is not fmt]
    if not others:
        return fmt
    wanted = read_metadata(path).get("cpu_runtime")
    for other in others:
        if other.runtime == wanted:
            if other.can_run():
                return other
            LOGGER.info("%s runs fastest on %s, which is not installed: using %s", path, other.title, fmt.runtime)
    return fmt

"""NCNN export through pnnx: prepared model -> TorchScript -> ``pnnx`` executable -> ``model.ncnn.param/.bin``.

The ``pnnx`` Python package ships the converter binary; we call it directly (no network download). NCNN has
no batch axis, so the artifact is batch 1 (the backend runs bigger batches image by image). Focus stems are
already replaced by their equivalent strided conv (:func:`utils.export.common.focus_to_conv`) by the time the
model gets here, since pnnx/ncnn handle step-2 slicing poorly. The backend runs the folder on the CPU.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from utils.export.backend import Backend, single_file
from utils.export.common import ExportMetadata, read_metadata, write_metadata
from utils.export.spec import ExportFormat, Requirement
from utils.export.torchscript import trace_model

if TYPE_CHECKING:
    from utils.export.job import ExportJob

LOGGER = logging.getLogger(__name__)

PARAM_NAME = "model.ncnn.param"
BIN_NAME = "model.ncnn.bin"


def pnnx_executable() -> Path:
    """Path of the converter shipped inside the ``pnnx`` wheel; a clear error if the package is missing."""
    try:
        import pnnx
    except ImportError as exc:
        raise RuntimeError("NCNN export needs the 'pnnx' package (pip install pnnx)") from exc
    path = Path(pnnx.EXEC_PATH)
    if not path.is_file():
        raise RuntimeError(f"the pnnx package has no converter binary at {path}")
    return path


def export_ncnn(model: nn.Module, images: torch.Tensor, folder: str | Path, metadata: ExportMetadata,
                half: bool = False) -> Path:
    """Convert a prepared model (traced at batch 1 on ``images[:1]``) into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    single = images[:1].float()
    with tempfile.TemporaryDirectory(prefix="ncnn-export-") as tmp:
        work = Path(tmp)
        traced = trace_model(model.float(), single)
        traced.save(str(work / "model.torchscript"))
        _run_pnnx(work, single.shape, half)
        _refuse_unconverted(work / PARAM_NAME)
        for name in (PARAM_NAME, BIN_NAME):
            shutil.move(work / name, folder / name)
    write_metadata(folder, metadata)
    LOGGER.info("NCNN model saved to %s", folder)
    return folder


def _run_pnnx(work: Path, shape: torch.Size, half: bool) -> None:
    shape_arg = "[" + ",".join(str(int(v)) for v in shape) + "]"
    outputs = {"pnnxparam": "model.pnnx.param", "pnnxbin": "model.pnnx.bin", "pnnxpy": "model_pnnx.py",
               "pnnxonnx": "model.pnnx.onnx", "ncnnparam": PARAM_NAME, "ncnnbin": BIN_NAME,
               "ncnnpy": "model_ncnn.py"}
    command = [str(pnnx_executable()), "model.torchscript", f"inputshape={shape_arg}", f"fp16={int(half)}",
               *(f"{key}={value}" for key, value in outputs.items())]
    LOGGER.info("running %s", " ".join(command))
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not (work / PARAM_NAME).is_file():
        raise RuntimeError(f"pnnx failed (exit {result.returncode}): {result.stderr[-2000:] or result.stdout[-2000:]}")


def unconverted_operators(param_file: Path) -> Counter[str]:
    """Operator types in an NCNN ``.param`` that are not NCNN layers, with their counts.

    Where pnnx finds no NCNN equivalent it writes the TorchScript operator itself (``Tensor.reshape``,
    ``F.interpolate``, ``torch.roll`` ...); NCNN layer types never contain a dot. NCNN then refuses the whole
    file at load time, so an export that contains any is a failed export.
    """
    layers = param_file.read_text().splitlines()[2:]  # magic number, then the layer and blob counts
    return Counter(kind for kind in (line.split(maxsplit=1)[0] for line in layers if line.strip()) if "." in kind)


def _refuse_unconverted(param_file: Path) -> None:
    left = unconverted_operators(param_file)
    if left:
        listed = ", ".join(f"{kind} x{count}" for kind, count in left.most_common())
        raise RuntimeError(
            f"NCNN export: pnnx found no NCNN layer for {listed}, so NCNN cannot load this model (a reshape "
            "to more than 4 dimensions, as in Swin window attention, is the usual cause); export to ONNX or "
            "OpenVINO instead")


def export(job: ExportJob) -> dict[str, Path]:
    """Batch 1 (NCNN has no batch axis); --half stores FP16 weights."""
    half = job.options.half
    metadata = job.metadata(FORMAT, "fp16" if half else "fp32", batch=1)
    return {FORMAT.name: export_ncnn(job.model, job.images, job.paths[FORMAT.name], metadata, half=half)}


class NCNNBackend(Backend):
    """An NCNN folder (``model.ncnn.param/.bin``); NCNN has no batch axis, so images run one at a time."""

    format = "ncnn"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None):
        import ncnn

        metadata = read_metadata(weights)
        metadata["batch"], metadata["dynamic"] = 1, []
        super().__init__(weights, metadata, device, fp16)
        self.ncnn = ncnn
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.use_fp16_storage = fp16
        self.net.opt.use_fp16_arithmetic = fp16
        if threads:
            self.net.opt.num_threads = threads
        folder = Path(weights)
        if self.net.load_param(str(single_file(folder, "*.param"))) or self.net.load_model(
                str(single_file(folder, "*.bin"))):
            raise RuntimeError(f"{folder}: NCNN could not load the .param/.bin pair")
        self.input_name = self.net.input_names()[0]
        self.output_names = self.net.output_names()

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        per_image = []
        for image in images.detach().cpu().float().numpy():
            # ncnn.Mat wraps the array's buffer without keeping the array alive: hold it in a name until the
            # clone has copied it (a temporary, e.g. from ascontiguousarray, may be freed first: garbage input)
            pixels = np.ascontiguousarray(image)
            extractor = self.net.create_extractor()
            extractor.input(self.input_name, self.ncnn.Mat(pixels).clone())
            outputs = []
            for name in self.output_names:
                status, mat = extractor.extract(name)
                if status != 0:
                    raise RuntimeError(f"{self.weights}: NCNN failed to compute output {name} (status {status})")
                outputs.append(torch.from_numpy(np.array(mat)).unsqueeze(0))
            per_image.append(outputs)
        return [torch.cat(parts).to(self.device) for parts in zip(*per_image)]


FORMAT = ExportFormat(
    name="ncnn", title="NCNN", suffix="_ncnn_model", marker="*.param", backend=NCNNBackend, export=export,
    dynamic=(), export_requires=(Requirement("pnnx", "pip install pnnx"),),
    run_requires=(Requirement("ncnn", "pip install ncnn"),))

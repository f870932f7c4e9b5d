"""The module registry: complete after ``import models``, and one contract every registered block meets.

The contract test is parametrised over ``REGISTRY.specs()``: each block is built from the one-line YAML its
``@register(example=...)`` declares (a stem ``Conv`` per input in front), run forward and backward, its
channel declarations (``out``, ``coupling``, ``pruning``) are checked against the module it builds, and it is
exported to ONNX where it declares ``onnx=True``. A new block is covered by registering it; no list here names
blocks.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import flat_tensors
from torch import nn

import models  # noqa: F401  (registers every block the project ships)
from models.registry import REGISTRY, BuildContext, Example, ModuleSpec, out_same, register
from models.yaml_config import ModelConfigError, resolve_arg
from models.yolo import BaseModel, build_model, parse_model

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the ONNX exporter's notes on shapes

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 32
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-3  # float32 ONNX Runtime vs PyTorch on these small blocks


# ------------------------------------------------------------------------------------------ building
def example_config(spec: ModuleSpec, example: Example) -> dict:
    """The model YAML of one example: a stem Conv per input (image -> stride 2, then stride 1, so every input
    has the same size), then the block's row. Round-tripped through YAML text: an example must be writable
    in a model YAML."""
    stems = [[-1, 1, "Conv", [c, 3, 2 if k == 0 else 1]] for k, c in enumerate(example.inputs)]
    source = -1 if len(example.inputs) == 1 else list(range(len(example.inputs)))
    cfg = {**example.symbols, "backbone": [*stems, [source, example.n, spec.name, list(example.args)]], "head": []}
    return yaml.safe_load(yaml.safe_dump(cfg, default_flow_style=True))


class Harness(BaseModel):
    """A model of stems plus one block, built by ``parse_model`` (heads go through ``build_model``)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.yaml = cfg
        self.model, self.save = parse_model(cfg, ch=[3])


def build_example(spec: ModuleSpec, example: Example) -> BaseModel:
    cfg = example_config(spec, example)
    return build_model(cfg) if spec.coupling == "head" else Harness(cfg)


def declared_out(spec: ModuleSpec, example: Example) -> tuple[list[int], int]:
    """(input channels, the output channels the spec declares) for the example's row, bound as parse_model binds
    it (depth and width multiples 1)."""
    c_in = list(example.inputs)
    cfg = example_config(spec, example)
    args = [resolve_arg(a, example.symbols) for a in cfg["backbone"][-1][3]]
    ctor_args, _ = spec.bind(c_in, args, BuildContext(symbols=example.symbols), example.n)
    return c_in, spec.out_channels(c_in, ctor_args)


def run_block(model: BaseModel, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], object]:
    """(the block's inputs, its outputs, the model's output) of one forward pass."""
    seen = {}
    hook = model.model[-1].register_forward_hook(lambda _m, inputs, output: seen.update(i=inputs[0], o=output))
    try:
        result = model(x)
    finally:
        hook.remove()
    return flat_tensors(seen["i"]), flat_tensors(seen["o"]), result


# ------------------------------------------------------------------------------------------ the contract
def check_example(spec: ModuleSpec, example: Example, tmp_path: Path) -> list[nn.Module]:
    """Build, forward, backward, declared channels, ONNX; returns the block instances (for the path checks)."""
    assert all(c % 8 == 0 for c in example.inputs), "example inputs: multiples of 8 (a stem Conv rounds up to 8)"
    torch.manual_seed(0)
    model = build_example(spec, example).train()
    layer = model.model[-1]
    blocks = [m for m in layer.modules() if type(m) is spec.cls]
    assert blocks, f"{spec.name}: the example's last layer holds no {spec.cls.__name__}"
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    inputs, outputs, result = run_block(model, x)

    sum(t.float().square().mean() for t in flat_tensors(result)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{spec.name}: {name} gets no (finite) gradient"

    c_in, declared = declared_out(spec, example)
    assert [t.shape[1] for t in inputs] == c_in
    check_coupling(spec, example, c_in, declared, inputs, outputs)
    for block in blocks:
        for name in spec.pruning.scalar_params:
            assert isinstance(getattr(block, name, None), nn.Parameter), f"{spec.name}: no parameter '{name}'"
    if spec.onnx:
        check_onnx(model.eval(), x, tmp_path / f"{spec.name}.onnx")
    return blocks


def check_coupling(spec: ModuleSpec, example: Example, c_in: list[int], declared: int,
                   inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
    """``out`` against the real output, and what ``coupling`` promises about it."""
    if spec.coupling == "head":  # ends the graph: nothing may read it
        assert declared == 0, f"{spec.name}: a head declares 0 output channels"
        cfg = example_config(spec, example)
        cfg["head"] = [[-1, 1, "Conv", [8, 1, 1]]]
        with pytest.raises(ModelConfigError):
            parse_model(cfg, ch=[3])
        return
    (out,) = outputs
    assert out.shape[1] == declared, f"{spec.name}: declares {declared} output channels, gives {out.shape[1]}"
    if spec.coupling == "tied":
        assert declared == c_in[0], f"{spec.name}: tied, but {c_in[0]} channels in and {declared} out"
    elif spec.coupling == "concat":
        assert declared == sum(c_in), f"{spec.name}: a concatenation of {c_in} gives {declared}"
    elif spec.coupling == "rearrange":  # the input's values, regrouped
        (x,) = inputs
        assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values), spec.name


def check_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Classic (TorchScript) exporter as utils/export uses; ONNX Runtime reproduces every output."""
    import onnxruntime

    with torch.no_grad():
        expected = flat_tensors(model(x))
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["images"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})
    assert len(got) == len(expected)
    for ours, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(ours), ref, atol=ONNX_ATOL, rtol=ONNX_RTOL)


def check_contract(spec: ModuleSpec, tmp_path: Path) -> None:
    """Every example meets the contract; every declared pruning path names a sub-module in one of them."""
    assert spec.examples, f"{spec.name}: declare example=... in its @register (see models/registry.py Example)"
    blocks = [b for example in spec.examples for b in check_example(spec, example, tmp_path)]
    for pattern in (*spec.pruning.whole, *spec.pruning.fixed_outputs):
        assert pattern == "" or any(fnmatch.fnmatchcase(name, pattern) for b in blocks for name, _ in
                                    b.named_modules()), f"{spec.name}: pruning path '{pattern}' names no module"


@pytest.mark.parametrize("spec", REGISTRY.specs(), ids=lambda s: s.name)
def test_registered_block_meets_its_declarations(spec, tmp_path):
    check_contract(spec, tmp_path)


def test_a_new_block_is_covered_without_editing_a_list(tmp_path):
    """A block registered here is among the specs the contract test walks and passes it; one whose declaration
    does not fit its module fails it."""

    @register(name="ThrowAwayScale", width_args=(), out=out_same, coupling="tied", example=[])
    class ThrowAwayScale(nn.Module):
        def __init__(self, c1: int):
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale.view(1, -1, 1, 1)

    @register(name="ThrowAwayWider", width_args=(), out=out_same, coupling="tied", example=[])
    class ThrowAwayWider(nn.Conv2d):  # declares its input's width but doubles it
        def __init__(self, c1: int):
            super().__init__(c1, 2 * c1, 1)

    try:
        assert {"ThrowAwayScale", "ThrowAwayWider"} <= {s.name for s in REGISTRY.specs()}
        check_contract(REGISTRY.get("ThrowAwayScale"), tmp_path)
        with pytest.raises(AssertionError, match="ThrowAwayWider: declares 16 output channels, gives 32"):
            check_contract(REGISTRY.get("ThrowAwayWider"), tmp_path)
    finally:
        REGISTRY.remove("ThrowAwayScale")
        REGISTRY.remove("ThrowAwayWider")
    assert "ThrowAwayScale" not in REGISTRY and "ThrowAwayWider" not in REGISTRY


def test_example_field_accepts_args_an_example_or_several():
    @register(name="ThrowAwayPlain", width_args=(), out=out_same, coupling="tied", example=[1, 2])
    class ThrowAwayPlain(nn.Identity):
        pass

    try:
        (only,) = REGISTRY.get("ThrowAwayPlain").examples
        assert only.args == [1, 2] and only.inputs == (16,) and only.n == 1
        with pytest.raises(TypeError, match="example must be"):
            register(name="ThrowAwayBad", example={"args": [1]})(type("ThrowAwayBad", (nn.Identity,), {}))
    finally:
        REGISTRY.remove("ThrowAwayPlain")


# ------------------------------------------------------------------------------------------ completeness
def test_import_models_registers_every_block():
    """In a fresh interpreter: the registry after ``import models`` equals the registry after importing every
    module under models/, so a YAML may name any block (DPConv, C3Light...) whatever was imported first."""
    code = ("import importlib, pkgutil, models; from models.registry import REGISTRY; first = REGISTRY.names(); "
            "[importlib.import_module(f'models.{m.name}') for m in pkgutil.iter_modules(models.__path__)]; "
            "print(first == REGISTRY.names(), len(first), 'DPConv' in first, 'MultiHeadClassify' in first)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", str(len(REGISTRY.names())), "True", "True"]


# Leaf utils modules models/ may import (each imports at most utils.common.errors); tests/test_imports.py checks
# that nothing imports in a circle.
MODELS_MAY_IMPORT = {"utils.common.torch_utils", "utils.common.errors", "utils.common.cli", "utils.common.paths",
                     "utils.common.user_files", "utils.common.flags"}


def project_imports(module: str) -> set[str]:
    """Project modules ``module`` imports, at module level or inside functions (absolute imports only)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found |= {n for n in names if n.split(".")[0] in {"models", "utils"} and _is_module(n)}
    return found - {module}


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_models_import_only_leaf_utils():
    """Building a model needs nothing of training, data or export: models/ imports only leaf utils modules."""
    graph = {f"models.{p.stem}": project_imports(f"models.{p.stem}") for p in (ROOT / "models").glob("*.py")
             if p.stem != "__init__"}
    graph["models"] = project_imports("models")
    utils_used = {m for targets in graph.values() for m in targets if m.startswith("utils")}
    assert utils_used <= MODELS_MAY_IMPORT, utils_used - MODELS_MAY_IMPORT
    for module in MODELS_MAY_IMPORT:
        assert project_imports(module) <= {"utils.common.errors"}, module

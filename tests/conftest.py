"""Shared test fixtures: paths to the embedded sample and to ../shared (skipped with a reason if absent); weights
that make every BatchNorm of a model matter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config: pytest.Config) -> None:
    """README's test command runs two pytest-xdist workers on CI's two cores; each computes with one thread, and
    so do the processes its tests start (two workers with two threads each on two cores slow each other far
    more than twice)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The files that take longest on CI's two workers, longest first (from the durations `.ci/run` prints). pytest-xdist
# hands out whole files (--dist loadfile) in collection order (--no-loadscope-reorder: its own order puts files with
# many tests first, which left the one-test chain file for the end and one worker idle for a minute); starting the
# long files first lets the short ones fill in, so both workers finish together.
LONGEST_FILES = ("test_prune.py", "test_compress_chain.py", "test_qat.py", "test_sparse.py", "test_train_smoke.py",
                 "test_export.py", "test_distill.py", "test_bad_inputs.py", "test_val_reference.py",
                 "test_train_parts.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long files first (:data:`LONGEST_FILES`), the rest in their usual order; tests within a file keep theirs."""
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


@pytest.fixture
def reference_threads():
    """Two compute threads for the length of a test whose reference outputs were written with two (a float sum
    split over another number of threads is added in another order, and differs in its last bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the calling test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (the ../shared folder with data sets and fixtures is absent)")
    return path


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_data_yaml() -> Path:
    return ROOT / "data" / "neu-det-sample.yaml"


@pytest.fixture(scope="session")
def neu_det_yaml() -> Path:
    return shared_path("datasets", "neu-det", "neu-det.yaml")


@pytest.fixture(scope="session")
def coco128_yaml() -> Path:
    return shared_path("datasets", "coco128", "coco128.yaml")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return shared_path("fixtures")


def write_jpg(path: Path, color=(0, 0, 255), size=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((*size, 3), color, np.uint8)
    cv2.imwrite(str(path), img)
    return path


def make_two_head_set(root: Path, n: int = 8) -> Path:
    """Filename-fields set with two heads; every third image lacks its type label."""
    for split in ("train", "val"):
        for i in range(n):
            type_field = "x" if i % 3 == 0 else str(i % 4)
            write_jpg(root / "images" / split / f"{i:05d}_{i % 3}_{type_field}_.jpg", (40 * i % 255, 80, 160))
    data = {"path": str(root), "train": "images/train", "val": "images/val",
            "heads": [{"name": "color", "names": ["k", "b", "r"], "weight": 2.0},
                      {"name": "type", "names": ["d", "j", "s", "h"]}]}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def spread_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Variance-keeping conv weights (Kaiming) and random BatchNorm statistics and affine terms, in place.

    With PyTorch's default init the activations shrink layer by layer, and skipping one BatchNorm of a zoo
    detector moves its decoded boxes by under 0.1 px, inside the tolerances that compare folded and unfolded
    models; with these weights it moves them by pixels, so a BatchNorm that is dropped or folded wrongly shows.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 2.0),
                                          (module.weight, 0.5, 1.5), (module.bias, -0.2, 0.2)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model


def flat_tensors(output) -> list[torch.Tensor]:
    """Every tensor a layer or model returns, in order (lists, tuples; a multi-head dict in heads order)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in flat_tensors(item)]

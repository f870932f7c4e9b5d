"""Shared test fixtures: paths to the embedded sample and to ../shared (skipped with a reason if absent)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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

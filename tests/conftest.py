from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def shared_data() -> Path:
    """Real test images in ../shared/data; tests using it skip when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (real-data tests run only in the team checkout)")
    return SHARED_DATA

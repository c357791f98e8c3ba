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


# ---------------------------------------------------------------------------- planned_workspace
# A workspace holding the planner's own default-preset plan of real data, for the DDP and GPU tests.
# The plan comes from all 24 cases of ../shared/data/hippocampus-dev (exactly nnU-Net's plan: 4 stages,
# 32-256 features, patch 40x56x40 and 56x40); to keep the tests short only the first N_PREPROCESSED
# cases are preprocessed (training needs the store, not the whole dataset). Without the shared folder
# a synthetic MR dataset is planned the same way.

N_PREPROCESSED = 6
REAL = SHARED_DATA / "hippocampus-dev"


def _source(root: Path) -> Path:
    if REAL.is_dir():
        return REAL
    from voxflow.synthetic import make_dataset

    return Path(make_dataset(root / "synthetic", kind="mr", n_cases=N_PREPROCESSED))


@pytest.fixture(scope="session")
def planned_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a workspace with plans.json (default preset) and preprocessed ``3d_fullres`` and ``2d``."""
    from voxflow.fingerprint import compute_fingerprint
    from voxflow.io import convert
    from voxflow.plan import plan_experiment
    from voxflow.preprocess import run_preprocess
    from voxflow.workspace import Workspace

    root = tmp_path_factory.mktemp("planned")
    work = Workspace(root / "work").ensure()
    store = convert(_source(root), work.dataset_store, progress=False)
    fp = compute_fingerprint(store, progress=False)
    fp.save(work.fingerprint)
    plan = plan_experiment(fp, preset="default")
    plan.save(work.plans)
    cases = store.case_ids()[:N_PREPROCESSED]
    for name in ("3d_fullres", "2d"):
        run_preprocess(store, plan, name, work.preprocessed(name), case_ids=cases, progress=False)
    return work.root

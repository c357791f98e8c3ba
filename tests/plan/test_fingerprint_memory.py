from __future__ import annotations

import json
import math

import numpy as np
import pytest

from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store
from voxflow.synthetic import large_volume_slab
from voxflow.testing import run_with_memory_cap

SHAPE = (192, 512, 768)  # float32 image + uint8 label: 377 MB
CAP = 340 * 10**6  # RLIMIT_DATA of the fingerprinting process, below the case's size


@pytest.mark.slow  # ~60 s on 2 shared cores: writes the 377 MB case slab by slab, then fingerprints it
def test_case_larger_than_memory_cap(tmp_path) -> None:
    store = Store.create(
        tmp_path / "big.zarr", DatasetMeta(channel_names=("CT",), labels={"background": 0, "organ": 1, "lesion": 2})
    )
    store.begin_case("big", geometry=Geometry(shape_zyx=SHAPE, spacing_zyx=(1.0, 0.8, 0.8)))
    image = store.create_array("big", "image", shape=(1, *SHAPE), dtype="float32", chunks=(1, 64, 128, 128))
    label = store.create_array("big", "label", shape=SHAPE, dtype="uint8", chunks=(64, 128, 128))
    counts = np.zeros(3, np.int64)
    lo, hi = np.full(3, np.iinfo(np.int64).max), np.full(3, -1)
    for z0 in range(0, SHAPE[0], 64):
        img, lab = large_volume_slab(SHAPE, z0, z0 + 64, dtype="float32")
        image[0, z0 : z0 + 64] = img
        label[z0 : z0 + 64] = lab
        counts += np.bincount(lab.ravel(), minlength=3)[:3]
        nz = np.argwhere(img != 0)
        if nz.size:
            lo = np.minimum(lo, nz.min(0) + (z0, 0, 0))
            hi = np.maximum(hi, nz.max(0) + (z0 + 1, 1, 1))
    store.mark_complete("big")
    case_bytes = math.prod(SHAPE) * 5
    code = (
        "import dask, json, zarr\n"
        "dask.config.set(num_workers=2); zarr.config.set({'threading.max_workers': 2})\n"
        "from voxflow.fingerprint import compute_fingerprint\n"
        f"fp = compute_fingerprint({str(store.path)!r}, progress=False)\n"
        "print(json.dumps(fp.to_dict()))\n"
    )
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    peak, out = run_with_memory_cap(code, cap_bytes=CAP, env=env, timeout=600)
    assert CAP < case_bytes
    assert peak < case_bytes
    case = json.loads(out.splitlines()[-1])["cases"][0]
    assert case["class_voxel_counts"] == {str(v): int(c) for v, c in enumerate(counts) if c}
    assert case["nonzero_bbox_zyx"] == [[int(a), int(b)] for a, b in zip(lo, hi, strict=True)]
    assert case["n_components"] is None  # too large for the whole-case scipy count

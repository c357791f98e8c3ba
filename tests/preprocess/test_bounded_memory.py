"""Bounded memory: a case larger than the subprocess's memory cap, checked piecewise against scipy."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import scipy.ndimage as ndi

from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store
from voxflow.testing import run_with_memory_cap

SHAPE = (256, 1000, 1000)  # 1.02 GB of float32
CAP = 800 * 2**20  # RLIMIT_DATA (virtual data incl. thread stacks) of the subprocess: less than the volume
SPACING_OUT = 1.25  # from 1 mm: (205, 800, 800)


def _write_volume(path) -> Store:
    store = Store.create(path, DatasetMeta(channel_names=("MR",), labels={"background": 0}))
    store.begin_case("big", geometry=Geometry(shape_zyx=SHAPE, spacing_zyx=(1.0, 1.0, 1.0)))
    arr = store.create_array("big", "image", shape=(1, *SHAPE), dtype=np.float32, chunks=(1, 32, 128, 128))
    y, x = np.ogrid[0 : SHAPE[1], 0 : SHAPE[2]]
    for z0 in range(0, SHAPE[0], 16):
        z = np.arange(z0, z0 + 16)[:, None, None]
        slab = 100 + 40 * np.sin(z / 7.0) * np.cos(y / 13.0) + np.random.default_rng(z0).normal(0, 5, (16, *SHAPE[1:]))
        arr[0, z0 : z0 + 16] = slab.astype(np.float32)
    store.mark_complete("big")
    return store


def _stats(arr) -> tuple[float, float]:
    s1 = s2 = 0.0
    for z0 in range(0, SHAPE[0], 16):
        slab = arr[0, z0 : z0 + 16].astype(np.float64)
        s1, s2 = s1 + slab.sum(), s2 + (slab * slab).sum()
    n = float(np.prod(SHAPE))
    mean = s1 / n
    return mean, float(np.sqrt(s2 / n - mean * mean))


def _reference_slab(arr, mean: float, std: float, out_shape, o0: int, o1: int, halo: int = 24) -> np.ndarray:
    """scipy affine_transform (zoom mapping of voxflow) of an input z-slab with a wide halo."""
    scale = [i / o for i, o in zip(SHAPE, out_shape, strict=True)]
    lo = max(0, int(np.floor((o0 + 0.5) * scale[0] - 0.5)) - halo)
    hi = min(SHAPE[0], int(np.ceil((o1 - 0.5) * scale[0] - 0.5)) + 1 + halo)
    slab = ((arr[0, lo:hi].astype(np.float64) - mean) / std).astype(np.float32)
    offset = [(o0 + 0.5) * scale[0] - 0.5 - lo, 0.5 * scale[1] - 0.5, 0.5 * scale[2] - 0.5]
    return ndi.affine_transform(
        slab, scale, offset=offset, output_shape=(o1 - o0, *out_shape[1:]), order=3, mode="nearest"
    )


@pytest.mark.slow
def test_case_larger_than_memory_cap_is_preprocessed_exactly(tmp_path, helpers) -> None:
    from voxflow.plan.schema import ChannelNormalization

    src = _write_volume(tmp_path / "big.zarr")
    config = helpers.make_config(
        spacing_zyx=(SPACING_OUT,) * 3, patch=(64, 128, 128), norms=(ChannelNormalization(scheme="zscore"),)
    )
    helpers.make_plan(config, channels=("MR",)).save(tmp_path / "plans.json")
    code = textwrap.dedent(f"""
        from voxflow.plan.schema import Plan
        from voxflow.preprocess import run_preprocess
        run_preprocess({str(src.path)!r}, Plan.load({str(tmp_path / "plans.json")!r}), "3d_fullres",
                       {str(tmp_path / "pp.zarr")!r}, progress=False)
    """)
    peak, _ = run_with_memory_cap(code, cap_bytes=CAP, timeout=900)
    volume_bytes = 4 * int(np.prod(SHAPE))
    assert peak < volume_bytes, f"peak RSS {peak / 2**20:.0f} MB for a {volume_bytes / 2**20:.0f} MB volume"
    out = Store.open(tmp_path / "pp.zarr")
    got = out.zarr_array("big", "image")
    out_shape = tuple(got.shape[1:])
    assert out_shape == tuple(round(s / SPACING_OUT) for s in SHAPE)
    mean, std = _stats(src.zarr_array("big", "image"))
    for o0 in (0, 57, out_shape[0] - 13):  # first, an inner and the last slab (chunk borders inside)
        ref = _reference_slab(src.zarr_array("big", "image"), mean, std, out_shape, o0, o0 + 13)
        np.testing.assert_allclose(got[0, o0 : o0 + 13], ref, atol=1e-4 * float(np.ptp(ref)))

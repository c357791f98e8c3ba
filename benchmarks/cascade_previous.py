"""Stored ``prev_seg`` vs computing the previous-stage patch on the fly, per training patch.

Makes one synthetic case (original grid ``--shape``, spacing 1 mm; cascade grid at ``--spacing``),
a first-stage label map on the original grid, and measures per random patch of ``--patch`` voxels:

* ``stored``: read the patch from the ``prev_seg`` array written once (what training does), plus
  the one-time cost of writing it;
* ``on_the_fly``: slice the lazy crop + label resampling graph (:func:`previous_onto_grid`) to the
  patch and compute it (what a sampler without the stored array would do per patch).

Prints JSON (milliseconds per patch, seconds for the one-time write).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec
from voxflow.preprocess import previous_onto_grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=(160, 320, 320))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 0.8))
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 96, 96))
    ap.add_argument("--n", type=int, default=20)
    a = ap.parse_args()
    shape = tuple(a.shape)
    spec = NetworkSpec(
        n_stages=1,
        features_per_stage=(4,),
        kernel_sizes=((1, 1, 1),),
        strides=((1, 1, 1),),
        n_blocks_per_stage=(1,),
        n_conv_per_stage_decoder=(),
    )
    cfg = Configuration(
        name="3d_cascade_fullres",
        spacing_zyx=tuple(a.spacing),
        median_shape_vox=shape,
        patch_size_vox=(8, 8, 8),
        batch_size=2,
        resampling=ResamplingSpec(),
        network=spec,
        normalization=(ChannelNormalization(scheme="zscore"),),
        previous_stage="3d_lowres",
    )
    out_shape = tuple(int(round(n / s)) for n, s in zip(shape, a.spacing, strict=True))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        lab_np = np.zeros(shape, np.uint8)
        g = np.ogrid[tuple(slice(0, n) for n in shape)]
        lab_np[sum(((x - n / 2) / (n / 3)) ** 2 for x, n in zip(g, shape, strict=True)) < 1] = 1
        lab_np[sum(((x - n / 2) / (n / 6)) ** 2 for x, n in zip(g, shape, strict=True)) < 1] = 2
        src = zarr.create_array(str(Path(tmp) / "lab.zarr"), shape=shape, chunks=(64, 128, 128), dtype=np.uint8)
        src[...] = lab_np
        lazy = previous_onto_grid(
            da.from_zarr(src),
            cfg,
            crop_bbox_zyx=tuple((0, n) for n in shape),
            out_shape_zyx=out_shape,
            values=(1, 2),
            out_chunks=(64, 128, 128),
        )
        t0 = time.perf_counter()
        dst = zarr.create_array(str(Path(tmp) / "prev.zarr"), shape=out_shape, chunks=(64, 128, 128), dtype=np.uint8)
        da.store(lazy.rechunk((64, 128, 128)), dst, lock=False)
        write_s = time.perf_counter() - t0
        corners = [
            [int(rng.integers(0, max(1, n - p))) for n, p in zip(out_shape, a.patch, strict=True)] for _ in range(a.n)
        ]
        box = [tuple(slice(c, c + p) for c, p in zip(lo, a.patch, strict=True)) for lo in corners]
        t0 = time.perf_counter()
        for b in box:
            np.asarray(dst[b])
        stored_ms = (time.perf_counter() - t0) / a.n * 1e3
        t0 = time.perf_counter()
        for b in box:
            lazy[b].compute()
        fly_ms = (time.perf_counter() - t0) / a.n * 1e3
    print(
        json.dumps(
            {
                "original_shape": shape,
                "cascade_shape": out_shape,
                "patch": a.patch,
                "patches": a.n,
                "stored_ms_per_patch": round(stored_ms, 1),
                "on_the_fly_ms_per_patch": round(fly_ms, 1),
                "one_time_write_s": round(write_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()

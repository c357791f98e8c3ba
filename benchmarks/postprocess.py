"""Chunked connected components against ``scipy.ndimage.label`` on the whole array; prints JSON.

A random uint8 mask of ``--shape`` (z y x) is written chunk by chunk into a Zarr array (never held
whole), then, each in its own subprocess so that peak RSS is measured separately:

* ``chunked``: ``voxflow.postprocess.label_components`` on ``da.from_zarr`` (threaded scheduler),
  with the labels reduced block by block (their maximum, which must equal ``n``) -- the volume
  is never in memory;
* ``chunked_write`` (with ``--write``): the same, writing the int32 labels to a Zarr array;
* ``scipy``: read the whole array and ``scipy.ndimage.label`` it.

The issue asks for at least 1G voxels (``--shape 1024 1024 1024``); scipy then needs ~5 GB.

    python benchmarks/postprocess.py --quick                 # 128 x 256 x 256, a few seconds
    python benchmarks/postprocess.py --shape 1024 1024 1024  # the 1G-voxel figure
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from voxflow.testing import run_with_memory_cap


def write_mask(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], density: float, seed: int) -> None:
    """Random blobs: per chunk, noise at ``density`` after a 2-voxel box filter (mixed sizes)."""
    import scipy.ndimage as ndi

    arr = zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=np.uint8, fill_value=0)
    grid = [range(0, s, c) for s, c in zip(shape, chunks, strict=True)]
    for i, z in enumerate(grid[0]):
        for j, y in enumerate(grid[1]):
            for k, x in enumerate(grid[2]):
                rng = np.random.default_rng([seed, i, j, k])
                sl = tuple(slice(o, min(o + c, s)) for o, c, s in zip((z, y, x), chunks, shape, strict=True))
                block_shape = tuple(s.stop - s.start for s in sl)
                noise = ndi.uniform_filter(rng.random(block_shape, dtype=np.float32), size=2)
                arr[sl] = (noise < density).astype(np.uint8)


CHUNKED = """
import time, dask, dask.array as da, numpy as np, zarr
from voxflow.postprocess import label_components
mask = da.from_zarr(zarr.open_array({path!r}, mode="r"))
with dask.config.set(scheduler="threads", num_workers={workers}):
    t0 = time.perf_counter()
    labels, n = label_components(mask, connectivity={connectivity})
    if {write!r}:
        out = zarr.create_array(store={out!r}, shape=mask.shape, chunks=mask.chunksize, dtype=np.int32,
                                fill_value=0)
        da.store(labels, out, lock=False)
        top = n
    else:
        top = int(labels.max().compute())
    dt = time.perf_counter() - t0
print("RESULT", n, top, dt)
"""

SCIPY = """
import time, numpy as np, zarr, scipy.ndimage as ndi
t0 = time.perf_counter()
mask = zarr.open_array({path!r}, mode="r")[...]
labels, n = ndi.label(mask, ndi.generate_binary_structure(3, {connectivity}))
dt = time.perf_counter() - t0
print("RESULT", n, int(labels.max()), dt)
"""


def run(code: str, voxels: int) -> dict[str, Any]:
    peak, out = run_with_memory_cap(textwrap.dedent(code), timeout=3600)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    _, n, top, dt = line.split()
    return {
        "n_components": int(n),
        "max_label": int(top),
        "seconds": round(float(dt), 3),
        "voxels_per_s": round(voxels / float(dt)),
        "peak_rss_bytes": peak,
        "peak_rss_mib": round(peak / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(256, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--chunks", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--density", type=float, default=0.35, help="threshold of the smoothed noise (foreground share)")
    p.add_argument("--connectivity", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--workers", type=int, default=2, help="threads of the chunked run")
    p.add_argument("--write", action="store_true", help="chunked run writes its labels to Zarr")
    p.add_argument("--skip-scipy", action="store_true", help="only the chunked run (when scipy would not fit)")
    p.add_argument("--quick", action="store_true", help="128 x 256 x 256 voxels")
    p.add_argument("--tmp", default=None, help="folder for the Zarr arrays (default: system temp)")
    args = p.parse_args()
    shape = (128, 256, 256) if args.quick else tuple(args.shape)
    voxels = int(np.prod(shape))
    tmp = Path(tempfile.mkdtemp(prefix="voxflow-bench-pp-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        write_mask(tmp / "mask.zarr", shape, tuple(args.chunks), args.density, seed=0)
        fmt = {
            "path": str(tmp / "mask.zarr"),
            "out": str(tmp / "labels.zarr"),
            "connectivity": args.connectivity,
            "workers": args.workers,
            "write": args.write,
        }
        result: dict[str, Any] = {
            "shape_zyx": list(shape),
            "voxels": voxels,
            "chunks_zyx": list(args.chunks),
            "dtype": "uint8",
            "connectivity": args.connectivity,
            "mask_written_s": round(time.perf_counter() - t0, 2),
        }
        result["chunked"] = run(CHUNKED.format(**fmt), voxels)
        if not args.skip_scipy:
            result["scipy"] = run(SCIPY.format(**fmt), voxels)
            result["same_count"] = result["chunked"]["n_components"] == result["scipy"]["n_components"]
            result["rss_ratio_chunked_over_scipy"] = round(
                result["chunked"]["peak_rss_bytes"] / result["scipy"]["peak_rss_bytes"], 3
            )
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

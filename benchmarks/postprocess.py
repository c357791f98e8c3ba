"""Chunked connected components against ``scipy.ndimage.label`` on the whole array; prints JSON.

A random uint8 mask of ``--shape`` (z y x) is written chunk by chunk into a Zarr array (never held
whole), then, each in its own subprocess so that peak RSS is measured separately:

* ``chunked``: ``voxflow.postprocess.label_components`` on ``da.from_zarr`` (threaded scheduler),
  with the labels reduced block by block (their maximum, which must equal ``n``) -- the volume
  is never in memory;
* ``chunked_write`` (with ``--write``): the same, writing the int32 labels to a Zarr array;
* ``scipy``: read the whole array and ``scipy.ndimage.label`` it.

``--compare DIR`` also runs the chunked side with another voxflow checkout (``DIR`` is put first on
``sys.path`` inside the subprocess, since ``python -c`` would import the current folder's copy
first) as ``before``, interleaved with this checkout's ``after`` for ``--repeat`` rounds so that a
shared machine's load hits both alike; medians are reported with every run, the process CPU
seconds (user + system, all threads) and the scratch-folder bytes of the labels (where the code
has ``scratch_dir``). ``--workers`` takes several thread counts. The issue's goal is >= 216 M
voxels/s on 1G voxels (3x 72 M) at the same peak RSS.

The issue asks for at least 1G voxels (``--shape 1024 1024 1024``); scipy then needs ~5 GB.

    python benchmarks/postprocess.py --quick                 # 128 x 256 x 256, a few seconds
    python benchmarks/postprocess.py --shape 1024 1024 1024  # the 1G-voxel figure
    python benchmarks/postprocess.py --shape 512 512 512 --workers 1 2 --skip-scipy --compare ../main --repeat 3
    python benchmarks/postprocess.py --shape 512 512 512 --mask organ --op keep-largest --compare ../main

``--mask organ`` writes a segmentation-like mask (one ellipsoid, 100 one-voxel specks) instead of random
blobs; ``--op keep-largest`` times ``keep_largest_component`` (and scipy's label + largest) instead of
labelling, reporting the voxels kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from voxflow.testing import run_with_memory_cap


def write_mask(
    path: Path,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    density: float,
    seed: int,
    filled: float = 1.0,
    kind: str = "blobs",
) -> None:
    """Random blobs: per chunk, noise at ``density`` after a 2-voxel box filter (mixed sizes).

    Only a share ``filled`` of the chunks (drawn per chunk) gets blobs; the others stay background,
    unwritten (Zarr's fill value), as most chunks of an organ or lesion mask. ``kind="organ"`` writes
    a segmentation instead: one ellipsoid (radii 0.35 of each axis' length) and 100 one-voxel specks.
    """
    import scipy.ndimage as ndi

    arr = zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=np.uint8, fill_value=0)
    grid = [range(0, s, c) for s, c in zip(shape, chunks, strict=True)]
    if kind == "organ":
        _write_organ(arr, shape, grid, chunks, seed)
        return
    for i, z in enumerate(grid[0]):
        for j, y in enumerate(grid[1]):
            for k, x in enumerate(grid[2]):
                rng = np.random.default_rng([seed, i, j, k])
                if filled < 1 and rng.random() >= filled:
                    continue
                sl = tuple(slice(o, min(o + c, s)) for o, c, s in zip((z, y, x), chunks, shape, strict=True))
                block_shape = tuple(s.stop - s.start for s in sl)
                noise = ndi.uniform_filter(rng.random(block_shape, dtype=np.float32), size=2)
                arr[sl] = (noise < density).astype(np.uint8)


def _write_organ(arr: Any, shape: tuple[int, ...], grid: list[range], chunks: tuple[int, ...], seed: int) -> None:
    specks = np.random.default_rng(seed).integers(0, shape, size=(100, 3))
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                sl = tuple(slice(o, min(o + c, s)) for o, c, s in zip((z, y, x), chunks, shape, strict=True))
                axes = np.ogrid[sl]
                r2 = sum(((a - s / 2) / (0.35 * s)) ** 2 for a, s in zip(axes, shape, strict=True))
                block = (r2 < 1).astype(np.uint8)
                inside = np.all([(specks[:, i] >= sl[i].start) & (specks[:, i] < sl[i].stop) for i in range(3)], axis=0)
                for p in specks[inside]:
                    block[tuple(p - [s.start for s in sl])] = 1
                if block.any():
                    arr[sl] = block


CHUNKED = """
import sys
if {checkout!r}:
    sys.path.insert(0, {checkout!r})
import inspect, os, time, dask, dask.array as da, numpy as np, zarr
import voxflow
from voxflow.postprocess import keep_largest_component, label_components
mask = da.from_zarr(zarr.open_array({path!r}, mode="r"))
kw = {{"scratch_dir": {scratch!r}}} if "scratch_dir" in inspect.signature(label_components).parameters else {{}}
with dask.config.set(scheduler="threads", num_workers={workers}):
    t0, c0 = time.perf_counter(), time.process_time()
    if {op!r} == "keep-largest":  # n: -1; top: the voxels kept
        kept = keep_largest_component(mask, "foreground", connectivity={connectivity})
        n, top, scratch = -1, int((kept != 0).sum(dtype=np.int64).compute()), 0
    else:
        labels, n = label_components(mask, connectivity={connectivity}, **kw)
        scratch = sum(f.stat().st_size for f in __import__("pathlib").Path({scratch!r}).rglob("*.lab"))
        if {write!r}:
            out = zarr.create_array(store={out!r}, shape=mask.shape, chunks=mask.chunksize, dtype=np.int32,
                                    fill_value=0)
            da.store(labels, out, lock=False)
            top = n
        else:
            top = int(labels.max().compute())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print("RESULT", n, top, dt, cpu, scratch, os.path.dirname(voxflow.__file__))
"""

SCIPY = """
import time, numpy as np, zarr, scipy.ndimage as ndi
t0 = time.perf_counter()
mask = zarr.open_array({path!r}, mode="r")[...]
labels, n = ndi.label(mask, ndi.generate_binary_structure(3, {connectivity}))
top = int(labels.max())
if {op!r} == "keep-largest":
    n, top = -1, int(np.bincount(labels.ravel())[1:].max()) if n else 0
dt = time.perf_counter() - t0
print("RESULT", n, top, dt)
"""


def run(code: str, voxels: int) -> dict[str, Any]:
    peak, out = run_with_memory_cap(textwrap.dedent(code), timeout=3600)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    _, n, top, dt, *rest = line.split()
    out: dict[str, Any] = {
        "n_components": int(n),  # -1 for keep-largest
        "max_label": int(top),  # keep-largest: the voxels kept
        "seconds": round(float(dt), 3),
        "voxels_per_s": round(voxels / float(dt)),
        "peak_rss_bytes": peak,
        "peak_rss_mib": round(peak / 2**20, 1),
    }
    if rest:
        cpu, scratch, package = rest
        out |= {"cpu_s": round(float(cpu), 3), "scratch_bytes": int(scratch), "voxflow": package}
    return out


def run_chunked(fmt: dict[str, Any], voxels: int, variants: dict[str, str], workers: list[int], repeat: int) -> Any:
    """Chunked side per variant (name -> checkout, "" = this one) and thread count, interleaved."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {v: {w: [] for w in workers} for v in variants}
    for _ in range(repeat):
        for w in workers:
            for name, checkout in variants.items():
                runs[name][w].append(run(CHUNKED.format(**{**fmt, "workers": w, "checkout": checkout}), voxels))
    out: dict[str, Any] = {}
    for name, by_w in runs.items():
        out[name] = {}
        for w, rows in by_w.items():
            med = {k: statistics.median(r[k] for r in rows) for k in ("seconds", "voxels_per_s", "peak_rss_mib")}
            if "cpu_s" in rows[0]:
                med["cpu_s"] = statistics.median(r["cpu_s"] for r in rows)
            out[name][f"workers_{w}"] = {"median": med, "runs": rows}
    return out


GOAL_VOXELS_PER_S = 216_000_000  # issue 20: 3x the 72 M voxels/s measured at 1024^3 before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(256, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--chunks", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--density", type=float, default=0.35, help="threshold of the smoothed noise (foreground share)")
    p.add_argument("--filled", type=float, default=1.0, help="share of the chunks with blobs (the rest background)")
    p.add_argument(
        "--mask",
        choices=("blobs", "organ"),
        default="blobs",
        help="blobs: random blobs at --density; organ: one ellipsoid and 100 specks (a segmentation)",
    )
    p.add_argument(
        "--op",
        choices=("label", "keep-largest"),
        default="label",
        help="label: label_components (its maximum, or --write); keep-largest: keep_largest_component (voxels kept)",
    )
    p.add_argument("--connectivity", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="threads of the chunked run (several: each)")
    p.add_argument("--write", action="store_true", help="chunked run writes its labels to Zarr")
    p.add_argument("--skip-scipy", action="store_true", help="only the chunked run (when scipy would not fit)")
    p.add_argument("--quick", action="store_true", help="128 x 256 x 256 voxels")
    p.add_argument("--compare", default=None, metavar="DIR", help="also run this voxflow checkout as 'before'")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the chunked runs (medians reported)")
    p.add_argument(
        "--tmp", default=None, help="folder for the Zarr arrays and the scratch labels (default: system temp)"
    )
    args = p.parse_args()
    shape = (128, 256, 256) if args.quick else tuple(args.shape)
    voxels = int(np.prod(shape))
    tmp = Path(tempfile.mkdtemp(prefix="voxflow-bench-pp-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        write_mask(
            tmp / "mask.zarr", shape, tuple(args.chunks), args.density, seed=0, filled=args.filled, kind=args.mask
        )
        (tmp / "scratch").mkdir()
        fmt = {
            "path": str(tmp / "mask.zarr"),
            "out": str(tmp / "labels.zarr"),
            "scratch": str(tmp / "scratch"),
            "connectivity": args.connectivity,
            "write": args.write,
            "op": args.op,
        }
        result: dict[str, Any] = {
            "shape_zyx": list(shape),
            "voxels": voxels,
            "chunks_zyx": list(args.chunks),
            "dtype": "uint8",
            "mask": args.mask,
            "op": args.op,
            "density": args.density,
            "filled_chunk_share": args.filled,
            "connectivity": args.connectivity,
            "mask_written_s": round(time.perf_counter() - t0, 2),
            "cpu_count": os.cpu_count(),
            "load_avg_start": round(os.getloadavg()[0], 2),
            "goal_voxels_per_s": GOAL_VOXELS_PER_S,
        }
        variants = {"after": ""}
        if args.compare:
            variants = {"before": str(Path(args.compare).resolve()), **variants}
        chunked = run_chunked(fmt, voxels, variants, list(args.workers), args.repeat)
        result["chunked"] = chunked["after"]
        if args.compare:
            result["chunked_before"] = chunked["before"]
            result["speedup_after_over_before"] = {
                w: round(chunked["before"][w]["median"]["seconds"] / chunked["after"][w]["median"]["seconds"], 2)
                for w in chunked["after"]
            }
        result["goal_met"] = {w: r["median"]["voxels_per_s"] >= GOAL_VOXELS_PER_S for w, r in chunked["after"].items()}
        if not args.skip_scipy:
            result["scipy"] = run(SCIPY.format(**fmt), voxels)
            first = next(iter(chunked["after"].values()))["runs"][0]
            result["same_count"] = (first["n_components"], first["max_label"]) == (
                result["scipy"]["n_components"],
                result["scipy"]["max_label"],
            )
            result["rss_ratio_chunked_over_scipy"] = round(
                first["peak_rss_bytes"] / result["scipy"]["peak_rss_bytes"], 3
            )
        result["load_avg_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark of ``voxflow.preprocess``: throughput against in-memory scipy, and bounded memory.

(a) ``--cases`` CT-like cases of ``--shape`` voxels (default 20 x 100x200x200, spacing 2.5x0.8x0.8
    mm, resampled to 2.0x1.0x1.0 mm: in-plane order 3, z order 0 as nnU-Net plans anisotropic
    data; labels one-hot linear) through :func:`run_preprocess`, against a straightforward
    in-memory scipy implementation of the same steps (read case, crop, normalise, zoom, foreground
    index, write) run by 2 processes. Reports wall s, voxels/s, peak RSS of the process tree and
    ``speedup = baseline wall / voxflow wall``.
(b) One ``--big-shape`` float32 volume (default 512x1024x1024 = 2.1 GB) resampled with spline
    order 3 on all axes (z-score normalisation: the statistics branch reads the volume again).
    Reports wall s, voxels/s and peak RSS of the process tree (goal: < 1.5 GB on 2 cores).

Prints one JSON object. ``--quick`` shrinks everything for a smoke run while others use the
machine::

    .venv/bin/python benchmarks/preprocess.py --quick
    .venv/bin/python benchmarks/preprocess.py --part b --big-shape 512 1024 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from voxflow.geometry import Geometry
from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, Plan, ResamplingSpec
from voxflow.preprocess import run_preprocess, zoom_reference
from voxflow.preprocess._foreground import foreground_index_eager
from voxflow.store import DatasetMeta, Store

LABELS = {"background": 0, "organ": 1, "lesion": 2}


class PeakRSS:
    """Samples the summed RSS of process ``pid`` and all its descendants every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak, self._stop = pid, interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _measure(call: str) -> dict[str, Any]:
    """Run ``call`` (an expression on this module, imported as ``B``) in a fresh Python process:
    wall seconds (measured inside it) and peak RSS of its process tree (sampled from outside)."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); import preprocess as B; "
        f"t = time.perf_counter(); {call}; print('__WALL__', time.perf_counter() - t)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as rss:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step failed ({proc.returncode}): {call}")
    wall = float(out.split("__WALL__")[1].split()[0])
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss.peak / 2**20)}


def run_voxflow(src: str, plans: str, out: str, scheduler: str, memory_limit: str | None) -> None:
    run_preprocess(
        src,
        Plan.load(plans),
        "3d_fullres",
        out,
        scheduler=scheduler,
        memory_limit=memory_limit,
        overwrite=True,
        progress=False,
    )


def run_baseline(src: str, plans: str, out: str) -> None:
    cfg = Plan.load(plans).configuration("3d_fullres")
    Store.create(out, Store.open(src).meta, overwrite=True)
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_baseline_case, [(src, out, c, cfg) for c in Store.open(src).case_ids()]))


def _config(spacing_zyx, *, separate_z: bool, norm: ChannelNormalization, patch=(64, 128, 128)) -> Configuration:
    net = NetworkSpec(
        n_stages=3,
        features_per_stage=(8, 16, 32),
        kernel_sizes=((3, 3, 3),) * 3,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        n_blocks_per_stage=(2, 2, 2),
        n_conv_per_stage_decoder=(2, 2),
    )
    res = ResamplingSpec(
        image_order=3, label_order=1, separate_z=separate_z, separate_axis=0 if separate_z else None, separate_order=0
    )
    return Configuration(
        name="3d_fullres",
        spacing_zyx=spacing_zyx,
        median_shape_vox=patch,
        patch_size_vox=patch,
        batch_size=2,
        normalization=(norm,),
        resampling=res,
        network=net,
    )


def _ct_case(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU-like volume: air (-1000) around a soft-tissue ellipsoid body, an organ and a lesion."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(-1, 1, complex(0, n)) for n in shape)]
    body = sum((g / r) ** 2 for g, r in zip(grid, (1.2, 0.8, 0.9), strict=False)) < 1
    c = rng.uniform(-0.2, 0.2, 3)
    organ = sum(((g - ci) / r) ** 2 for g, ci, r in zip(grid, c, (0.5, 0.3, 0.3), strict=False)) < 1
    lesion = sum(((g - ci - 0.05) / 0.08) ** 2 for g, ci in zip(grid, c, strict=False)) < 1
    image = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0) + np.where(lesion, -30.0, 0.0)
    image = (image + rng.normal(0, 15, shape)).astype(np.int16)
    label = (organ & body).astype(np.uint8)
    label[lesion & organ] = 2
    return image[None], label


def make_ct_store(path: Path, n_cases: int, shape, chunks=(64, 128, 128)) -> Store:
    meta = DatasetMeta(channel_names=("CT",), labels=LABELS, name="bench_ct")
    store = Store.create(path, meta, overwrite=True)
    for i in range(n_cases):
        cid = f"ct_{i:03d}"
        image, label = _ct_case(shape, seed=i)
        store.begin_case(cid, geometry=Geometry(shape_zyx=shape, spacing_zyx=(2.5, 0.8 + 0.01 * (i % 3), 0.8)))
        store.create_array(cid, "image", shape=image.shape, dtype=image.dtype, chunks=(1, *chunks))[...] = image
        store.create_array(cid, "label", shape=label.shape, dtype=np.uint8, chunks=chunks)[...] = label
        store.mark_complete(cid)
    return store


def _baseline_case(args: tuple[str, str, str, Configuration]) -> int:
    """Same steps eagerly in memory: crop, normalise, zoom (in-plane, then z), fg index, write."""
    src_path, out_path, cid, cfg = args
    src, out = Store.open(src_path), Store.open(out_path, mode="r+")
    image, label, geom = src.zarr_array(cid, "image")[...], src.zarr_array(cid, "label")[...], src.geometry(cid)
    nz = np.argwhere(np.any(image != 0, axis=0))
    box = [(int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0), nz.max(0), strict=False)]
    sl = tuple(slice(a, b) for a, b in box)
    img, lab = image[(slice(None), *sl)], label[sl]
    n = cfg.normalization[0]
    img = ((np.clip(img[0].astype(np.float32), n.lower, n.upper) - n.mean) / n.std).astype(np.float32)
    shape = tuple(
        max(1, round(s * a / b)) for s, a, b in zip(img.shape, geom.spacing_zyx, cfg.spacing_zyx, strict=False)
    )
    inplane = (img.shape[0], *shape[1:])
    out_img = zoom_reference(zoom_reference(img, inplane, order=3), shape, order=0)
    onehot = [
        zoom_reference(zoom_reference((lab == v).astype(np.float32), inplane, order=1), shape, order=0)
        for v in LABELS.values()
    ]
    out_lab = np.argmax(np.stack(onehot), axis=0).astype(np.uint8)
    index, _ = foreground_index_eager(out_lab)
    chunks = tuple(p // 2 for p in cfg.patch_size_vox)
    out.begin_case(cid, geometry=geom)
    out.create_array(cid, "image", shape=(1, *shape), dtype=np.float32, chunks=(1, *chunks))[...] = out_img[None]
    out.create_array(cid, "label", shape=shape, dtype=np.uint8, chunks=chunks)[...] = out_lab
    out.create_array(cid, "fg_index", shape=index.shape, dtype=np.int32, chunks=(max(1, len(index)), 4))[...] = index
    out.mark_complete(cid)
    return int(np.prod(image.shape))


def bench_dataset(work: Path, n_cases: int, shape, scheduler: str) -> dict[str, Any]:
    src = make_ct_store(work / "ct.zarr", n_cases, tuple(shape))
    norm = ChannelNormalization(scheme="ct", mean=60.0, std=40.0, lower=-100.0, upper=200.0)
    cfg = _config((2.0, 1.0, 1.0), separate_z=True, norm=norm)
    Plan(channel_names=("CT",), labels=LABELS, configurations={"3d_fullres": cfg}).save(work / "plans_a.json")
    voxels = n_cases * int(np.prod(shape))
    args = f"{str(src.path)!r}, {str(work / 'plans_a.json')!r}"
    ours = _measure(f"B.run_voxflow({args}, {str(work / 'pp.zarr')!r}, {scheduler!r}, None)")
    base = _measure(f"B.run_baseline({args}, {str(work / 'baseline.zarr')!r})")
    for r in (ours, base):
        r["voxels_per_s"] = round(voxels / r["wall_s"])
    return {
        "cases": n_cases,
        "shape_zyx": list(shape),
        "scheduler": scheduler,
        "voxflow": ours,
        "scipy_2_processes": base,
        "speedup_vs_baseline": round(base["wall_s"] / ours["wall_s"], 2),
    }


def make_big_store(path: Path, shape, chunks=(64, 128, 128)) -> Store:
    """A smooth float32 volume with noise, written slab by slab (never whole in memory)."""
    store = Store.create(path, DatasetMeta(channel_names=("MR",), labels={"background": 0}), overwrite=True)
    store.begin_case("big", geometry=Geometry(shape_zyx=shape, spacing_zyx=(1.0, 1.0, 1.0)))
    arr = store.create_array("big", "image", shape=(1, *shape), dtype=np.float32, chunks=(1, *chunks))
    y, x = np.ogrid[0 : shape[1], 0 : shape[2]]
    for z0 in range(0, shape[0], chunks[0]):
        z = np.arange(z0, min(z0 + chunks[0], shape[0]))[:, None, None]
        slab = 100 + 50 * np.sin(z / 17.0) * np.cos(y / 23.0) * np.sin(x / 29.0)
        slab = slab + np.random.default_rng(z0).normal(0, 5, slab.shape)
        arr[0, z0 : z0 + len(z)] = slab.astype(np.float32)
    store.mark_complete("big")
    return store


def bench_big(work: Path, shape, scheduler: str, memory_limit: str | None) -> dict[str, Any]:
    src = make_big_store(work / "big.zarr", tuple(shape))
    cfg = _config((1.25, 1.25, 1.25), separate_z=False, norm=ChannelNormalization(scheme="zscore"))
    Plan(channel_names=("MR",), labels={"background": 0}, configurations={"3d_fullres": cfg}).save(
        work / "plans_b.json"
    )
    voxels = int(np.prod(shape))
    r = _measure(
        f"B.run_voxflow({str(src.path)!r}, {str(work / 'plans_b.json')!r}, {str(work / 'big_pp.zarr')!r}, "
        f"{scheduler!r}, {memory_limit!r})"
    )
    return {
        "shape_zyx": list(shape),
        "gb_float32": round(voxels * 4 / 1e9, 2),
        "order": 3,
        "scheduler": scheduler,
        **r,
        "voxels_per_s": round(voxels / r["wall_s"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=(100, 200, 200))
    p.add_argument("--big-shape", type=int, nargs=3, default=(512, 1024, 1024))
    p.add_argument("--scheduler", default="threads")
    p.add_argument("--memory-limit", default=None)
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="4 cases of 48x96x96 and a 96x192x192 volume")
    a = p.parse_args()
    if a.quick:
        a.cases, a.shape, a.big_shape = 4, (48, 96, 96), (96, 192, 192)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="voxflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        if a.part in ("a", "both"):
            result["a_dataset"] = bench_dataset(work, a.cases, tuple(a.shape), a.scheduler)
        if a.part in ("b", "both"):
            result["b_big_volume"] = bench_big(work, tuple(a.big_shape), a.scheduler, a.memory_limit)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

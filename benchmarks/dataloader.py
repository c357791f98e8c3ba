"""Throughput of voxflow's training data path; prints one JSON object.

Two scenarios, each with and without augmentation (thread workers reading Zarr, augmentation
with torch on ``--device`` in the consumer thread):

* ``synthetic_plan``: the synthetic CT dataset run through convert -> fingerprint -> plan ->
  preprocess, loaded with its own 3d_fullres patch and batch size.
* ``nnunet_shape``: a preprocessed store of ``--shape`` volumes written directly (chunks of half
  the patch, as voxflow's preprocessing writes them), without and with a chunk cache that holds
  the whole (small) dataset, loaded with
  nnU-Net's reference setting (patch 80x160x160, batch 2) to compare with the figure measured
  for nnU-Net 2.8.1 on this machine (~4.3 batches/s with 2 worker processes, ~1.7 single-threaded).
  If ``nnunetv2`` is importable its figure could be measured here too; it is not installed by
  voxflow, so the script reports ``null`` for it instead.

    python benchmarks/dataloader.py --quick          # ~1 minute on 2 cores

``cpu_s_per_batch`` (process CPU time, all threads, per batch) is the cost that does not depend
on how busy a shared machine is; ``batches_per_s`` is wall-clock and does. ``max_read_patch_vox``
is the enlarged patch; each sample reads only its own footprint inside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from voxflow.data import build_loader
from voxflow.geometry import Geometry
from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec, TrainSpec
from voxflow.store import DatasetMeta, Store

NNUNET_REFERENCE = {
    "batches_per_s_2_workers": 4.3,
    "batches_per_s_single_thread": 1.7,
    "patch": [80, 160, 160],
    "batch_size": 2,
    "note": "nnU-Net 2.8.1, measured on this machine",
}


def _time_loader(
    store: Store,
    config: Configuration,
    *,
    augment: bool,
    n_batches: int,
    workers: int,
    device: str,
    ds_scales: list[tuple[float, ...]] | None,
    cache_mb: float = 0,
) -> dict[str, Any]:
    with build_loader(
        store,
        store.case_ids(),
        config,
        train=True,
        augment=augment,
        num_workers=workers,
        device=device,
        ds_scales=ds_scales,
        seed=0,
        cache_mb=cache_mb,
    ) as loader:
        it = iter(loader)
        for _ in range(2):  # warm-up: threads started, queues filled once
            next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            batch = next(it)
        if batch.image.is_cuda:
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        read = list(loader.spec.read_patch_vox)
        rss = psutil.Process().memory_info().rss
    return {
        "batches_per_s": round(n_batches / dt, 2),
        "patches_per_s": round(n_batches * config.batch_size / dt, 2),
        "cpu_s_per_batch": round(cpu / n_batches, 3),
        "max_read_patch_vox": read,
        "n_batches": n_batches,
        "rss_mb": round(rss / 2**20, 1),
        "chunk_cache_mb": cache_mb,
        "cache_hit_rate": None
        if loader.cache is None
        else round(loader.cache.hits / max(1, loader.cache.hits + loader.cache.misses), 3),
    }


def _synthetic_plan_store(tmp: Path, quick: bool) -> tuple[Store, Configuration, list[tuple[float, ...]]] | None:
    try:
        from voxflow.fingerprint import compute_fingerprint
        from voxflow.io import convert
        from voxflow.nets import deep_supervision_scales
        from voxflow.plan.planner import plan_experiment
        from voxflow.preprocess import run_preprocess
        from voxflow.synthetic import make_dataset
    except ImportError as e:  # a stage is missing from this build
        logging.warning("synthetic_plan scenario skipped: %s", e)
        return None
    raw = make_dataset(tmp / "raw", kind="ct", n_cases=3 if quick else 6, seed=0)
    ds = convert(raw, tmp / "dataset.zarr", progress=False)
    plan = plan_experiment(compute_fingerprint(ds, progress=False))
    pre = run_preprocess(ds, plan, "3d_fullres", tmp / "pre.zarr", progress=False)
    cfg = plan.configuration("3d_fullres")
    return pre, cfg, deep_supervision_scales(cfg.network)


def _smooth_volume(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CT-like smooth intensities (compressible like real scans) with two blob classes."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    r2 = sum(g**2 for g in grids)
    label = np.zeros(shape, np.uint8)
    label[r2 < 0.3] = 1
    label[(grids[0] - 0.2) ** 2 + (grids[1] + 0.3) ** 2 + grids[2] ** 2 < 0.01] = 2
    image = (np.cos(3 * r2) + label * 0.8 + rng.normal(0, 0.05, shape)).astype(np.float32)
    return image[None], label


def _nnunet_shape_store(tmp: Path, shape: tuple[int, int, int], n_cases: int) -> Store:
    meta = DatasetMeta(
        channel_names=("CT",),
        labels={"background": 0, "organ": 1, "lesion": 2},
        kind="preprocessed",
        extra={"configuration": "3d_fullres"},
    )
    store = Store.create(tmp / "nnunet_shape.zarr", meta)
    rng = np.random.default_rng(0)
    chunks = (40, 80, 80)  # half the patch, as voxflow's preprocessing writes them
    for i in range(n_cases):
        cid = f"case_{i:03d}"
        image, label = _smooth_volume(shape, rng)
        store.begin_case(cid, geometry=Geometry(shape_zyx=shape, spacing_zyx=(1.0, 1.0, 1.0)))
        store.create_array(cid, "image", shape=image.shape, dtype="float32", chunks=(1, *chunks))[...] = image
        store.create_array(cid, "label", shape=label.shape, dtype="uint8", chunks=chunks)[...] = label
        rows = np.concatenate(
            [
                np.c_[np.full(n, k), np.argwhere(label == k)[rng.choice(int((label == k).sum()), n, replace=False)]]
                for k in (1, 2)
                for n in [min(10_000, int((label == k).sum()))]
            ]
        ).astype(np.int32)
        store.create_array(
            cid, "fg_index", shape=rows.shape, dtype="int32", chunks=rows.shape, dimension_names=("n", "k")
        )[...] = rows
        store.update_case_attrs(cid, classes_present=[0, 1, 2])
        store.mark_complete(cid)
    return store


def _nnunet_config() -> Configuration:
    k = (3, 3, 3)
    net = NetworkSpec(
        n_stages=5,
        features_per_stage=(32, 64, 128, 256, 320),
        kernel_sizes=(k,) * 5,
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
        n_blocks_per_stage=(2,) * 5,
        n_conv_per_stage_decoder=(2,) * 4,
    )
    return Configuration(
        name="3d_fullres",
        spacing_zyx=(1.0, 1.0, 1.0),
        median_shape_vox=(128, 256, 256),
        patch_size_vox=(80, 160, 160),
        batch_size=2,
        normalization=(ChannelNormalization(scheme="zscore"),),
        resampling=ResamplingSpec(),
        network=net,
        train=TrainSpec(),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and cases")
    ap.add_argument("--workers", type=int, default=2, help="reader threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), help="nnunet_shape volume (z y x)")
    args = ap.parse_args(argv)
    n = 10 if args.quick else 40
    out: dict[str, Any] = {
        "device": args.device,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": psutil.cpu_count(),
        "load_avg_1min_start": round(psutil.getloadavg()[0], 2),
        "scenarios": {},
    }
    from voxflow.nets import deep_supervision_scales

    with tempfile.TemporaryDirectory(prefix="voxflow-bench-") as d:
        tmp = Path(d)
        syn = _synthetic_plan_store(tmp, args.quick)
        if syn is not None:
            store, cfg, scales = syn
            out["scenarios"]["synthetic_plan"] = {
                "patch_size_vox": list(cfg.patch_size_vox),
                "batch_size": cfg.batch_size,
                "augmented": _time_loader(
                    store,
                    cfg,
                    augment=True,
                    n_batches=n * 3,
                    workers=args.workers,
                    device=args.device,
                    ds_scales=scales,
                ),
                "plain": _time_loader(
                    store,
                    cfg,
                    augment=False,
                    n_batches=n * 3,
                    workers=args.workers,
                    device=args.device,
                    ds_scales=scales,
                ),
            }
        cfg = _nnunet_config()
        store = _nnunet_shape_store(tmp, tuple(args.shape), 2 if args.quick else 4)
        scales = deep_supervision_scales(cfg.network)
        res = {
            "patch_size_vox": list(cfg.patch_size_vox),
            "batch_size": cfg.batch_size,
            "volume": list(args.shape),
            "augmented": _time_loader(
                store, cfg, augment=True, n_batches=n, workers=args.workers, device=args.device, ds_scales=scales
            ),
            "augmented_chunk_cache": _time_loader(
                store,
                cfg,
                augment=True,
                n_batches=n,
                workers=args.workers,
                device=args.device,
                ds_scales=scales,
                cache_mb=512,
            ),
            "plain": _time_loader(
                store, cfg, augment=False, n_batches=n, workers=args.workers, device=args.device, ds_scales=scales
            ),
            "nnunet_reference": NNUNET_REFERENCE,
        }
        res["ratio_vs_nnunet_2_workers"] = round(
            res["augmented"]["batches_per_s"] / NNUNET_REFERENCE["batches_per_s_2_workers"], 2
        )
        res["nnunet_measured"] = None if importlib.util.find_spec("nnunetv2") is None else "not run: compare by hand"
        out["scenarios"]["nnunet_shape"] = res
    out["load_avg_1min_end"] = round(psutil.getloadavg()[0], 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return out


if __name__ == "__main__":
    main()

"""Benchmark many small cases: convert + preprocess + evaluate, wall time and CPU utilisation.

A dataset of many small cases (the hippocampus dev cases, ~40x50x40 voxels each, or synthetic
ones) should keep every core busy. Each stage runs in a fresh subprocess (imports included in
``process_s``); inside it ``seconds`` is the stage call alone and ``cpu_util`` its
(user + sys) / wall / cores. Fingerprint and plan are made once, outside the measurement; the
prediction store evaluated is the reference labels shifted by one voxel.

    python benchmarks/small_cases.py --data /work/shared/data/hippocampus-dev
    python benchmarks/small_cases.py --synthetic 150 --shape 24,40,40 --repeat 2
    python benchmarks/small_cases.py --data DIR --compare /path/to/old/checkout --threads-only-variant --repeat 2

Prints one JSON object: per dataset and stage the medians and every repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_STAGE = """
import json, os, threading, time
import psutil
_seen, _stop = {{}}, threading.Event()
def _sample():  # CPU of worker processes (a process pool's workers are not our waited-for children)
    me = psutil.Process()
    while not _stop.is_set():
        for p in me.children(recursive=True):
            try:
                t = p.cpu_times()
                _seen[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        _stop.wait(0.05)
def _pool_cpu():
    _stop.set()
    return sum(_seen.values())
threading.Thread(target=_sample, daemon=True).start()
t0 = time.perf_counter(); c0 = os.times()
{setup}
{body}
c1 = os.times(); t1 = time.perf_counter()
cpu = (c1.user - c0.user) + (c1.system - c0.system) + _pool_cpu()
print("__RESULT__", json.dumps({{"seconds": t1 - t0, "cpu_s": cpu}}))
"""

_BODIES = {
    "convert": (
        "from voxflow.io import convert\nconvert({raw!r}, {work!r} + '/ds.zarr', overwrite=True, progress=False)"
    ),
    "preprocess": (
        "from voxflow.preprocess import run_preprocess\n"
        "run_preprocess({work!r} + '/ds.zarr', {work!r} + '/plans.json', {config!r}, "
        "{work!r} + '/pp.zarr', overwrite=True, progress=False)"
    ),
    "evaluate": (
        "from voxflow.evaluate import evaluate\n"
        "evaluate({work!r} + '/pred.zarr', {work!r} + '/ds.zarr', progress=False)"
    ),
}


def _shape(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.split(","))
    return z, y, x


def _run_stage(stage: str, pool_min: int | None = None, pythonpath: str | None = None, **fmt: str) -> dict[str, float]:
    setup = ("import voxflow.cluster as _c\n" + f"_c.POOL_MIN_CASES = {pool_min}") if pool_min is not None else ""
    code = _STAGE.format(setup=setup, body=_BODIES[stage].format(**fmt))
    t = time.perf_counter()
    c0 = os.times()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})},
    )
    c1 = os.times()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("__RESULT__"))
    res = json.loads(line.split(" ", 1)[1])
    cores = os.cpu_count() or 1
    child_cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return {
        "seconds": round(res["seconds"], 3),
        "cpu_util": round(res["cpu_s"] / res["seconds"] / cores, 3),
        "process_s": round(wall, 3),
        "process_cpu_util": round(child_cpu / wall / cores, 3),
    }


def _setup(raw: Path, work: Path) -> str:
    """Convert once, fingerprint, plan and write the shifted prediction store; returns the config."""
    from voxflow.fingerprint import compute_fingerprint
    from voxflow.io import convert
    from voxflow.plan import plan_experiment
    from voxflow.store import DatasetMeta, Store

    ds = convert(raw, work / "ds.zarr", overwrite=True, progress=False)
    plan = plan_experiment(compute_fingerprint(ds))
    plan.save(work / "plans.json")
    meta = DatasetMeta(channel_names=ds.meta.channel_names, labels=ds.meta.labels, kind="prediction")
    pred = Store.create(work / "pred.zarr", meta, overwrite=True)
    for cid in ds.case_ids():
        lab = np.roll(np.asarray(ds.zarr_array(cid, "label")[...]), 1, axis=-1)
        pred.begin_case(cid, geometry=ds.geometry(cid))
        pred.create_array(cid, "label", shape=lab.shape, dtype=lab.dtype, chunks=lab.shape)[...] = lab
        pred.mark_complete(cid)
    return "3d_fullres" if "3d_fullres" in plan.configurations else sorted(plan.configurations)[0]


def _bench(
    name: str, raw: Path, work: Path, repeat: int, stages: list[str], variants: list[tuple[str, str | None, int | None]]
) -> dict[str, Any]:
    """Every stage ``repeat`` times per variant (label, PYTHONPATH, POOL_MIN_CASES), variants back to
    back within each repeat so that a shared machine's load affects them alike."""
    config = _setup(raw, work)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {v[0]: {s: [] for s in stages} for v in variants}
    for _ in range(repeat):
        for stage in stages:
            for label, path, pool_min in variants:
                runs[label][stage].append(
                    _run_stage(stage, pool_min, path, raw=str(raw), work=str(work), config=config)
                )
    out: dict[str, Any] = {
        "dataset": name,
        "n_cases": len(list((work / "ds.zarr" / "cases").iterdir())),
        "configuration": config,
    }
    for label, by_stage in runs.items():
        out[label] = {}
        for stage, rows in by_stage.items():
            out[label][stage] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            out[label][stage]["runs"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a raw dataset folder (e.g. the hippocampus dev cases)")
    ap.add_argument("--synthetic", type=int, default=0, help="number of synthetic small cases")
    ap.add_argument("--shape", type=_shape, default=(24, 40, 40), help="Z,Y,X of each synthetic case")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--stages", default="convert,preprocess,evaluate")
    ap.add_argument(
        "--pool-min-cases",
        type=int,
        default=None,
        help="set voxflow.cluster.POOL_MIN_CASES (a large value: small cases on threads only)",
    )
    ap.add_argument(
        "--compare",
        default=None,
        metavar="DIR",
        help="also run a second voxflow checkout (on PYTHONPATH), interleaved: 'before' vs 'after'",
    )
    ap.add_argument(
        "--threads-only-variant",
        action="store_true",
        help="also run the current checkout with the process pool off ('after-threads')",
    )
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary folder, removed)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="voxflow-bench-small-"))
    stages = args.stages.split(",")
    variants: list[tuple[str, str | None, int | None]] = [("after", None, args.pool_min_cases)]
    if args.threads_only_variant:
        variants.append(("after-threads", None, 10**9))
    if args.compare:
        variants.insert(0, ("before", str(Path(args.compare).resolve()), None))
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0], "datasets": []}
    try:
        if args.data:
            w = work / "data"
            w.mkdir(parents=True, exist_ok=True)
            result["datasets"].append(_bench(Path(args.data).name, Path(args.data), w, args.repeat, stages, variants))
        if args.synthetic:
            from voxflow.synthetic import make_dataset

            w = work / "synthetic"
            w.mkdir(parents=True, exist_ok=True)
            raw = make_dataset(w / "raw", kind="mr", n_cases=args.synthetic, shape_zyx=args.shape)
            result["datasets"].append(
                _bench(
                    f"synthetic-{args.synthetic}x{'x'.join(map(str, args.shape))}",
                    raw,
                    w,
                    args.repeat,
                    stages,
                    variants,
                )
            )
        result["load_avg_end"] = os.getloadavg()[0]
        print(json.dumps(result, indent=1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

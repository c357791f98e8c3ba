"""Benchmark many small cases: convert + preprocess + predict + evaluate, wall time and CPU utilisation.

A dataset of many small cases (the hippocampus dev cases, ~40x50x40 voxels each, or synthetic
ones) should keep every core busy. Each stage runs in a fresh subprocess (imports included in
``process_s``); inside it ``seconds`` is the stage call alone and ``cpu_util`` its
(user + sys) / wall / cores. Fingerprint and plan are made once, outside the measurement; the
prediction store evaluated is the reference labels shifted by one voxel. ``predict`` (TTA, probabilities
saved) uses a CPU-preset network of the dataset's own plan with seeded random weights (speed does not
depend on the weights); besides wall and CPU it reports user and system time, minor page faults and the
peak RSS of the largest process, and per variant the agreement of its labels and probabilities with the
first variant's.

    python benchmarks/small_cases.py --data /work/shared/data/hippocampus-dev
    python benchmarks/small_cases.py --synthetic 150 --shape 24,40,40 --repeat 2
    python benchmarks/small_cases.py --data DIR --compare /path/to/old/checkout --threads-only-variant --repeat 2
    python benchmarks/small_cases.py --data DIR --stages predict --compare /path/to/old/checkout --threads-only-variant

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
import json, os, resource, threading, time
import psutil
_seen, _stop = {{}}, threading.Event()
def _proc_stat(pid):  # (minor faults, peak RSS bytes) of a process from /proc
    with open(f"/proc/{{pid}}/stat") as f:
        minflt = int(f.read().rsplit(")", 1)[1].split()[7])
    with open(f"/proc/{{pid}}/status") as f:
        hwm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))
    return minflt, hwm
def _sample():  # CPU of worker processes (a process pool's workers are not our waited-for children)
    me = psutil.Process()
    while not _stop.is_set():
        for p in me.children(recursive=True):
            try:
                t = p.cpu_times()
                _seen[p.pid] = (t.user, t.system, *_proc_stat(p.pid))
            except (psutil.Error, OSError, StopIteration):
                pass
        _stop.wait(0.05)
def _pool():
    _stop.set()
    return [sum(v[i] for v in _seen.values()) for i in range(3)], max([v[3] for v in _seen.values()], default=0)
threading.Thread(target=_sample, daemon=True).start()
t0 = time.perf_counter(); c0 = os.times(); f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
{setup}
{body}
c1 = os.times(); t1 = time.perf_counter(); r1 = resource.getrusage(resource.RUSAGE_SELF)
(pu, ps, pf), phwm = _pool()
print("__RESULT__", json.dumps({{
    "seconds": t1 - t0, "user_s": c1.user - c0.user + pu, "sys_s": c1.system - c0.system + ps,
    "minor_faults": r1.ru_minflt - f0 + pf, "peak_rss_mb": max(r1.ru_maxrss * 1024, phwm) / 2**20,
}}))
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
    "predict": (
        "from voxflow.infer import predict\n"
        "predict({work!r} + '/ds.zarr', {work!r} + '/predict-' + {label!r}, model_dir={work!r} + '/runs/cpu', "
        "progress=False, export=False, overwrite=True, save_probabilities=True)"
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
    setup = ""
    if pool_min is not None:  # the process pools of convert/preprocess/evaluate and of predict
        setup = (
            f"import voxflow.cluster as _c\n_c.POOL_MIN_CASES = {pool_min}\n"
            f"try:\n    import voxflow.infer._case_pool as _p\n    _p.CASE_POOL_MIN_CASES = {pool_min}\n"
            "except ImportError:\n    pass"
        )
    code = _STAGE.format(setup=setup, body=_BODIES[stage].format(**fmt))
    t = time.perf_counter()
    c0 = os.times()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        check=False,
        env=_stage_env(stage, pythonpath),
        cwd=fmt["work"],  # not a checkout: `python -c` puts the working directory before PYTHONPATH
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
        "user_s": round(res["user_s"], 2),
        "sys_s": round(res["sys_s"], 2),
        "cpu_util": round((res["user_s"] + res["sys_s"]) / res["seconds"] / cores, 3),
        "minor_faults": int(res["minor_faults"]),
        "peak_rss_mb": round(res["peak_rss_mb"], 1),
        "process_s": round(wall, 3),
        "process_cpu_util": round(child_cpu / wall / cores, 3),
        "load_avg": round(os.getloadavg()[0], 2),
    }


def _stage_env(stage: str, pythonpath: str | None) -> dict[str, str]:
    """The stage's environment: one OpenMP thread, except for predict (torch's threads as a user gets them)."""
    env = {k: v for k, v in os.environ.items() if not (stage == "predict" and k == "OMP_NUM_THREADS")}
    if stage != "predict":
        env["OMP_NUM_THREADS"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _save_cpu_model(ds: Any, fingerprint: Any, run_dir: Path) -> None:
    """A fold of the CPU-preset plan's full-resolution network with seeded random weights."""
    import dataclasses

    import torch

    from voxflow.nets import build_network
    from voxflow.plan import plan_experiment
    from voxflow.train.checkpoint import save_checkpoint

    cfgs = plan_experiment(fingerprint, preset="cpu").configurations
    cfg = cfgs["3d_fullres"] if "3d_fullres" in cfgs else cfgs[sorted(cfgs)[0]]
    torch.manual_seed(0)
    k, c = len(ds.meta.labels), len(ds.meta.channel_names)
    net = build_network(cfg.network, c, k)
    payload = {"network": net.state_dict(), "configuration": dataclasses.asdict(cfg), "dataset": ds.meta.to_dict()}
    save_checkpoint(run_dir / "fold_0" / "checkpoint_final.pt", {**payload, "in_channels": c, "num_outputs": k})


def _agreement(work: Path, labels: list[str]) -> dict[str, Any]:
    """Per predict variant: label voxels equal to the first variant's (fraction) and the largest
    probability difference."""
    from voxflow.store import Store

    ref = Store.open(work / f"predict-{labels[0]}" / "prediction.zarr")
    out: dict[str, Any] = {"reference": labels[0]}
    for label in labels[1:]:
        other = Store.open(work / f"predict-{label}" / "prediction.zarr")
        same = total = 0
        diff = 0.0
        for cid in ref.case_ids():
            a, b = (np.asarray(s.zarr_array(cid, "label")[...]) for s in (ref, other))
            same, total = same + int((a == b).sum()), total + a.size
            pa, pb = (np.asarray(s.zarr_array(cid, "probs")[...], np.float32) for s in (ref, other))
            diff = max(diff, float(np.abs(pa - pb).max()))
        out[label] = {"label_agreement": same / max(total, 1), "max_prob_diff": diff}
    return out


def _setup(raw: Path, work: Path) -> str:
    """Convert once, fingerprint, plan and write the shifted prediction store; returns the config."""
    from voxflow.fingerprint import compute_fingerprint
    from voxflow.io import convert
    from voxflow.plan import plan_experiment
    from voxflow.store import DatasetMeta, Store

    ds = convert(raw, work / "ds.zarr", overwrite=True, progress=False)
    fingerprint = compute_fingerprint(ds)
    plan = plan_experiment(fingerprint)
    plan.save(work / "plans.json")
    _save_cpu_model(ds, fingerprint, work / "runs" / "cpu")
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
                    _run_stage(stage, pool_min, path, raw=str(raw), work=str(work), config=config, label=label)
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
    if "predict" in stages and len(variants) > 1:
        out["predict_agreement"] = _agreement(work, [v[0] for v in variants])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a raw dataset folder (e.g. the hippocampus dev cases)")
    ap.add_argument("--synthetic", type=int, default=0, help="number of synthetic small cases")
    ap.add_argument("--shape", type=_shape, default=(24, 40, 40), help="Z,Y,X of each synthetic case")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--stages", default="convert,preprocess,predict,evaluate")
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

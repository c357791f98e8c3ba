"""Benchmark training: seconds per iteration and peak memory of the planner's CPU-preset plan.

Default (a minute or so): a synthetic CT dataset (4 cases, 24×48×48), converted, fingerprinted,
planned with ``--preset cpu``, preprocessed, then fold 0 trained for ``--epochs`` × ``--iters`` in a
fresh subprocess (so the peak RSS is the training's own, loader workers included). Prints one JSON
object: the plan (patch, batch, features, parameters), seconds per iteration (median over epochs
after the first, which includes warm-up), the fraction of each step spent waiting for the loader,
peak RSS, and on CUDA the peak allocated GPU memory. ``--precision`` compares fp32 and bf16.

Real data: ``--data ../shared/data/hippocampus-dev --patches 3500 --folds 0 1 2 3 4`` trains each
fold on as many patches as nnU-Net's reference (500 iterations × batch 7) and reports the mean
validation Dice per class (predicted with ``voxflow.infer.predict`` at the end of every fold) and
the time.

    python benchmarks/train.py
    python benchmarks/train.py --device cuda --epochs 3 --iters 50
    python benchmarks/train.py --data ../shared/data/hippocampus-dev --patches 3500 --folds 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from voxflow.testing import run_with_memory_cap


def _prepare(work: Path, data: Path | None, preset: str, configuration: str, n_cases: int) -> dict[str, Any]:
    from voxflow.fingerprint import compute_fingerprint
    from voxflow.io import convert
    from voxflow.plan import plan_experiment
    from voxflow.preprocess import run_preprocess
    from voxflow.synthetic import make_dataset
    from voxflow.workspace import Workspace

    w = Workspace(work).ensure()
    if w.plans.exists() and (w.preprocessed(configuration) / "zarr.json").exists():
        return _describe(w, configuration)  # reuse a prepared workspace (--work): same plan for every fold
    src = data or make_dataset(work / "raw", kind="ct", n_cases=n_cases, shape_zyx=(24, 48, 48))
    store = convert(src, w.dataset_store, progress=False)
    fp = compute_fingerprint(store)
    fp.save(w.fingerprint)
    plan = plan_experiment(fp, preset=preset)
    plan.save(w.plans)
    run_preprocess(w.dataset_store, plan, configuration, w.preprocessed(configuration))
    return _describe(w, configuration)


def _describe(w: Any, configuration: str) -> dict[str, Any]:
    from voxflow.nets import build_network, count_parameters
    from voxflow.plan import Plan
    from voxflow.store import Store
    from voxflow.train.labels import LabelSpec

    cfg = Plan.load(w.plans).configuration(configuration)
    store = Store.open(w.preprocessed(configuration))
    k = LabelSpec.from_meta(store.meta).num_outputs
    return {
        "configuration": configuration,
        "patch_size_vox": list(cfg.patch_size_vox),
        "batch_size": cfg.batch_size,
        "architecture": cfg.network.architecture,
        "features_per_stage": list(cfg.network.features_per_stage),
        "n_parameters": count_parameters(build_network(cfg.network, cfg.n_channels, k)),
        "n_cases": len(store.case_ids()),
    }


_TRAIN = """
import json, time, torch
from voxflow.train import train_fold
from voxflow.workspace import Workspace
t = time.perf_counter()
run = train_fold(Workspace({work!r}), {cfg!r}, {fold!r}, device={device!r}, num_workers={workers}, restart=True,
                 overrides={overrides!r}, validate_cases={validate!r})
print("SECONDS", time.perf_counter() - t)
if torch.cuda.is_available() and {device!r}.startswith("cuda"):
    print("CUDA_PEAK", torch.cuda.max_memory_allocated())
print("RUN", run)
"""


def _train(
    work: Path, cfg: str, fold: int | str, *, device: str, workers: int, overrides: dict[str, Any], validate: bool
) -> dict[str, Any]:
    code = _TRAIN.format(
        work=str(work), cfg=cfg, fold=fold, device=device, workers=workers, overrides=overrides, validate=validate
    )
    peak, out = run_with_memory_cap(code, timeout=24 * 3600)
    vals = dict(
        line.split(" ", 1) for line in out.splitlines() if line.split(" ")[0] in ("SECONDS", "CUDA_PEAK", "RUN")
    )
    run = Path(vals["RUN"].strip())
    metrics = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    per_iter = [m["seconds_per_iter"] for m in metrics]
    res: dict[str, Any] = {
        "fold": str(fold),
        "wall_seconds": float(vals["SECONDS"]),
        "epochs": len(metrics),
        "seconds_per_iter": statistics.median(per_iter[1:] or per_iter),
        "seconds_per_iter_first_epoch": per_iter[0],
        "peak_rss_bytes": peak,
        "final_ema_pseudo_dice": metrics[-1]["ema_pseudo_dice"],
        "data_wait_fraction": statistics.median(m.get("data_wait_fraction", 0.0) for m in metrics[1:] or metrics),
        "precision": overrides.get("train.precision", "auto"),
    }
    if "CUDA_PEAK" in vals:
        res["cuda_peak_allocated_bytes"] = int(vals["CUDA_PEAK"])
    summary = run / "validation" / "summary.json"
    if validate and summary.exists():
        s = json.loads(summary.read_text())
        res["validation_dice"] = {k: v["dice"] for k, v in s["mean"].items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="dataset to convert (default: synthetic CT)")
    ap.add_argument("--n-cases", type=int, default=4, help="synthetic cases")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("-c", "--configuration", default="3d_fullres")
    ap.add_argument("--folds", nargs="+", default=["0"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=4, help="iterations per epoch")
    ap.add_argument(
        "--patches",
        type=int,
        default=None,
        help="train on this many patches in total (sets epochs from --iters and the batch)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="train.precision (auto: bf16/fp16 on CUDA, fp32 on the CPU)",
    )
    ap.add_argument("--validate", action="store_true", help="predict and score the validation cases per fold")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the workspace here (default: temporary); a prepared one is reused as is",
    )
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="voxflow_bench_train_"))
    try:
        t0 = time.perf_counter()
        plan = _prepare(work, args.data, args.preset, args.configuration, args.n_cases)
        prep = time.perf_counter() - t0
        epochs = args.epochs
        if args.patches:
            epochs = max(1, round(args.patches / (args.iters * plan["batch_size"])))
        overrides = {
            "train.epochs": epochs,
            "train.iters_per_epoch": args.iters,
            "train.val_iters": 2,
            "train.precision": args.precision,
        }
        folds = [f if f == "all" else int(f) for f in args.folds]
        runs = [
            _train(
                work,
                args.configuration,
                f,
                device=args.device,
                workers=args.num_workers,
                overrides=overrides,
                validate=args.validate or bool(args.data),
            )
            for f in folds
        ]
        out: dict[str, Any] = {
            "device": args.device,
            "plan": plan,
            "prepare_seconds": prep,
            "patches_per_fold": epochs * args.iters * plan["batch_size"],
            "folds": runs,
            "seconds_per_iter": statistics.median(r["seconds_per_iter"] for r in runs),
            "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in runs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        }
        dices = [r["validation_dice"] for r in runs if "validation_dice" in r]
        if dices:
            out["mean_validation_dice"] = {
                k: statistics.mean(d[k] for d in dices if d.get(k) is not None) for k in dices[0]
            }
        print(json.dumps(out, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark: nnU-Net 2.8.1 vs voxflow side by side, one run, the same data; JSON + a table of ratios.

Run it with the venv of ``make test-nnunet`` (nnunetv2 installed beside voxflow)::

    PYTHONPATH=. .venv-nnunet/bin/python benchmarks/vs_nnunet.py --cases 2 --train-iters 5 -o vs.json  # every row
    PYTHONPATH=. .venv-nnunet/bin/python benchmarks/vs_nnunet.py --rows predict,ct --cases 2

At the defaults (8 cases, 10 timed iterations) a full run took 14 min on the quiet 2-core machine.
Every row runs both tools in fresh subprocesses, back to back, and records ``os.getloadavg()`` before
each side. Memory is the peak over the process tree (workers included) of the summed PSS (and of the
summed RSS), sampled every 0.1 s or less often, so that sampling costs at most ~5% of a core. Rows (``--rows``):

- ``preprocess``: the 24 hippocampus dev cases (``../shared/data/hippocampus-dev``) as an nnU-Net raw
  dataset; ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres`` (its default workers: 8 fingerprint, 4
  preprocessing processes) vs ``voxflow plan-and-preprocess RAW -c 3d_fullres`` (conversion to Zarr
  included). Process wall time, imports included, on both sides.
- ``train``: s/iteration on nnU-Net's own 3d_fullres plan. nnU-Net: its ``nnUNetTrainer`` on its own
  preprocessed data (data augmentation in its default background processes), ``2N`` iterations timed
  one by one (``next(dataloader)`` + ``train_step``), the mean of the last N. voxflow: ``train_fold`` on
  its own preprocessed data with ``--set`` overrides that make patch, batch and network those of the
  translated nnU-Net plan (``voxflow.nnunet.translate_configuration``), 2 epochs x N iterations, the
  s/iteration of the second epoch (its loader is restarted per epoch: included). Same torch threads.
- ``predict``: one fold of seeded random weights for nnU-Net's hippocampus plan, saved in nnU-Net's
  checkpoint format (speed does not depend on training; agreement of random weights, with near-ties
  everywhere, is a harder test than of a trained model); the first ``--cases`` cases predicted with
  mirroring (TTA) by ``nnUNetPredictor.predict_from_files`` (1 preprocessing + 1 export process) and
  by ``voxflow.nnunet.predict_nnunet`` (``voxflow predict --nnunet-model``). Timed without imports.
- ``ct``: a synthetic CT set (``voxflow.synthetic.make_dataset(kind="ct")``, ``--ct-shape``, spacing
  2x1x1 mm) planned by nnU-Net (6 stages 32-320, patch 80x160x160 at the default shape); one test
  volume predicted by both tools with one random-weight fold, no TTA unless ``--ct-tta``; voxels/s.
- ``own``: voxflow's own CPU-preset plan of the hippocampus cases (``--preset cpu``), trained for
  ``--own-iters`` iterations (speed only: the weights are near-random), then ``voxflow predict`` of the
  ``--cases`` cases with TTA (CLI process wall, imports included). For reference, no nnU-Net side.

Voxel agreement is given beside every speed figure where both tools predict: with nnU-Net as shipped, and
with nnU-Net's predictor run once more (untimed) with its sliding-window logits summed in float32 instead
of float16 (``torch.half`` in its ``_internal_predict_sliding_window_return_logits``). nnU-Net's float16
sum rounds each logit to ~3 significant digits, which decides the near-ties of random weights: on 8
hippocampus cases 99.833% of the voxels agreed with nnU-Net as shipped, 99.999% with float32 logits
(voxflow sums in float32).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vs_nnunet_util import (  # noqa: E402  (the helper module beside this script)
    agreement,
    hippocampus_raw,
    load_now,
    n_voxels,
    nnunet_bin,
    nnunet_env,
    random_nnunet_model,
    run_measured,
    run_python,
)

log = logging.getLogger("voxflow.benchmarks.vs_nnunet")
HIPPO_ID, CT_ID = 903, 904
HIPPO, CT = f"Dataset{HIPPO_ID}_Hippocampus", f"Dataset{CT_ID}_SynCT"
ROWS = ("preprocess", "train", "predict", "ct", "own")
TIMEOUT = 3 * 3600

NNUNET_PREDICT = textwrap.dedent("""
    import time, types, torch
    import nnunetv2.inference.predict_from_raw_data as m
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class FloatHalf(types.ModuleType):  # torch, with torch.half meaning float32 inside nnU-Net's predictor
        def __getattr__(self, name):
            return torch.float32 if name == "half" else getattr(torch, name)

    if {fp32_logits}:  # its sliding window then sums the logits in float32 instead of float16
        m.torch = FloatHalf("torch")
    torch.set_num_threads({threads})
    t = time.perf_counter()
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring={tta}, perform_everything_on_device=False,
                        device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder({model!r}, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    p.predict_from_files({inp!r}, {out!r}, save_probabilities=False, overwrite=True,
                         num_processes_preprocessing=1, num_processes_segmentation_export=1)
    print("WALL", time.perf_counter() - t)
""")

VOXFLOW_PREDICT = textwrap.dedent("""
    import time, torch
    from voxflow.nnunet import predict_nnunet
    torch.set_num_threads({threads})
    t = time.perf_counter()
    predict_nnunet({inp!r}, {out!r}, {model!r}, tta={tta}, progress=False, postprocessing=None, {options})
    print("WALL", time.perf_counter() - t)
""")

NNUNET_TRAIN = textwrap.dedent("""
    import json, time, torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    torch.set_num_threads({threads})
    plans, dataset = json.load(open({plans!r})), json.load(open({dataset!r}))
    plans["continue_training"] = False  # what nnunetv2.run.run_training sets before building the trainer
    tr = nnUNetTrainer(plans, "3d_fullres", 0, dataset, device=torch.device("cpu"))
    tr.on_train_start()
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    times = []
    for _ in range({n}):
        t = time.perf_counter()
        tr.train_step(next(tr.dataloader_train))
        times.append(time.perf_counter() - t)
    print("ITERS", json.dumps(times))
    for dl in (tr.dataloader_train, tr.dataloader_val):
        getattr(dl, "_finish", lambda: None)()
""")

VOXFLOW_TRAIN = textwrap.dedent("""
    import time, torch
    from voxflow.train import train_fold
    from voxflow.workspace import Workspace
    torch.set_num_threads({threads})
    t = time.perf_counter()
    run = train_fold(Workspace({work!r}), "3d_fullres", 0, device="cpu", num_workers={workers}, restart=True,
                     overrides={overrides!r}, validate_cases=False)
    print("WALL", time.perf_counter() - t)
    print("RUN", run)
""")


class Context:
    """The work folder of one run and what has been prepared in it (rows share the prepared data)."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp, self.args = tmp, args
        self.hippo = tmp / "hippo_nnunet"
        self.raw = self.hippo / "nnUNet_raw" / HIPPO
        self.vf_work = tmp / "hippo_voxflow"
        self.test_ids = hippocampus_raw(self.raw, args.cases)
        self.nn_planned = self.nn_preprocessed = self.vf_preprocessed = False
        self._model: tuple[Path, dict[str, Any]] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return nnunet_env(self.hippo, **extra)

    def ensure_nnunet(self, *, preprocess: bool) -> None:
        """nnU-Net's plans (and with ``preprocess`` its 3d_fullres data) of the hippocampus cases, unmeasured."""
        if self.nn_preprocessed or (self.nn_planned and not preprocess):
            return
        argv = [nnunet_bin("nnUNetv2_plan_and_preprocess"), "-d", str(HIPPO_ID), "-c", "3d_fullres", "-npfp", "2"]
        run_measured(argv + (["-np", "2"] if preprocess else ["--no_pp"]), env=self.env(), timeout=TIMEOUT)
        self.nn_planned, self.nn_preprocessed = True, preprocess

    def ensure_voxflow(self) -> None:
        if not self.vf_preprocessed:
            run_measured(_vf_plan_and_preprocess(self.raw, self.vf_work), env=self.env(), timeout=TIMEOUT)
            self.vf_preprocessed = True

    def model(self) -> tuple[Path, dict[str, Any]]:
        """The random-weight nnU-Net model of the hippocampus plan (built once)."""
        if self._model is None:
            self.ensure_nnunet(preprocess=False)
            self._model = random_nnunet_model(self.hippo, HIPPO)
        return self._model


def _vf_plan_and_preprocess(src: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "voxflow", "plan-and-preprocess", str(src), "--work", str(work), "-c", "3d_fullres",
            *extra]  # fmt: skip


def _side(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One tool's measurement with the load average before it; stdout/stderr dropped."""
    load = load_now()
    res = run()
    res.pop("stderr", None)
    res.pop("stdout", None)
    return {"load_before": load, **res}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def row_preprocess(ctx: Context) -> dict[str, Any]:
    """Plan + preprocess of the hippocampus cases: nnU-Net's command line vs voxflow's."""
    nn_argv = [nnunet_bin("nnUNetv2_plan_and_preprocess"), "-d", str(HIPPO_ID), "-c", "3d_fullres"]
    nn = _side(lambda: run_measured(nn_argv, env=ctx.env(), timeout=TIMEOUT))
    vf = _side(lambda: run_measured(_vf_plan_and_preprocess(ctx.raw, ctx.vf_work), env=ctx.env(), timeout=TIMEOUT))
    ctx.nn_planned = ctx.nn_preprocessed = ctx.vf_preprocessed = True
    return {
        "cases": len(list((ctx.raw / "imagesTr").glob("*.nii.gz"))),
        "nnunet_workers": "defaults: -npfp 8 (fingerprint), -np 4 (3d_fullres)",
        "voxflow_includes": "conversion to Zarr, fingerprint, plan, preprocess (threads scheduler)",
        "nnunet": nn,
        "voxflow": vf,
        "wall_ratio_voxflow_over_nnunet": _ratio(vf["process_wall_s"], nn["process_wall_s"]),
        "pss_ratio_voxflow_over_nnunet": _ratio(vf["peak_pss_mb"], nn["peak_pss_mb"]),
        "goal": "wall <= 0.5x at PSS <= 0.25x",
    }


def identical_plan_overrides(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` overrides giving voxflow's 3d_fullres configuration the patch, batch and network of
    nnU-Net's translated plan; and a note of what differed from voxflow's own plan."""
    from voxflow.nnunet import translate_configuration
    from voxflow.plan import Plan

    plans = json.loads((ctx.hippo / "nnUNet_preprocessed" / HIPPO / "nnUNetPlans.json").read_text())
    dataset = json.loads((ctx.raw / "dataset.json").read_text())
    nn = translate_configuration(plans, dataset, "3d_fullres").configuration
    own = Plan.load(ctx.vf_work / "plans.json").configuration("3d_fullres")
    net_fields = ("architecture", "n_stages", "features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage",
                  "n_conv_per_stage_decoder")  # fmt: skip
    pairs = {"patch_size_vox": (own.patch_size_vox, nn.patch_size_vox), "batch_size": (own.batch_size, nn.batch_size)}
    pairs.update({f"network.{f}": (getattr(own.network, f), getattr(nn.network, f)) for f in net_fields})
    overrides = {k: json.loads(json.dumps(v[1])) for k, v in pairs.items()}
    differed = {k: {"voxflow_plan": v[0], "nnunet_plan": v[1]} for k, v in pairs.items() if v[0] != v[1]}
    if tuple(own.spacing_zyx) != tuple(nn.spacing_zyx):
        differed["spacing_zyx (not overridden: voxflow's own preprocessing)"] = {
            "voxflow_plan": own.spacing_zyx, "nnunet_plan": nn.spacing_zyx}  # fmt: skip
    return overrides, differed


def row_train(ctx: Context) -> dict[str, Any]:
    """Steady-state s/iteration of nnU-Net's trainer and of voxflow's on the same plan."""
    ctx.ensure_nnunet(preprocess=True)
    ctx.ensure_voxflow()
    a, n = ctx.args, ctx.args.train_iters
    pre = ctx.hippo / "nnUNet_preprocessed" / HIPPO
    code = NNUNET_TRAIN.format(threads=a.threads, plans=str(pre / "nnUNetPlans.json"),
                               dataset=str(pre / "dataset.json"), n=2 * n)  # fmt: skip
    nn = _side(lambda: _parse_iters(run_python(code, env=ctx.env(), timeout=TIMEOUT), n))
    overrides, differed = identical_plan_overrides(ctx)
    train = {"train.epochs": 2, "train.iters_per_epoch": n, "train.val_iters": 1}
    code = VOXFLOW_TRAIN.format(threads=a.threads, work=str(ctx.vf_work), workers=a.train_workers,
                                overrides={**overrides, **train})  # fmt: skip
    vf = _side(lambda: _parse_metrics(run_python(code, env=ctx.env(), timeout=TIMEOUT)))
    return {
        "plan": {k: overrides[k] for k in ("patch_size_vox", "batch_size", "network.features_per_stage")},
        "voxflow_plan_differed_from_nnunet_plan": differed,
        "iterations_timed": n,
        "warmup_iterations": n,
        "threads": a.threads,
        "nnunet": nn,
        "voxflow": vf,
        "s_per_iter_ratio_voxflow_over_nnunet": _ratio(vf["s_per_iter"], nn["s_per_iter"]),
        "goal": "<= 0.5x",
    }


def _parse_iters(res: dict[str, Any], n: int) -> dict[str, Any]:
    times = json.loads(next(line.split(" ", 1)[1] for line in res["stdout"].splitlines() if line.startswith("ITERS")))
    return {**res, "s_per_iter": round(sum(times[-n:]) / n, 3), "s_per_iter_warmup": round(sum(times[:-n]) / n, 3)}


def _parse_metrics(res: dict[str, Any]) -> dict[str, Any]:
    run = Path(next(line.split(" ", 1)[1] for line in res["stdout"].splitlines() if line.startswith("RUN ")).strip())
    metrics = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    per_iter = [m["seconds_per_iter"] for m in metrics]
    steady = per_iter[1:] or per_iter
    return {**res, "s_per_iter": round(sum(steady) / len(steady), 3), "s_per_iter_warmup": round(per_iter[0], 3),
            "data_wait_fraction": metrics[-1].get("data_wait_fraction")}  # fmt: skip


def _predict_pair(
    model: Path,
    inp: Path,
    out: Path,
    *,
    threads: int,
    tta: bool,
    env: dict[str, str],
    fp32_reference: bool = True,
    variants: dict[str, str] | None = None,
) -> dict[str, Any]:
    """nnUNetPredictor vs predict_nnunet on the same model folder and inputs, back to back; with
    ``fp32_reference`` also nnUNetPredictor with its logits summed in float32 (not timed in the ratio):
    nnU-Net 2.8.1 sums the tiles' logits in float16, which decides near-ties of random weights.
    ``variants``: more voxflow sides, name -> keyword arguments of ``predict_nnunet`` (source text)."""
    res: dict[str, Any] = {}
    sides: list[tuple[str, str, bool | str]] = [("nnunet", NNUNET_PREDICT, False), ("voxflow", VOXFLOW_PREDICT, "")]
    sides += [(f"voxflow_{k}", VOXFLOW_PREDICT, v) for k, v in (variants or {}).items()]
    sides += [("nnunet_fp32_logits", NNUNET_PREDICT, True)] if fp32_reference else []
    for tool, template, extra in sides:  # extra: nnU-Net's float32 switch, or voxflow's keyword arguments
        code = template.format(threads=threads, model=str(model), inp=str(inp), out=str(out / tool), tta=tta,
                               fp32_logits=extra, options=extra)  # fmt: skip
        res[tool] = _side(lambda code=code: run_python(code, env=env, timeout=TIMEOUT))  # type: ignore[misc]
        log.info("%s: %s", tool, res[tool])
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in inp.glob("*_0000.nii.gz"))
    res["speed_ratio_voxflow_over_nnunet"] = _ratio(res["nnunet"]["wall_s"], res["voxflow"]["wall_s"])
    res["voxel_agreement"] = round(agreement(out / "nnunet", out / "voxflow", ids), 5)
    if fp32_reference:
        res["voxel_agreement_fp32_logits"] = round(agreement(out / "nnunet_fp32_logits", out / "voxflow", ids), 5)
    for k in variants or {}:
        res[f"voxflow_{k}"]["speed_ratio_voxflow_over_nnunet"] = _ratio(
            res["nnunet"]["wall_s"], res[f"voxflow_{k}"]["wall_s"]
        )
        res[f"voxflow_{k}"]["voxel_agreement"] = round(agreement(out / "nnunet", out / f"voxflow_{k}", ids), 5)
    return res


def row_predict(ctx: Context) -> dict[str, Any]:
    """``nnUNetv2_predict`` vs ``voxflow predict --nnunet-model``, same random-weight model, TTA on."""
    model, plan = ctx.model()
    pair = _predict_pair(model, ctx.raw / "imagesTs", ctx.tmp / "predict", threads=ctx.args.threads, tta=True,
                         env=ctx.env())  # fmt: skip
    return {"cases": len(ctx.test_ids), "tta": True, "weights": "seeded random (not trained)", "nnunet_plan": plan,
            **pair, "goal": ">= 3x speed, >= 99.9% voxel agreement"}  # fmt: skip


def row_ct(ctx: Context) -> dict[str, Any]:
    """nnU-Net's plan of a synthetic CT set (6 stages, 80x160x160 at the default shape): voxels/s."""
    from voxflow.synthetic import make_dataset

    a, root = ctx.args, ctx.tmp / "ct_nnunet"
    env = nnunet_env(root)
    raw = make_dataset(root / "nnUNet_raw" / CT, kind="ct", n_cases=2, shape_zyx=a.ct_shape, spacing_zyx=(2.0, 1.0, 1.0),
                       n_test_cases=1)  # fmt: skip
    argv = [nnunet_bin("nnUNetv2_plan_and_preprocess"), "-d", str(CT_ID), "-c", "3d_fullres", "--no_pp", "-npfp", "2"]
    run_measured(argv, env=env, timeout=TIMEOUT)
    model, plan = random_nnunet_model(root, CT)
    variants = {"whole_image": "whole_image=True"} if a.ct_whole_image else None
    pair = _predict_pair(model, raw / "imagesTs", ctx.tmp / "ct_predict", threads=a.threads, tta=a.ct_tta, env=env,
                         variants=variants)  # fmt: skip
    vox = n_voxels(raw / "imagesTs")
    for tool in ("nnunet", "voxflow", *(f"voxflow_{k}" for k in variants or {})):
        pair[tool]["voxels_per_s"] = round(vox / pair[tool]["wall_s"])
    return {"shape_zyx": list(a.ct_shape), "spacing_zyx": [2.0, 1.0, 1.0], "voxels": vox, "tta": a.ct_tta,
            "weights": "seeded random (not trained)", "nnunet_plan": plan, **pair,
            "goal": ">= 2x nnU-Net's voxels/s"}  # fmt: skip


def row_own(ctx: Context) -> dict[str, Any]:
    """voxflow's own CPU-preset model: plan, a few training iterations (unmeasured), then predict with TTA."""
    a, work = ctx.args, ctx.tmp / "hippo_voxflow_cpu"
    src = ctx.vf_work / "dataset.zarr" if ctx.vf_preprocessed else ctx.raw
    run_measured(_vf_plan_and_preprocess(src, work, "--preset", "cpu"), env=ctx.env(), timeout=TIMEOUT)
    train = {"train.epochs": 1, "train.iters_per_epoch": a.own_iters, "train.val_iters": 1}
    code = VOXFLOW_TRAIN.format(threads=a.threads, work=str(work), workers=a.train_workers, overrides=train)
    run_python(code, env=ctx.env(), timeout=TIMEOUT)
    argv = [sys.executable, "-m", "voxflow", "predict", "-i", str(ctx.raw / "imagesTs"), "-o", str(ctx.tmp / "own"),
            "-m", str(work / "runs" / "3d_fullres"), "-f", "0"]  # fmt: skip
    vf = _side(lambda: run_measured(argv, env=ctx.env(OMP_NUM_THREADS=str(a.threads)), timeout=TIMEOUT))
    from voxflow.plan import Plan

    cfg = Plan.load(work / "plans.json").configuration("3d_fullres")
    plan = {"patch_size_vox": list(cfg.patch_size_vox), "features_per_stage": list(cfg.network.features_per_stage)}
    return {"cases": len(ctx.test_ids), "tta": True, "plan": plan, "training_iterations": a.own_iters,
            "timing": "CLI process wall, imports included", "voxflow": vf}  # fmt: skip


def table(rows: dict[str, Any]) -> str:
    """A markdown table of the rows present."""
    lines = ["| row | nnU-Net 2.8.1 | voxflow | voxflow vs nnU-Net | goal | voxel agreement | load before (nn / vf) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip

    def mem(r: dict[str, Any]) -> str:
        return f"{r['peak_pss_mb'] / 1000:.2f} GB PSS"

    def speed(r: dict[str, Any]) -> str:
        return f"{r['voxels_per_s'] / 1000:.1f} k vox/s, " if "voxels_per_s" in r else ""

    def agree(r: dict[str, Any]) -> str:
        fp32 = r.get("voxel_agreement_fp32_logits")
        extra = "" if fp32 is None else f" ({100 * fp32:.3f}% with nnU-Net's logits summed in float32)"
        return f"{100 * r['voxel_agreement']:.3f}%{extra}"

    def load(r: dict[str, Any]) -> str:
        return " / ".join(f"{rows[r][t]['load_before'][0]:.1f}" for t in ("nnunet", "voxflow") if t in rows[r])

    if "preprocess" in rows:
        r = rows["preprocess"]
        lines.append(f"| plan + preprocess, {r['cases']} cases (voxflow incl. conversion) | "
                     f"{r['nnunet']['process_wall_s']} s, {mem(r['nnunet'])} | {r['voxflow']['process_wall_s']} s, "
                     f"{mem(r['voxflow'])} | {r['wall_ratio_voxflow_over_nnunet']}x wall, "
                     f"{r['pss_ratio_voxflow_over_nnunet']}x PSS | {r['goal']} | - | {load('preprocess')} |")  # fmt: skip
    if "train" in rows:
        r = rows["train"]
        lines.append(f"| training s/iteration, same plan (patch {r['plan']['patch_size_vox']}, batch "
                     f"{r['plan']['batch_size']}) | {r['nnunet']['s_per_iter']} s | {r['voxflow']['s_per_iter']} s | "
                     f"{r['s_per_iter_ratio_voxflow_over_nnunet']}x | {r['goal']} | - | {load('train')} |")  # fmt: skip
    for key, label in (("predict", "predict {cases} hippocampus cases, TTA, same nnU-Net model"),
                       ("ct", "predict synthetic CT {shape_zyx}, {stages} stages, patch {patch}, TTA {tta}")):  # fmt: skip
        if key in rows:
            r = rows[key]
            name = label.format(cases=r.get("cases"), shape_zyx=r.get("shape_zyx"), tta=r.get("tta"),
                                stages=r["nnunet_plan"]["n_stages"], patch=r["nnunet_plan"]["patch_size"])  # fmt: skip
            nn, vf = r["nnunet"], r["voxflow"]
            lines.append(f"| {name} | {speed(nn)}{nn['wall_s']} s, {mem(nn)} | {speed(vf)}{vf['wall_s']} s, {mem(vf)} | "
                         f"{r['speed_ratio_voxflow_over_nnunet']}x speed | {r['goal']} | "
                         f"{agree(r)} | {load(key)} |")  # fmt: skip
            for k in (k for k in r if k.startswith("voxflow_") and isinstance(r[k], dict)):
                v = r[k]
                lines.append(f"| {name}, voxflow {k[len('voxflow_'):]} (opt-in) | - | {speed(v)}{v['wall_s']} s, {mem(v)} | "
                             f"{v['speed_ratio_voxflow_over_nnunet']}x speed | - | {100 * v['voxel_agreement']:.3f}% | - |")  # fmt: skip
    if "own" in rows:
        r = rows["own"]
        lines.append(f"| predict {r['cases']} hippocampus cases, TTA, voxflow's CPU-preset model "
                     f"({r['plan']['features_per_stage'][0]}-{r['plan']['features_per_stage'][-1]} features) | - | "
                     f"{r['voxflow']['process_wall_s']} s, {mem(r['voxflow'])} | - | - | - | {load('own')} |")  # fmt: skip
    return "\n".join(lines)


def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument(
        "--cases",
        type=int,
        default=8,
        help="hippocampus cases to predict (of the 24 dev cases; from 6 voxflow predicts them in a pool of one process per core)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads per tool")
    ap.add_argument("--train-iters", type=int, default=10, help="timed training iterations (as many again warm up)")
    ap.add_argument("--train-workers", type=int, default=2, help="voxflow loader processes (nnU-Net: its default)")
    ap.add_argument("--ct-shape", type=int, nargs=3, default=(96, 192, 192), help="synthetic CT shape z y x")
    ap.add_argument("--ct-tta", action="store_true", help="mirroring in the ct row (8x the network time)")
    ap.add_argument("--ct-whole-image", action="store_true",
                    help="ct row: also voxflow with whole_image=True (one tile as large as the image; opt-in, "
                    "changes the result: its agreement is reported)")  # fmt: skip
    ap.add_argument("--own-iters", type=int, default=2, help="training iterations of voxflow's own model")
    ap.add_argument("--work", default=None, help="parent of the temporary work folder")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (data, models, predictions)")
    ap.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = ap.parse_args()
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    return args


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    funcs = {"preprocess": row_preprocess, "train": row_train, "predict": row_predict, "ct": row_ct, "own": row_own}
    rows: dict[str, Any] = {}
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        d = (
            tempfile.mkdtemp(dir=args.work)
            if args.keep
            else stack.enter_context(tempfile.TemporaryDirectory(dir=args.work))
        )
        log.info("work folder %s%s", d, " (kept)" if args.keep else "")
        ctx = Context(Path(d), args)
        for name in ROWS:
            if name in args.rows:
                log.info("row %s (load %s)", name, load_now())
                try:
                    rows[name] = funcs[name](ctx)
                except Exception as e:  # noqa: BLE001  (one failed row must not lose the others)
                    log.exception("row %s failed", name)
                    failed[name] = f"{type(e).__name__}: {str(e)[-2000:]}"
                log.info("%s", json.dumps(rows.get(name)))
                _write(args.output, _report(args, rows, failed))  # after each row: a partial run keeps its rows
    print(json.dumps(_report(args, rows, failed), indent=2))
    print()
    print(table(rows))
    if failed:
        raise SystemExit(f"rows failed: {sorted(failed)}")


def _report(args: argparse.Namespace, rows: dict[str, Any], failed: dict[str, str]) -> dict[str, Any]:
    return {
        "benchmark": "vs_nnunet",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": _processor()},
        "threads": args.threads,
        "rows": rows,
        **({"failed_rows": failed} if failed else {}),
    }


def _write(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

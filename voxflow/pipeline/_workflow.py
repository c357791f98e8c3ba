"""`voxflow run`: the whole workflow, each step skipped when its output is already complete.

Steps (outputs under the work directory, see :class:`voxflow.workspace.Workspace`):

1. convert       SRC -> dataset.zarr (skipped when SRC is already a voxflow store: it is linked)
2. fingerprint   -> fingerprint.json
3. plan          -> plans.json (preset and memory budget from the arguments)
4. preprocess    -> preprocessed/<cfg>.zarr for every requested configuration
5. train         -> runs/<cfg>/fold_<k>/checkpoint_final.pt; the trainer predicts and scores the
                    fold's validation cases at its end (runs/<cfg>/fold_<k>/validation/). A planned
                    cascade trains 3d_lowres first, then 3d_cascade_fullres on its cross-validation
                    segmentations (:mod:`voxflow.train.cascade`)
6. postprocess   -> runs/<cfg>/postprocessing.json, chosen on the cross-validation predictions
7. select        -> best_configuration.json: the configuration, or ensemble of two, with the highest
                    cross-validated mean foreground Dice (nnU-Net's find_best_configuration)
8. summary       -> summary.json and the `voxflow predict` command to use

Every step is resumable: a rerun after an interruption skips what is complete and finishes the rest
with the same result (training resumes from checkpoint_latest.pt). ``RunOptions.stop_after`` ends the run
after one of steps 1-4 (`voxflow plan-and-preprocess` is the run stopped after preprocess);
``RunOptions.redo`` runs steps 1-4 even when their output exists (conversion and preprocessing then
resume case by case) and ``RunOptions.overwrite`` redoes them from scratch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from voxflow._lock import dir_lock_file, locked
from voxflow._serial import check_choice, set_field
from voxflow._types import PathLikeStr
from voxflow.errors import VoxflowError
from voxflow.plan.schema import Plan, atomic_write_json
from voxflow.workspace import Workspace

__all__ = ["RunOptions", "find_best_configuration", "run_workflow"]

log = logging.getLogger(__name__)
Reporter = Callable[[str], None]
# the steps a run can stop after or redo: they prepare the data, training follows them
PrepareStep = Literal["convert", "fingerprint", "plan", "preprocess"]
PREPARE_STEPS: tuple[PrepareStep, ...] = ("convert", "fingerprint", "plan", "preprocess")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What `voxflow run` does; defaults follow nnU-Net (every configuration, 5 folds)."""

    configurations: tuple[str, ...] | None = None
    folds: tuple[str, ...] = ("0", "1", "2", "3", "4")
    scheduler: str = "threads"
    device: str = "cpu"
    preset: str = "default"
    gpu_memory_gb: float | None = None
    overrides: Mapping[str, str] = field(default_factory=dict)
    nproc: int = 1
    num_workers: int = 2
    tta: bool = True
    memory_limit: str | None = None  # per worker, for scheduler local:N
    stop_after: PrepareStep | None = None  # end the run after this step (None: every step)
    redo: frozenset[PrepareStep] = frozenset()  # run these steps even when their output exists
    overwrite: bool = False  # redo conversion, fingerprint, plan and preprocessing from scratch

    def __post_init__(self) -> None:
        if self.stop_after is not None:
            check_choice(self.stop_after, PREPARE_STEPS, "stop_after", error=VoxflowError)
        set_field(self, "redo", frozenset(self.redo))
        for step in self.redo:
            check_choice(step, PREPARE_STEPS, "redo", error=VoxflowError)


def _redo(opts: RunOptions, step: PrepareStep) -> bool:
    return opts.overwrite or step in opts.redo


def _is_store(path: Path) -> bool:
    zj = path / "zarr.json"
    if not zj.is_file():
        return False
    try:
        return "voxflow" in json.loads(zj.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError):
        return False


def _step(report: Reporter, name: str, message: str) -> None:
    report(f"[{name}] {message}")


def _convert(src: Path, work: Workspace, opts: RunOptions, report: Reporter) -> None:
    from voxflow.io import convert
    from voxflow.store import Store

    target = work.dataset_store
    if _is_store(src):
        if target.resolve() != src.resolve():
            if target.is_symlink() or target.exists():
                if target.resolve() != src.resolve():
                    raise VoxflowError(f"{target} already exists and is not {src}; use another --work directory.")
            else:
                os.symlink(src.resolve(), target, target_is_directory=True)
        _step(report, "convert", f"using existing store {src} ({len(Store.open(src).case_ids())} cases)")
        return
    if _is_store(target) and not _redo(opts, "convert"):
        store = Store.open(target)
        if not store.incomplete_case_ids():
            _step(report, "convert", f"skipped: {target} holds {len(store.case_ids())} complete cases")
            return
    store = convert(src, target, overwrite=opts.overwrite, scheduler=opts.scheduler, memory_limit=opts.memory_limit)
    _step(report, "convert", f"{src} -> {target} ({len(store.case_ids())} cases)")


def _fingerprint(work: Workspace, opts: RunOptions, report: Reporter) -> None:
    if work.fingerprint.is_file() and not _redo(opts, "fingerprint"):
        _step(report, "fingerprint", f"skipped: {work.fingerprint} exists")
        return
    from voxflow.cluster import scheduler_context
    from voxflow.fingerprint import compute_fingerprint

    with scheduler_context(opts.scheduler, memory_limit=opts.memory_limit):
        fp = compute_fingerprint(work.dataset_store)
    fp.save(work.fingerprint)
    _step(report, "fingerprint", f"-> {work.fingerprint}")


def _plan(work: Workspace, opts: RunOptions, report: Reporter) -> Plan:
    if work.plans.is_file() and not _redo(opts, "plan"):
        _step(report, "plan", f"skipped: {work.plans} exists")
        return Plan.load(work.plans)
    from voxflow.fingerprint import Fingerprint
    from voxflow.plan import plan_experiment

    kwargs: dict[str, Any] = {"preset": opts.preset}
    if opts.gpu_memory_gb is not None:
        kwargs["gpu_memory_gb"] = opts.gpu_memory_gb
    plan = plan_experiment(Fingerprint.load(work.fingerprint), **kwargs)
    plan.save(work.plans)
    _step(report, "plan", f"-> {work.plans} (preset {opts.preset}; configurations {sorted(plan.configurations)})")
    return plan


def _configurations(plan: Plan, opts: RunOptions) -> list[str]:
    """The configurations to run, each cascade stage after the stage it builds on (added if not asked for)."""
    wanted = list(opts.configurations or plan.configurations)
    out: list[str] = []

    def add(name: str) -> None:
        prev = plan.configuration(name).previous_stage  # also validates the name
        if prev is not None and prev not in out:
            add(prev)
        if name not in out:
            out.append(name)

    for c in wanted:
        add(c)
    return out


def _preprocess(work: Workspace, plan: Plan, cfg: str, opts: RunOptions, report: Reporter) -> None:
    from voxflow.fingerprint import Fingerprint
    from voxflow.preprocess import run_preprocess
    from voxflow.store import Store

    out = work.preprocessed(cfg)
    src = Store.open(work.dataset_store)
    if _is_store(out) and not _redo(opts, "preprocess"):
        done = Store.open(out)
        if set(done.case_ids()) >= set(src.case_ids()):
            _step(report, "preprocess", f"skipped: {out} is complete ({len(done.case_ids())} cases)")
            return
    boxes = {c.case_id: c.nonzero_bbox_zyx for c in Fingerprint.load(work.fingerprint).cases}
    run_preprocess(
        src,
        plan,
        cfg,
        out,
        scheduler=opts.scheduler,
        memory_limit=opts.memory_limit,
        overwrite=opts.overwrite,
        bboxes=boxes,
    )
    _step(report, "preprocess", f"{cfg} -> {out}")


def _train(work: Workspace, cfg: str, fold: str, opts: RunOptions, report: Reporter) -> None:
    from voxflow.train import train_fold

    run = work.fold(cfg, fold)
    final, summary = run.checkpoint_final, run.validation_summary
    if final.is_file() and (summary.is_file() or fold == "all"):
        _step(report, "train", f"skipped: {cfg} fold {fold} is trained ({final})")
        return
    from voxflow.train.validation import validate_fold

    if not final.is_file():
        resume = run.checkpoint_latest.is_file()
        t0 = time.perf_counter()
        train_fold(
            work,
            cfg,
            _fold_arg(fold),
            device=opts.device,
            resume=resume,
            overrides=dict(opts.overrides),
            nproc=opts.nproc,
            num_workers=opts.num_workers,
            validate_cases=False,
        )
        _step(
            report,
            "train",
            f"{cfg} fold {fold} {'resumed and ' if resume else ''}trained in "
            f"{time.perf_counter() - t0:.0f} s -> {run.path}",
        )
    if fold != "all":
        t0 = time.perf_counter()
        validate_fold(work, cfg, _fold_arg(fold), device=opts.device, tta=opts.tta, scheduler=opts.scheduler)
        _step(
            report,
            "validate",
            f"{cfg} fold {fold}: validation cases predicted and scored in "
            f"{time.perf_counter() - t0:.0f} s -> {summary}",
        )


def _fold_arg(fold: str) -> int | str:
    return int(fold) if fold.isdigit() else fold


def _postprocess(work: Workspace, cfg: str, folds: Sequence[str], opts: RunOptions, report: Reporter) -> None:
    out = work.configuration(cfg).postprocessing
    cv_folds = [f for f in folds if f != "all"]
    if not cv_folds:
        _step(report, "postprocess", f"skipped for {cfg}: no cross-validation folds to choose on")
        return
    if out.is_file():
        _step(report, "postprocess", f"skipped: {out} exists")
        return
    from voxflow.postprocess import determine_for_configuration

    spec = determine_for_configuration(work, cfg, folds=[_fold_arg(f) for f in cv_folds], scheduler=opts.scheduler)
    kept = [op.to_dict() if hasattr(op, "to_dict") else str(op) for op in getattr(spec, "operations", [])]
    _step(report, "postprocess", f"{cfg}: kept {kept or 'no operation'} -> {out}")


def _cv_dice(work: Workspace, cfg: str, folds: Sequence[str]) -> float:
    """Mean over folds' validation cases of the foreground-mean Dice (NaN if any fold lacks one)."""
    from voxflow.evaluate import EvaluationSummary

    values: list[float] = []
    for f in folds:
        path = work.fold(cfg, f).validation_summary
        if not path.is_file():
            return math.nan
        values.extend(EvaluationSummary.load(path).case_dice())
    return sum(values) / len(values) if values else math.nan


def _ensemble_dice(work: Workspace, cfgs: Sequence[str], folds: Sequence[str], opts: RunOptions) -> float:
    """Cross-validated Dice of the softmax average of ``cfgs`` (each fold predicted by both models; a
    cascade's second stage from its first stage's cross-validation segmentations, as in training)."""
    from voxflow.evaluate import evaluate
    from voxflow.infer import predict
    from voxflow.models import load_model
    from voxflow.store import Store
    from voxflow.train.splits import fold_cases, load_or_create_splits
    from voxflow.train.validation import cross_validation_model

    case_ids = Store.open(work.dataset_store).case_ids()
    splits = load_or_create_splits(work, case_ids)
    name = "ensemble__" + "__".join(cfgs)
    per_case: list[float] = []
    for f in folds:
        _, val_ids = fold_cases(splits, _fold_arg(f), case_ids)
        run = work.fold(name, f)
        models = [
            cross_validation_model(work, load_model(work.fold(c, f).checkpoint_final, device=opts.device), f)
            for c in cfgs
        ]
        pred = predict(
            work.dataset_store,
            run.validation,
            models=models,
            device=opts.device,
            tta=opts.tta,
            case_ids=val_ids,
            export=False,
            scheduler=opts.scheduler,
            progress=False,
        )
        summary = evaluate(
            pred, work.dataset_store, surface=False, output=run.validation_summary, scheduler=opts.scheduler
        )
        per_case.extend(summary.case_dice())
    return sum(per_case) / len(per_case) if per_case else math.nan


def find_best_configuration(
    work: Workspace,
    configurations: Sequence[str],
    folds: Sequence[str],
    *,
    opts: RunOptions | None = None,
    ensembles: bool = True,
) -> dict[str, Any]:
    """Rank configurations (and pairwise ensembles) by cross-validated mean foreground Dice.

    Single configurations use the validation predictions written at the end of each fold; a pair is
    scored by predicting each fold's validation cases with both configurations' models averaged.
    Returns ``{"configurations": [...best...], "dice": float, "candidates": {name: dice}}``.
    """
    opts = opts or RunOptions()
    cv_folds = [f for f in folds if f != "all"]
    candidates: dict[str, float] = {}
    for c in configurations:
        candidates[c] = _cv_dice(work, c, cv_folds) if cv_folds else math.nan
    if ensembles and cv_folds and len(configurations) > 1:
        for pair in itertools.combinations(configurations, 2):
            candidates["+".join(pair)] = _ensemble_dice(work, pair, cv_folds, opts)
    scored = {k: v for k, v in candidates.items() if not math.isnan(v)}
    best = max(scored, key=lambda k: scored[k]) if scored else configurations[0]
    return {
        "configurations": best.split("+"),
        "dice": scored.get(best, math.nan),
        "candidates": {k: (None if math.isnan(v) else v) for k, v in candidates.items()},
        "folds": list(folds),
    }


def predict_command(work: Workspace, best: Mapping[str, Any]) -> str:
    """The exact `voxflow predict` command for the chosen configuration(s)."""
    cfgs = best["configurations"]
    models = " ".join(f"-m {shlex.quote(str(work.configuration_dir(c)))}" for c in cfgs)
    folds = " ".join(str(f) for f in best["folds"])
    return f"voxflow predict -i INPUT_FOLDER -o OUTPUT_FOLDER {models} -f {folds}"


def _workspace_lock(args: Mapping[str, Any]) -> Path:
    work = args["work"]
    return dir_lock_file(work.root if isinstance(work, Workspace) else Path(work))


def _prepare(src: Path, work: Workspace, opts: RunOptions, report: Reporter) -> list[str]:
    """Steps 1-4 up to ``opts.stop_after``; returns the configurations planned for (none before the plan)."""
    _convert(src, work, opts, report)
    if opts.stop_after == "convert":
        return []
    _fingerprint(work, opts, report)
    if opts.stop_after == "fingerprint":
        return []
    plan = _plan(work, opts, report)
    configs = _configurations(plan, opts)
    if opts.stop_after != "plan":
        for cfg in configs:
            _preprocess(work, plan, cfg, opts, report)
    return configs


@locked(_workspace_lock, command="run")
def run_workflow(
    src: PathLikeStr, work: PathLikeStr | Workspace, opts: RunOptions | None = None, *, report: Reporter | None = None
) -> dict[str, Any]:
    """Run every step of the workflow (see the module docstring); returns the summary dict.

    With ``opts.stop_after`` it returns after that step with ``{"work", "dataset", "configurations",
    "stopped_after", "wall_s"}`` and writes no summary.json (that marks a finished run).
    """
    opts = opts or RunOptions()
    report = report or log.info
    work = (work if isinstance(work, Workspace) else Workspace(work)).ensure()
    src = Path(src)
    if not src.exists():
        raise VoxflowError(f"source {src} does not exist; give a dataset folder, files or a voxflow store.")
    t0 = time.perf_counter()
    configs = _prepare(src, work, opts, report)
    if opts.stop_after is not None:
        return {
            "work": str(work.root),
            "dataset": str(work.dataset_store),
            "configurations": configs,
            "stopped_after": opts.stop_after,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    folds = [str(f) for f in opts.folds]
    for cfg in configs:
        for fold in folds:
            _train(work, cfg, fold, opts, report)
        _postprocess(work, cfg, folds, opts, report)
    best_path = work.best_configuration
    if best_path.is_file() and json.loads(best_path.read_text()).get("candidates_for") == sorted(configs):
        best = json.loads(best_path.read_text())
        _step(report, "select", f"skipped: {best_path} exists")
    else:
        best = find_best_configuration(work, configs, folds, opts=opts)
        best["candidates_for"] = sorted(configs)
        atomic_write_json(best_path, best)
        _step(report, "select", f"best: {'+'.join(best['configurations'])} (CV Dice {best['dice']:.4f}) -> {best_path}")
    summary = {
        "work": str(work.root),
        "dataset": str(work.dataset_store),
        "configurations": configs,
        "folds": folds,
        "cv_dice": best["candidates"],
        "best": best["configurations"],
        "best_dice": best["dice"],
        "predict_command": predict_command(work, best),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(work.summary, summary)
    _step(report, "summary", f"-> {work.summary}")
    report(f"To segment new images:\n  {summary['predict_command']}")
    return summary

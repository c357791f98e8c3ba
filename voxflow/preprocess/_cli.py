"""``voxflow preprocess`` and ``voxflow plan-and-preprocess``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from voxflow._cliutil import handle_errors, preset_option, scheduler_option, workspace_option
from voxflow._lock import dir_lock_file, exclusive_lock
from voxflow.errors import VoxflowError
from voxflow.plan.schema import Plan
from voxflow.workspace import Workspace

log = logging.getLogger(__name__)


def _configurations(plan: Plan, requested: tuple[str, ...]) -> list[str]:
    names = list(requested) or list(plan.configurations)
    for n in names:
        plan.configuration(n)  # raises a PlanError naming the choices
    return names


@click.command("preprocess")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--plans", "plans_path", type=click.Path(dir_okay=False), default=None,
              help="plans.json to follow (default: WORK/plans.json).")
@click.option("-c", "--configuration", "configurations", multiple=True,
              help="Configuration(s) to preprocess, e.g. -c 3d_fullres (repeatable; default: all in the plan).")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output store (with a single -c; default: WORK/preprocessed/<configuration>.zarr).")
@click.option("--overwrite", is_flag=True, help="Redo every case instead of skipping complete ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the foreground index samples.")
@workspace_option
@scheduler_option
@handle_errors
def preprocess(store: str, plans_path: str | None, configurations: tuple[str, ...], output: str | None,
               overwrite: bool, seed: int, work: str, scheduler: str, memory_limit: str | None) -> None:
    """Crop, normalise and resample the dataset STORE for the plan's configuration(s)."""
    from voxflow.preprocess._run import run_preprocess

    ws = Workspace(work)
    plan = Plan.load(plans_path or ws.plans)
    names = _configurations(plan, configurations)
    if output is not None and len(names) != 1:
        raise VoxflowError(f"-o/--output needs exactly one -c configuration; got {names}. Drop -o to write "
                           f"WORK/preprocessed/<configuration>.zarr for each.")
    for name in names:
        out = Path(output) if output else ws.preprocessed(name)
        result = run_preprocess(store, plan, name, out, scheduler=scheduler, memory_limit=memory_limit,
                                overwrite=overwrite, seed=seed)
        click.echo(f"{name}: {len(result.case_ids())} cases in {out}")


def _is_store(path: Path) -> bool:
    from voxflow.store import Store

    if not (path / "zarr.json").is_file():
        return False
    try:
        Store.open(path)
    except VoxflowError:
        return False
    return True


@click.command("plan-and-preprocess")
@click.argument("src", type=click.Path(exists=True))
@click.option("-c", "--configuration", "configurations", multiple=True,
              help="Configuration(s) to preprocess (repeatable; default: every configuration planned).")
@preset_option("Planner preset.")
@click.option("--gpu-memory-gb", type=float, default=None, help="Training memory budget (default: the preset's).")
@click.option("--overwrite", is_flag=True, help="Redo conversion and preprocessing from scratch.")
@workspace_option
@scheduler_option
@handle_errors
def plan_and_preprocess(src: str, configurations: tuple[str, ...], preset: str, gpu_memory_gb: float | None,
                        overwrite: bool, work: str, scheduler: str, memory_limit: str | None) -> None:
    """Convert SRC (unless it is a voxflow store), fingerprint, plan and preprocess, all into --work.

    Holds the workspace lock (WORK/.voxflow.lock) throughout: one writer per workspace."""
    ws = Workspace(work).ensure()
    with exclusive_lock(dir_lock_file(ws.root), command="plan-and-preprocess"):
        _plan_and_preprocess(ws, Path(src), configurations, preset, gpu_memory_gb, overwrite, scheduler,
                             memory_limit)


def _plan_and_preprocess(ws: Workspace, src_path: Path, configurations: tuple[str, ...], preset: str,
                         gpu_memory_gb: float | None, overwrite: bool, scheduler: str,
                         memory_limit: str | None) -> None:
    from voxflow.cluster import scheduler_context
    from voxflow.fingerprint import compute_fingerprint
    from voxflow.plan.planner import plan_experiment
    from voxflow.preprocess._run import run_preprocess
    from voxflow.store import Store

    if _is_store(src_path):
        store = Store.open(src_path)
    else:
        from voxflow.io import convert

        store = convert(src_path, ws.dataset_store, overwrite=overwrite, scheduler=scheduler)
        click.echo(f"converted {len(store.case_ids())} cases into {ws.dataset_store}")
    with scheduler_context(scheduler, memory_limit=memory_limit):
        fp = compute_fingerprint(store)
        fp.save(ws.fingerprint)
        plan = plan_experiment(fp, gpu_memory_gb=gpu_memory_gb, preset=preset)
        plan.save(ws.plans)
        click.echo(f"planned {sorted(plan.configurations)} -> {ws.plans}")
        boxes = {c.case_id: c.nonzero_bbox_zyx for c in fp.cases}
        for name in _configurations(plan, configurations):
            out = run_preprocess(store, plan, name, ws.preprocessed(name), scheduler=None, overwrite=overwrite,
                                 bboxes=boxes)
            click.echo(f"{name}: {len(out.case_ids())} cases in {ws.preprocessed(name)}")

"""``voxflow preprocess`` (``voxflow plan-and-preprocess`` is the workflow's, in ``voxflow.pipeline``)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from voxflow._cliutil import handle_errors, scheduler_option, workspace_option
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
@click.option(
    "--plans",
    "plans_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="plans.json to follow (default: WORK/plans.json).",
)
@click.option(
    "-c",
    "--configuration",
    "configurations",
    multiple=True,
    help="Configuration(s) to preprocess, e.g. -c 3d_fullres (repeatable; default: all in the plan).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Output store (with a single -c; default: WORK/preprocessed/<configuration>.zarr).",
)
@click.option("--overwrite", is_flag=True, help="Redo every case instead of skipping complete ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the foreground index samples.")
@workspace_option
@scheduler_option
@handle_errors
def preprocess(
    store: str,
    plans_path: str | None,
    configurations: tuple[str, ...],
    output: str | None,
    overwrite: bool,
    seed: int,
    work: str,
    scheduler: str,
    memory_limit: str | None,
) -> None:
    """Crop, normalise and resample the dataset STORE for the plan's configuration(s)."""
    from voxflow.preprocess._run import run_preprocess

    ws = Workspace(work)
    plan = Plan.load(plans_path or ws.plans)
    names = _configurations(plan, configurations)
    if output is not None and len(names) != 1:
        raise VoxflowError(
            f"-o/--output needs exactly one -c configuration; got {names}. Drop -o to write "
            f"WORK/preprocessed/<configuration>.zarr for each."
        )
    for name in names:
        out = Path(output) if output else ws.preprocessed(name)
        result = run_preprocess(
            store, plan, name, out, scheduler=scheduler, memory_limit=memory_limit, overwrite=overwrite, seed=seed
        )
        click.echo(f"{name}: {len(result.case_ids())} cases in {out}")

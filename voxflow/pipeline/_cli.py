"""CLI commands `run`, `plan-and-preprocess`, `demo`, `export-model` and `bench`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from voxflow._cliutil import (
    handle_errors,
    parse_set_options,
    preset_option,
    scheduler_option,
    set_option,
    workspace_option,
)


@click.command("run")
@click.argument("src", type=click.Path(exists=True))
@click.option(
    "--work",
    "--workspace",
    "work",
    type=click.Path(file_okay=False),
    envvar="VOXFLOW_WORKSPACE",
    required=True,
    help="Work directory for every output (resumable: rerun to continue).",
)
@click.option(
    "-c",
    "--configurations",
    multiple=True,
    help="Configurations to train (repeatable). Default: every configuration the planner made "
    "(2d, 3d_fullres, and when planned 3d_lowres + 3d_cascade_fullres). A cascade's second "
    "stage brings its first stage (trained first).",
)
@click.option(
    "--folds",
    multiple=True,
    default=("0", "1", "2", "3", "4"),
    show_default=True,
    help="Folds to train (repeatable), 0..4 or 'all' (all cases, no cross-validation).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@preset_option("Planner preset; `cpu` plans small networks for CPU training.")
@click.option("--gpu-memory-gb", type=float, default=None, help="Training memory budget for the planner (GiB).")
@click.option("--nproc", type=int, default=1, show_default=True, help="DDP processes per training run.")
@click.option("--num-workers", type=int, default=2, show_default=True, help="Data loader workers per process.")
@click.option("--no-tta", is_flag=True, help="Disable mirroring test-time augmentation in validation.")
@scheduler_option
@set_option
@handle_errors
def run(
    src: str,
    work: str,
    configurations: tuple[str, ...],
    folds: tuple[str, ...],
    device: str,
    preset: str,
    gpu_memory_gb: float | None,
    nproc: int,
    num_workers: int,
    no_tta: bool,
    scheduler: str,
    memory_limit: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Run the whole workflow on SRC: convert, fingerprint, plan, preprocess, train every configuration
    and fold, choose postprocessing and the best configuration by cross-validation.

    SRC is an nnU-Net v2 raw dataset, an MSD task, DICOM, image/label folders or a voxflow store.
    Each step is skipped when its output is complete, so rerunning after an interruption resumes.
    """
    from voxflow.pipeline._workflow import RunOptions, run_workflow

    opts = RunOptions(
        configurations=configurations or None,
        folds=folds,
        scheduler=scheduler,
        device=device,
        preset=preset,
        gpu_memory_gb=gpu_memory_gb,
        overrides=parse_set_options(overrides),
        nproc=nproc,
        num_workers=num_workers,
        tta=not no_tta,
        memory_limit=memory_limit,
    )
    summary = run_workflow(src, work, opts, report=click.echo)
    click.echo(f"best: {'+'.join(summary['best'])}  cross-validated Dice {summary['best_dice']}")


@click.command("plan-and-preprocess")
@click.argument("src", type=click.Path(exists=True))
@click.option(
    "-c",
    "--configuration",
    "configurations",
    multiple=True,
    help="Configuration(s) to preprocess (repeatable; default: every configuration planned).",
)
@preset_option("Planner preset.")
@click.option("--gpu-memory-gb", type=float, default=None, help="Training memory budget (default: the preset's).")
@click.option("--overwrite", is_flag=True, help="Redo conversion and preprocessing from scratch.")
@workspace_option
@scheduler_option
@handle_errors
def plan_and_preprocess(
    src: str,
    configurations: tuple[str, ...],
    preset: str,
    gpu_memory_gb: float | None,
    overwrite: bool,
    work: str,
    scheduler: str,
    memory_limit: str | None,
) -> None:
    """Convert SRC (unless it is a voxflow store), fingerprint, plan and preprocess, all into --work.

    The first four steps of `voxflow run`, each redone (fingerprint and plan anew; conversion and
    preprocessing resume case by case unless --overwrite). A store as SRC is linked as WORK/dataset.zarr.
    Holds the workspace lock (WORK/.voxflow.lock) throughout: one writer per workspace."""
    from voxflow._lock import dir_lock_file, exclusive_lock
    from voxflow.pipeline._workflow import PREPARE_STEPS, RunOptions, run_workflow
    from voxflow.store import Store
    from voxflow.workspace import Workspace

    ws = Workspace(work).ensure()
    opts = RunOptions(
        configurations=configurations or None,
        scheduler=scheduler,
        preset=preset,
        gpu_memory_gb=gpu_memory_gb,
        memory_limit=memory_limit,
        stop_after="preprocess",
        redo=frozenset(PREPARE_STEPS),
        overwrite=overwrite,
    )
    with exclusive_lock(dir_lock_file(ws.root), command="plan-and-preprocess"):
        result = run_workflow(src, ws, opts, report=click.echo)
    for name in result["configurations"]:
        click.echo(f"{name}: {len(Store.open(ws.preprocessed(name)).case_ids())} cases in {ws.preprocessed(name)}")


@click.command("demo")
@click.option(
    "--work",
    type=click.Path(file_okay=False),
    default="voxflow_demo",
    show_default=True,
    help="Where the synthetic data, models and predictions go.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default sized for 2 CPU cores).")
@click.option("--iters", type=int, default=None, help="Iterations per epoch.")
@click.option("--tta/--no-tta", default=False, show_default=True, help="Mirroring test-time augmentation.")
@scheduler_option
@handle_errors
def demo(
    work: str, device: str, epochs: int | None, iters: int | None, tta: bool, scheduler: str, memory_limit: str | None
) -> None:
    """Run the whole workflow on a built-in synthetic CT dataset and print Dice on held-out cases.

    Generates the data, converts, plans (cpu preset on CPU), preprocesses, trains one fold, chooses
    postprocessing, predicts held-out cases and scores them; writes a PNG of slices. Resumable.
    """
    from voxflow.pipeline._demo import DemoOptions, run_demo

    base = DemoOptions()
    opts = DemoOptions(
        device=device,
        scheduler=scheduler,
        tta=tta,
        epochs=epochs if epochs is not None else base.epochs,
        iters_per_epoch=iters if iters is not None else base.iters_per_epoch,
    )
    run_demo(work, opts, report=click.echo)


@click.command("export-model")
@click.argument("work", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The .zip to write.")
@click.option(
    "-c",
    "--configurations",
    multiple=True,
    help="Configurations to include (default: the best chosen by `voxflow run`).",
)
@click.option("-f", "--folds", multiple=True, help="Folds to include (default: every finished fold).")
@handle_errors
def export_model(work: str, output: str, configurations: tuple[str, ...], folds: tuple[str, ...]) -> None:
    """Package a trained model (plans, final checkpoints, postprocessing) into one zip that
    `voxflow predict -m model.zip` uses on any machine."""
    from voxflow.models import export_model as _export

    path = _export(work, output, configurations=configurations or None, folds=folds or None)
    click.echo(f"model package -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes (about a minute).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the JSON here too.")
def bench(quick: bool, output: str | None) -> None:
    """Run every stage's benchmark (benchmarks/run_all.py) and print JSON plus a markdown table."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise click.ClickException(f"{script} not found: `voxflow bench` needs a source checkout.")
    args = [sys.executable, str(script)] + (["--quick"] if quick else []) + (["-o", output] if output else [])
    raise SystemExit(subprocess.call(args))

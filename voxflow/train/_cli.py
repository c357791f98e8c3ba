"""``voxflow train``: train one fold of one configuration of a workspace."""

from __future__ import annotations

import logging

import click

from voxflow._cliutil import FOLD, handle_errors, parse_set_options, set_option
from voxflow.errors import TrainingInterrupted

#: exit status after a stop signal (EX_TEMPFAIL: "try again", i.e. ``--resume``)
EXIT_INTERRUPTED = 75


class _Interrupted(click.ClickException):
    exit_code = EXIT_INTERRUPTED


log = logging.getLogger(__name__)


@click.command("train")
@click.argument("workdir", type=click.Path(file_okay=False, exists=True))
@click.option("-c", "--configuration", default="3d_fullres", show_default=True, help="Configuration in plans.json.")
@click.option("-f", "--fold", type=FOLD, default="0", show_default=True, help="Fold 0..4 of splits.json, or 'all'.")
@click.option("--epochs", type=int, default=None, help="Override train.epochs.")
@click.option("--iters", type=int, default=None, help="Override train.iters_per_epoch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--nproc",
    type=int,
    default=1,
    show_default=True,
    help="DDP processes on this machine (gloo on CPU, NCCL on CUDA). For several nodes use "
    "`torchrun --nnodes ... -m voxflow.train WORKDIR ...`.",
)
@click.option("--num-workers", type=int, default=2, show_default=True, help="Loader worker processes per rank.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default=None,
    help="Override train.precision: auto (bf16 on CUDA where supported, fp16 with loss scaling on "
    "older GPUs, fp32 on every CPU: bf16 training on CPUs with AVX512-BF16/AMX is not measured yet), "
    "or fp32 / bf16 / fp16 (CUDA only). Recorded in the checkpoint.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from checkpoint_latest.pt of this fold (also after SIGTERM/SIGUSR1, from the step "
    "where the run stopped; the number of processes may differ).",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Delete an earlier run of this fold (checkpoints, logs, validation) and train afresh. Without "
    "--resume or --restart, a fold that already has checkpoints is refused.",
)
@click.option("--no-validation", is_flag=True, help="Skip predicting the validation cases at the end.")
@set_option
@handle_errors
def train(
    workdir: str,
    configuration: str,
    fold: int | str,
    epochs: int | None,
    iters: int | None,
    device: str,
    nproc: int,
    num_workers: int,
    precision: str | None,
    resume: bool,
    restart: bool,
    no_validation: bool,
    overrides: tuple[str, ...],
) -> None:
    """Train fold FOLD of configuration CFG from WORKDIR (plans.json + preprocessed store).

    Writes WORKDIR/runs/CFG/fold_FOLD/ (checkpoints, metrics.jsonl, progress.png, training_log.txt).
    On SIGTERM or SIGUSR1 (SLURM, spot instances) every process finishes its step, checkpoint_latest.pt
    is written and the command exits with status 75; `--resume` continues from there.
    """
    from voxflow.train import train_fold
    from voxflow.workspace import Workspace

    sets: dict[str, object] = dict(parse_set_options(overrides))
    if epochs is not None:
        sets["train.epochs"] = epochs
    if iters is not None:
        sets["train.iters_per_epoch"] = iters
    if precision is not None:
        sets["train.precision"] = precision
    try:
        run_dir = train_fold(
            Workspace(workdir),
            configuration,
            fold,
            device=device,
            resume=resume,
            restart=restart,
            overrides=sets,
            nproc=nproc,
            num_workers=num_workers,
            validate_cases=not no_validation,
        )
    except TrainingInterrupted as e:
        raise _Interrupted(str(e)) from e
    click.echo(str(run_dir))

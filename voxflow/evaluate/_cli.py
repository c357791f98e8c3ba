"""``voxflow evaluate PRED GT [--labels ...] -o summary.json``."""

from __future__ import annotations

import logging

import click

from voxflow._cliutil import handle_errors, scheduler_option

log = logging.getLogger(__name__)


@click.command("evaluate")
@click.argument("pred", type=click.Path(exists=True))
@click.argument("reference", type=click.Path(exists=True))
@click.option(
    "--labels",
    "labels",
    multiple=True,
    metavar="L",
    help="Class values or regions to score, e.g. --labels 1,2,1+2 (repeatable). "
    "Default: the reference's declared labels, else every value present.",
)
@click.option(
    "--tolerance-mm",
    type=float,
    default=1.0,
    show_default=True,
    help="Tolerance of the normalised surface Dice, in mm.",
)
@click.option("--no-surface", is_flag=True, help="Skip surface distances (HD95, ASSD, NSD): overlap metrics only.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default="summary.json",
    show_default=True,
    help="Where to write the JSON summary.",
)
@scheduler_option
@handle_errors
def evaluate(
    pred: str,
    reference: str,
    labels: tuple[str, ...],
    tolerance_mm: float,
    no_surface: bool,
    output: str,
    scheduler: str,
    memory_limit: str | None,
) -> None:
    """Score predictions PRED against references REFERENCE (folders of label files or stores)."""
    from voxflow.evaluate import evaluate as run_evaluate
    from voxflow.evaluate import format_table

    items = [part for item in labels for part in item.split(",") if part.strip()]
    summary = run_evaluate(
        pred,
        reference,
        labels=items or None,
        tolerance_mm=tolerance_mm,
        surface=not no_surface,
        output=output,
        scheduler=scheduler,
        memory_limit=memory_limit,
    )
    click.echo(format_table(summary))
    click.echo(f"{len(summary.metric_per_case)} cases; summary written to {output}")

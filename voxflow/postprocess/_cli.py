"""``voxflow postprocess INPUT OUTPUT -p postprocessing.json``."""

from __future__ import annotations

import click

from voxflow._cliutil import handle_errors, scheduler_option
from voxflow.workspace import ConfigurationDir


@click.command("postprocess")
@click.argument("source", type=click.Path(exists=True))
@click.argument("output", type=click.Path())
@click.option(
    "-p",
    "--postprocessing",
    "spec_path",
    type=click.Path(dir_okay=False),
    help="postprocessing.json to apply (default: MODEL_DIR/postprocessing.json).",
)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False),
    help="Model directory WORK/runs/<cfg>/ holding postprocessing.json.",
)
@click.option(
    "--determine-with",
    "reference",
    type=click.Path(exists=True),
    help="References for SOURCE: choose the operations on SOURCE first (cross-validation style), "
    "save them to --postprocessing, then apply.",
)
@click.option(
    "--connectivity",
    type=int,
    default=1,
    show_default=True,
    help="With --determine-with: 1 = face neighbours, 3 = full (26) connectivity.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@scheduler_option
@handle_errors
def postprocess(
    source: str,
    output: str,
    spec_path: str | None,
    model_dir: str | None,
    reference: str | None,
    connectivity: int,
    overwrite: bool,
    scheduler: str,
    memory_limit: str | None,
) -> None:
    """Apply postprocessing to a prediction store or folder SOURCE, writing OUTPUT."""
    from voxflow.postprocess import PostprocessingSpec, determine_postprocessing, run_postprocess

    if spec_path is None and model_dir is not None:
        spec_path = str(ConfigurationDir(model_dir).postprocessing)
    if spec_path is None:
        raise click.UsageError("give --postprocessing FILE or --model-dir DIR (holding postprocessing.json)")
    if reference is not None:
        spec = determine_postprocessing(
            source, reference, connectivity=connectivity, output=spec_path, scheduler=scheduler
        )
        click.echo(f"chose {len(spec.operations)} operation(s); saved {spec_path}")
    else:
        spec = PostprocessingSpec.load(spec_path)
    for op in spec.operations:
        click.echo(f"  {op.describe()}")
    run_postprocess(source, output, spec, scheduler=scheduler, memory_limit=memory_limit, overwrite=overwrite)
    click.echo(f"wrote {output}")

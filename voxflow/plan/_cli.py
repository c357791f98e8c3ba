"""``voxflow fingerprint`` and ``voxflow plan``: thin wrappers over the library functions."""

from __future__ import annotations

import logging
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
from voxflow.plan.schema import Plan
from voxflow.workspace import Workspace

__all__ = ["fingerprint", "format_plan", "plan"]

log = logging.getLogger(__name__)


@click.command("fingerprint")
@click.argument("store", required=False, type=click.Path(file_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Fingerprint JSON to write. Default: WORK/fingerprint.json.",
)
@click.option(
    "--samples-per-case",
    default=10_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Foreground voxels sampled per case for the intensity statistics.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@workspace_option
@scheduler_option
@handle_errors
def fingerprint(
    store: str | None,
    output: str | None,
    samples_per_case: int,
    seed: int,
    work: str,
    scheduler: str,
    memory_limit: str | None,
) -> None:
    """Measure a dataset store (default WORK/dataset.zarr): shapes, spacings, crop boxes, foreground
    intensities, class counts. Bounded memory; identical on any --scheduler."""
    from voxflow.cluster import scheduler_context
    from voxflow.fingerprint import compute_fingerprint

    ws = Workspace(work)
    src = Path(store) if store else ws.dataset_store
    out = Path(output) if output else ws.fingerprint
    with scheduler_context(scheduler, memory_limit=memory_limit):
        fp = compute_fingerprint(src, samples_per_case=samples_per_case, seed=seed)
    fp.save(out)
    click.echo(f"fingerprint of {fp.n_cases} cases -> {out}")
    for st in fp.intensity:
        if st.n_samples:
            click.echo(
                f"  {st.channel}: foreground mean {st.mean:.4g}, std {st.std:.4g}, "
                f"0.5-99.5% [{st.percentile_00_5:.4g}, {st.percentile_99_5:.4g}]"
            )
    click.echo(
        f"  median spacing (z, y, x) {tuple(round(v, 4) for v in fp.spacing.median_zyx)} mm, "
        f"median shape after crop {tuple(int(v) for v in fp.shape_after_crop.median_zyx)}"
    )


def _fmt(values: object) -> str:
    if isinstance(values, (list, tuple)):
        if values and isinstance(values[0], (list, tuple)):
            return " ".join("x".join(str(v) for v in t) for t in values)
        return "x".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)
    return str(values)


def format_plan(plan: Plan) -> str:
    """A readable table, one column per configuration."""
    cfgs = list(plan.configurations.values())
    rows: list[tuple[str, list[str]]] = [
        ("spacing_zyx (mm)", [_fmt(c.spacing_zyx) for c in cfgs]),
        ("median shape", [_fmt(c.median_shape_vox) for c in cfgs]),
        ("patch", [_fmt(c.patch_size_vox) for c in cfgs]),
        ("batch", [str(c.batch_size) for c in cfgs]),
        ("stages", [str(c.network.n_stages) for c in cfgs]),
        ("features", [_fmt(c.network.features_per_stage) for c in cfgs]),
        ("kernels", [_fmt(c.network.kernel_sizes) for c in cfgs]),
        ("strides", [_fmt(c.network.strides) for c in cfgs]),
        ("architecture", [c.network.architecture for c in cfgs]),
        (
            "normalisation",
            [", ".join(n.scheme + ("(mask)" if n.use_mask else "") for n in c.normalization) for c in cfgs],
        ),
        ("separate z", [f"axis {c.resampling.separate_axis}" if c.resampling.separate_z else "no" for c in cfgs]),
        ("est. memory (GiB)", [f"{c.estimated_memory_gb:.2f}" for c in cfgs]),
        (
            "cascade",
            [
                f"prev {c.previous_stage}" if c.previous_stage else (f"next {c.next_stage}" if c.next_stage else "-")
                for c in cfgs
            ],
        ),
    ]
    head = ["", *[c.name for c in cfgs]]
    widths = [max(len(head[0]), *(len(r[0]) for r in rows))]
    widths += [max(len(head[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(len(cfgs))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip([name, *vals], widths, strict=True)) for name, vals in rows]
    title = (
        f"plan for {plan.dataset_name or 'dataset'}: preset {plan.preset}, "
        f"budget {plan.gpu_memory_gb:g} GiB, channels {list(plan.channel_names)}"
    )
    return "\n".join([title, *lines])


@click.command("plan")
@click.argument("fingerprint_json", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Plans JSON to write. Default: WORK/plans.json.",
)
@click.option(
    "--gpu-memory-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Training memory budget in GiB (RAM for --preset cpu). Default: the preset's (8, 24 for resenc-l, 4 for cpu).",
)
@preset_option("Network family and budget; `cpu` plans small nets that train on a laptop.")
@set_option
@workspace_option
@handle_errors
def plan(
    fingerprint_json: str | None,
    output: str | None,
    gpu_memory_gb: float | None,
    preset: str,
    overrides: tuple[str, ...],
    work: str,
) -> None:
    """Derive every configuration (spacing, patch, batch, topology, normalisation) from a
    fingerprint (default WORK/fingerprint.json), write plans.json and print a table.

    --set applies to every configuration unless the key starts with its name
    (e.g. --set train.epochs=50, --set 3d_fullres.batch_size=4)."""
    from voxflow.fingerprint import Fingerprint
    from voxflow.plan.planner import plan_experiment

    ws = Workspace(work)
    fp = Fingerprint.load(Path(fingerprint_json) if fingerprint_json else ws.fingerprint)
    result = plan_experiment(fp, gpu_memory_gb=gpu_memory_gb, preset=preset)
    sets = parse_set_options(overrides)
    if sets:
        names = list(result.configurations)
        scoped = {k: v for k, v in sets.items() if k.split(".", 1)[0] in names}
        shared = {k: v for k, v in sets.items() if k not in scoped}
        result = result.with_overrides(scoped) if scoped else result
        for name in names:
            if shared:
                result = result.with_overrides(shared, configuration=name)
    out = Path(output) if output else ws.plans
    result.save(out)
    click.echo(format_plan(result))
    click.echo(f"-> {out}")

"""``voxflow convert``, ``voxflow info`` and ``voxflow export``."""

from __future__ import annotations

import json
import re

import click

from voxflow._cliutil import handle_errors, scheduler_option
from voxflow.store import DEFAULT_CHUNKS_ZYX

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"2GB"`` -> 2e9, ``"512MiB"`` -> 536870912, ``"1000"`` -> 1000."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise click.BadParameter(f"expected a size such as 4GB or 512MiB; got {text!r}")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def _parse_chunks(text: str) -> tuple[int, int, int]:
    parts = [p for p in re.split(r"[,x ]+", text.strip()) if p]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"expected three positive integers Z,Y,X; got {text!r}")
    return (int(parts[0]), int(parts[1]), int(parts[2]))


@click.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace DST and redo every case (default: resume).")
@click.option(
    "--chunks",
    default=",".join(map(str, DEFAULT_CHUNKS_ZYX)),
    show_default=True,
    help="Store chunk shape Z,Y,X in voxels.",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Memory the converter may use, e.g. 4GB (default: half the available RAM). Larger volumes "
    "stream slab by slab; gzip NIfTI cannot stream and must fit.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    default="train",
    show_default=True,
    help="nnU-Net/MSD datasets: convert training (imagesTr) or test (imagesTs) cases.",
)
@click.option(
    "--format",
    "fmt",
    default=None,
    help="Force a source format (nnunet-v2, msd, image-label-folders, dicom, file, image-folder).",
)
@click.option(
    "--channel-names",
    default=None,
    metavar="NAME[,NAME..]",
    help="Channel names, one per channel, e.g. CT or T1,T2 (default: dataset.json's, DICOM Modality, "
    "else 'image'). CT selects CT normalisation in the plan.",
)
@scheduler_option
@handle_errors
def convert(
    src: str,
    dst: str,
    overwrite: bool,
    chunks: str,
    max_memory: str | None,
    split: str,
    fmt: str | None,
    channel_names: str | None,
    scheduler: str,
    memory_limit: str | None,
) -> None:
    """Convert SRC into the voxflow dataset store DST (a .zarr folder).

    SRC is detected automatically: an nnU-Net v2 raw dataset, an MSD task folder, a folder with
    images/ and labels/ of matching file names, a folder of DICOM series (DICOM SEG objects and TCIA
    mask series, i.e. series described as "mask" with their image's geometry, become the labels of
    their image series; the Modality names the channel), a single image file or multi-page TIFF, or
    a folder of 2D slices (one volume). Cases run in parallel; a rerun skips complete cases.
    """
    from voxflow.io import convert as run_convert

    names = None
    if channel_names is not None:
        names = [n.strip() for n in channel_names.split(",")]
        if not all(names):
            raise click.BadParameter(
                f"expected comma-separated names such as CT or T1,T2; got {channel_names!r}",
                param_hint="--channel-names",
            )
    store = run_convert(
        src,
        dst,
        overwrite=overwrite,
        scheduler=scheduler,
        chunks_zyx=_parse_chunks(chunks),
        max_memory_bytes=parse_bytes(max_memory) if max_memory else None,
        split=split,
        format=fmt,
        memory_limit=memory_limit,
        channel_names=names,
    )
    click.echo(f"{store.path}: {len(store.case_ids())} complete case(s)")


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--verify",
    is_flag=True,
    help="Read every chunk of every complete case and check it (files present, decodes, checksum); "
    "exit with status 1 if anything is damaged.",
)
@handle_errors
def info(store: str, as_json: bool, verify: bool) -> None:
    """Summarise STORE: cases, shapes, spacings, channels, labels, size on disk, incomplete and damaged cases."""
    from voxflow.errors import StoreDamagedError
    from voxflow.io import format_info, store_info

    data = store_info(store, verify=verify)
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))
    if data["damaged_cases"]:
        raise StoreDamagedError(
            f"{len(data['damaged_cases'])} case(s) of {store} are damaged: "
            f"{data['damaged_cases'][:8]}. Rerun the command that wrote the store to redo them."
        )


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--case", "cases", multiple=True, help="Export only this case (repeatable). Default: all.")
@click.option("--array", default="label", show_default=True, help="Array to export: label, image or probs.")
@click.option(
    "--file-ending",
    default=".nii.gz",
    show_default=True,
    help="Output format by extension (.nii.gz, .nii, .nrrd, .mha, ...; .dcm: one DICOM SEG per case, "
    "for cases converted from DICOM).",
)
@click.option(
    "--dicom-reference",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="With .dcm: the dataset store converted from the DICOM series, for stores whose cases do not "
    "record their DICOM source (cases matched by id).",
)
@click.option(
    "--model-name",
    default=None,
    help="With .dcm: the algorithm name in the SEG (default: the prediction's configurations, else 'voxflow').",
)
@scheduler_option
@handle_errors
def export(
    store: str,
    out_dir: str,
    cases: tuple[str, ...],
    array: str,
    file_ending: str,
    dicom_reference: str | None,
    model_name: str | None,
    scheduler: str,
    memory_limit: str | None,
) -> None:
    """Export an array of STORE's cases to image files in OUT_DIR with the original geometry."""
    from voxflow.io import export_store

    paths = export_store(
        store,
        out_dir,
        case_ids=list(cases) or None,
        file_ending=file_ending,
        array=array,
        scheduler=scheduler,
        memory_limit=memory_limit,
        dicom_reference=dicom_reference,
        model_name=model_name,
    )
    click.echo(f"wrote {len(paths)} file(s) to {out_dir}")

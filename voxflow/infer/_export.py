"""Export predicted label maps to image files with the original geometry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from voxflow.errors import ConversionError
from voxflow.io import dicom_reference, export_store
from voxflow.store import Store

__all__ = ["check_dicom_sources", "export_labels"]


def export_labels(
    store: Store,
    out_dir: Path,
    case_ids: Sequence[str],
    *,
    file_ending: str,
    scheduler: str = "threads",
    source: Store | None = None,
    model_name: str | None = None,
) -> list[Path]:
    """Write ``<case><file_ending>`` per case (uint8 labels, geometry from the prediction store);
    ``.dcm``: one DICOM SEG per case referencing the DICOM series of ``source``'s case."""
    return export_store(
        store,
        out_dir,
        case_ids=list(case_ids),
        file_ending=file_ending,
        array="label",
        scheduler=scheduler,
        progress=False,
        dicom_reference=source,
        model_name=model_name,
    )


def check_dicom_sources(source: Store, case_ids: Sequence[str]) -> None:
    """DICOM SEG output needs every case converted from a DICOM series: refuse before predicting."""
    not_dicom = [c for c in case_ids if dicom_reference(source.case_attrs(c)) is None]
    if not_dicom:
        files = {c: (source.case_attrs(c).get("provenance") or {}).get("image") for c in not_dicom[:5]}
        raise ConversionError(
            f"--output-format dicom-seg needs inputs converted from DICOM series (a SEG references its source "
            f"images); these cases are not: {files}. Predict them with another --output-format (nifti, nrrd, mha)."
        )

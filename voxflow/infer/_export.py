"""Export predicted label maps to image files with the original geometry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from voxflow.io import export_store
from voxflow.store import Store

__all__ = ["export_labels"]


def export_labels(store: Store, out_dir: Path, case_ids: Sequence[str], *, file_ending: str,
                  scheduler: str = "threads") -> list[Path]:
    """Write ``<case><file_ending>`` per case (uint8 labels, geometry from the prediction store)."""
    return export_store(store, out_dir, case_ids=list(case_ids), file_ending=file_ending, array="label",
                        scheduler=scheduler, progress=False)

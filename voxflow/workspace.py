"""Where every artefact of a voxflow experiment lives, derived from one work directory.

::

    WORK/
      dataset.zarr              converted dataset store
      fingerprint.json          dataset fingerprint
      plans.json                plan (all configurations)
      splits.json               cross-validation folds (shared by every configuration)
      preprocessed/<cfg>.zarr   preprocessed store per configuration
      runs/<cfg>/fold_<k>/      checkpoints, logs, validation predictions of one fold
      predictions/              predictions written by `voxflow predict` from `voxflow run`

Paths come from the command line (``--work``/``--workspace``); the env var
``VOXFLOW_WORKSPACE`` is only a click default for that option.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voxflow._types import PathLikeStr

__all__ = ["Workspace"]


@dataclass(frozen=True)
class Workspace:
    """All paths of one experiment, rooted at ``root``."""

    root: Path

    def __init__(self, root: PathLikeStr):
        object.__setattr__(self, "root", Path(root))

    @property
    def dataset_store(self) -> Path:
        return self.root / "dataset.zarr"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    def preprocessed(self, configuration: str) -> Path:
        return self.root / "preprocessed" / f"{configuration}.zarr"

    def run_dir(self, configuration: str, fold: int | str) -> Path:
        return self.root / "runs" / configuration / f"fold_{fold}"

    def configuration_dir(self, configuration: str) -> Path:
        return self.root / "runs" / configuration

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def ensure(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

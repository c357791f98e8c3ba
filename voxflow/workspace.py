"""Where every artefact of a voxflow experiment lives, derived from one work directory.

::

    WORK/
      dataset.zarr              converted dataset store
      fingerprint.json          dataset fingerprint
      plans.json                plan (all configurations)
      splits.json               cross-validation folds (shared by every configuration)
      preprocessed/<cfg>.zarr   preprocessed store per configuration
      runs/<cfg>/               a configuration's folds and postprocessing (:class:`ConfigurationDir`)
        postprocessing.json     chosen by cross-validation
        fold_<k>/               checkpoints, logs, validation predictions of one fold (:class:`FoldDir`)
      best_configuration.json   the configuration(s) `voxflow run` selected
      summary.json              what `voxflow run` did
      predictions/              predictions written by `voxflow predict` from `voxflow run`

A model directory outside a workspace (``-m WORK/runs/<cfg>``, an unpacked model package) has the
same ``<cfg>/fold_<k>/`` layout: :class:`ConfigurationDir` and :class:`FoldDir` name its files, so no
other module spells them.

Paths come from the command line (``--work``/``--workspace``); the env var
``VOXFLOW_WORKSPACE`` is only a click default for that option.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voxflow._types import PathLikeStr

__all__ = ["CHECKPOINT_FINAL", "PREDICTION_STORE", "ConfigurationDir", "FoldDir", "Workspace"]

CHECKPOINT_FINAL = "checkpoint_final.pt"
PREDICTION_STORE = "prediction.zarr"  # the store in every prediction output folder
_FOLD_PREFIX = "fold_"


@dataclass(frozen=True)
class FoldDir:
    """The run directory of one fold: ``<cfg>/fold_<k>/``."""

    path: Path

    def __init__(self, path: PathLikeStr):
        object.__setattr__(self, "path", Path(path))

    @property
    def fold(self) -> str:
        """The fold as named in the directory (``"0"``, ``"all"``)."""
        return self.path.name.removeprefix(_FOLD_PREFIX)

    def checkpoint(self, kind: str) -> Path:
        """``checkpoint_<kind>.pt`` (kind ``final``, ``latest`` or ``best``)."""
        return self.path / f"checkpoint_{kind}.pt"

    @property
    def checkpoint_final(self) -> Path:
        return self.path / CHECKPOINT_FINAL

    @property
    def checkpoint_latest(self) -> Path:
        return self.checkpoint("latest")

    @property
    def partial_checkpoints(self) -> list[Path]:
        """Temporary files of checkpoint writes cut short by a kill."""
        return sorted(self.path.glob(".checkpoint_*.tmp"))

    @property
    def configuration(self) -> ConfigurationDir:
        """The configuration directory holding this fold."""
        return ConfigurationDir(self.path.parent)

    @property
    def validation(self) -> Path:
        """End-of-fold validation output: ``prediction.zarr`` and ``summary.json``."""
        return self.path / "validation"

    @property
    def validation_summary(self) -> Path:
        return self.validation / "summary.json"

    @property
    def validation_predictions(self) -> Path:
        return self.validation / PREDICTION_STORE


@dataclass(frozen=True)
class ConfigurationDir:
    """One configuration's directory: ``runs/<cfg>/`` (or ``<model root>/<cfg>/``)."""

    path: Path

    def __init__(self, path: PathLikeStr):
        object.__setattr__(self, "path", Path(path))

    @property
    def name(self) -> str:
        return self.path.name

    def fold(self, fold: int | str) -> FoldDir:
        return FoldDir(self.path / f"{_FOLD_PREFIX}{fold}")

    def folds(self) -> list[FoldDir]:
        """Every ``fold_*`` directory, sorted by name."""
        return [FoldDir(p) for p in sorted(self.path.glob(f"{_FOLD_PREFIX}*")) if p.is_dir()]

    def has_folds(self) -> bool:
        return any(self.path.glob(f"{_FOLD_PREFIX}*"))

    def trained_folds(self) -> list[FoldDir]:
        """The folds holding a final checkpoint, sorted by name."""
        return [f for f in self.folds() if f.checkpoint_final.is_file()]

    @property
    def postprocessing(self) -> Path:
        return self.path / "postprocessing.json"


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

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def configuration(self, configuration: str) -> ConfigurationDir:
        return ConfigurationDir(self.runs / configuration)

    def fold(self, configuration: str, fold: int | str) -> FoldDir:
        return self.configuration(configuration).fold(fold)

    def run_dir(self, configuration: str, fold: int | str) -> Path:
        return self.fold(configuration, fold).path

    def configuration_dir(self, configuration: str) -> Path:
        return self.configuration(configuration).path

    def configuration_names(self) -> list[str]:
        """Names of the directories under ``runs/``, sorted."""
        return sorted(p.name for p in self.runs.iterdir() if p.is_dir()) if self.runs.is_dir() else []

    @property
    def best_configuration(self) -> Path:
        return self.root / "best_configuration.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def ensure(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

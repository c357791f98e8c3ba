"""The voxflow error tree.

Every error a user can meet derives from :class:`VoxflowError`; subclasses also inherit the builtin
they refine, so ``except ValueError`` keeps working for callers that do not know voxflow.
Messages say what must hold, what was found (naming the case and file), and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CaseNotFoundError",
    "ConfigError",
    "ConnectivityError",
    "ConversionError",
    "EvaluationError",
    "GeometryError",
    "GeometryMismatchError",
    "IncompleteStoreError",
    "LayoutError",
    "LockedError",
    "PlanError",
    "PostprocessingError",
    "StoreDamagedError",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "VoxflowError",
    "VoxflowWarning",
]


class VoxflowError(Exception):
    """Base class of all voxflow errors."""


class VoxflowWarning(UserWarning):
    """Base class of voxflow warnings (turned into errors by the test suite)."""


class PlanError(VoxflowError, ValueError):
    """A plan or fingerprint file is invalid; the message names the field."""


class LayoutError(VoxflowError, ValueError):
    """A store or a source folder does not have the expected layout."""


class IncompleteStoreError(LayoutError):
    """A store, case or artefact is missing or was only partly written."""


class StoreDamagedError(LayoutError):
    """Stored data is damaged: unparseable metadata, a missing chunk file, a failed checksum."""


class LockedError(VoxflowError, RuntimeError):
    """Another voxflow process is writing the same store, folder or run directory."""


class ConfigError(VoxflowError, ValueError):
    """An argument of a library function (or a value built from one) is outside what it accepts.

    Plan and fingerprint fields raise :class:`PlanError` instead; this is for settings that live
    outside plans.json, e.g. an ``AugmentConfig`` field or a loader's ``rank``.
    """


class GeometryError(VoxflowError, ValueError):
    """A geometry is invalid: not three entries per axis, a non-positive size or spacing, ..."""


class GeometryMismatchError(GeometryError):
    """Two arrays that must share a grid (image/label, prediction/reference) do not."""


class ConversionError(VoxflowError, ValueError):
    """An input file cannot be converted (unreadable, NaN, undeclared labels, ...)."""


class EvaluationError(VoxflowError, ValueError):
    """Evaluation cannot run or its summary cannot be read (bad labels, tolerance or summary file)."""


class CaseNotFoundError(VoxflowError, FileNotFoundError):
    """A case id or file that was asked for does not exist."""


class PostprocessingError(VoxflowError, ValueError):
    """A postprocessing operation or spec is invalid."""


class ConnectivityError(VoxflowError, ValueError):
    """An unsupported connectivity was asked for."""


class TrainingDivergedError(VoxflowError, FloatingPointError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(VoxflowError):
    """Training stopped on SIGTERM/SIGUSR1 after writing ``checkpoint_latest.pt``; ``--resume`` continues."""

"""End-of-fold validation: predict the fold's validation cases with the sliding-window predictor and
score them against their references. Needs :mod:`voxflow.infer` and :mod:`voxflow.evaluate`; when a
build lacks them the step is skipped with a logged warning (training results stay valid)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from voxflow.workspace import Workspace

__all__ = ["validate_fold"]

log = logging.getLogger(__name__)


def validate_fold(work: Workspace, configuration: str, fold: int | str, val_ids: Sequence[str], *,
                  device: str = "cpu") -> dict[str, Any] | None:
    """Predict ``val_ids`` from the dataset store into ``run_dir/validation`` and write
    ``run_dir/validation/summary.json``; returns the summary or ``None`` when skipped."""
    try:
        from voxflow.evaluate import evaluate  # noqa: F401
        from voxflow.infer import predict  # noqa: F401
    except ImportError as e:
        log.warning("end-of-fold validation skipped for %s fold %s: %s is not available in this build "
                    "(the pseudo-Dice in metrics.jsonl is the only validation metric)", configuration, fold, e.name)
        return None
    return _predict_and_score(work, configuration, fold, val_ids, device=device,
                              out_dir=work.run_dir(configuration, fold) / "validation")


def _predict_and_score(work: Workspace, configuration: str, fold: int | str, val_ids: Sequence[str], *,
                       device: str, out_dir: Path) -> dict[str, Any] | None:
    log.warning("end-of-fold validation skipped for %s fold %s: voxflow.infer.predict has no case selection "
                "yet, so the %d validation cases cannot be predicted alone", configuration, fold, len(val_ids))
    return None

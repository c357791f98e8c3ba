"""End-of-fold validation: predict the fold's validation cases from the dataset store with the
sliding-window predictor (:func:`voxflow.infer.predict`, original geometry) and score them against
their reference labels (:func:`voxflow.evaluate.evaluate`).

Output: the fold's validation directory (:attr:`voxflow.workspace.FoldDir.validation`,
``runs/<cfg>/fold_<k>/validation/``) with ``prediction.zarr`` and ``summary.json``. Skipped, with a
logged warning, when the workspace has no dataset store (training straight from a preprocessed store).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from voxflow.workspace import Workspace

if TYPE_CHECKING:
    from voxflow.evaluate import EvaluationSummary

__all__ = ["cross_validation_model", "validate_fold"]

log = logging.getLogger(__name__)


def validate_fold(
    work: Workspace,
    configuration: str,
    fold: int | str,
    val_ids: Sequence[str] | None = None,
    *,
    device: str = "cpu",
    tta: bool = True,
    scheduler: str = "threads",
) -> EvaluationSummary | None:
    """Predict ``val_ids`` (default: the fold's validation cases in ``splits.json``) with
    ``checkpoint_final.pt`` of the fold and write ``validation/summary.json``; return the evaluation
    summary, or ``None`` when skipped."""
    run = work.fold(configuration, fold)
    if not (work.dataset_store / "zarr.json").exists():
        log.warning(
            "end-of-fold validation skipped for %s fold %s: no dataset store at %s to predict from",
            configuration,
            fold,
            work.dataset_store,
        )
        return None
    if val_ids is None:
        val_ids = _fold_validation_ids(work, configuration, fold)
    from voxflow.evaluate import evaluate
    from voxflow.infer import predict
    from voxflow.models import load_model

    model = cross_validation_model(work, load_model(run.checkpoint_final, device=device), fold)
    log.info("predicting %d validation cases of %s fold %s", len(val_ids), configuration, fold)
    pred = predict(
        work.dataset_store,
        run.validation,
        models=[model],
        device=device,
        tta=tta,
        case_ids=list(val_ids),
        export=False,
        overwrite=True,
        scheduler=scheduler,
        progress=False,
    )
    summary = evaluate(pred, work.dataset_store, surface=False, output=run.validation_summary, scheduler=scheduler)
    log.info("validation of %s fold %s: foreground mean Dice %.4f", configuration, fold, summary.dice)
    return summary


def cross_validation_model(work: Workspace, model: tuple[Any, Any, Any], fold: int | str) -> Any:
    """``model`` (a ``load_model`` triple) as `voxflow predict` takes it for cross-validation.

    A cascade's second stage becomes an :class:`~voxflow.infer.Ensemble` whose previous-stage input
    is each case's first-stage cross-validation prediction (``runs/<previous>/fold_<k>/validation``
    of the fold that validates the case), as in training; anything else is returned as is.
    """
    net, cfg, meta = model
    if cfg.previous_stage is None:
        return model
    from voxflow.infer import Ensemble
    from voxflow.store import Store
    from voxflow.train.splits import load_or_create_splits

    store = Store.open(work.preprocessed(cfg.name))
    splits = load_or_create_splits(work, store.case_ids(), groups=store.meta.extra.get("case_groups"))
    sources = {
        c: work.fold(cfg.previous_stage, k).validation_predictions for k, s in enumerate(splits) for c in s["val"]
    }
    return Ensemble(cfg, meta, [net], [f"{cfg.name}/fold_{fold}"], previous_source=sources)


def _fold_validation_ids(work: Workspace, configuration: str, fold: int | str) -> list[str]:
    from voxflow.store import Store
    from voxflow.train.splits import fold_cases, load_or_create_splits

    store = Store.open(work.preprocessed(configuration))
    case_ids = store.case_ids()
    splits = load_or_create_splits(work, case_ids, groups=store.meta.extra.get("case_groups"))
    return fold_cases(splits, fold, case_ids)[1]

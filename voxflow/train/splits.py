"""Cross-validation splits: ``WORK/splits.json``, made once per dataset and shared by every configuration.

The file is nnU-Net's format, a list of folds ``[{"train": [case ids], "val": [case ids]}, ...]``.
An existing file is checked to name only known cases. A file the user wrote (or edited) is
honoured as is, even if it leaves cases out; a file voxflow generated (recognised by being exactly
what :func:`make_splits` gives for the cases it names) must cover every case of the store: if the
store gained cases since, training stops and says so, rather than never using them. Folds are drawn with a seeded permutation; with ``groups`` (case id →
group key, e.g. the patient of several scans) all cases of one group land in the same fold.
Fold ``"all"`` trains on every case and reports the pseudo-Dice on the training cases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from voxflow._serial import atomic_write_json
from voxflow.errors import IncompleteStoreError, PlanError
from voxflow.store import Store
from voxflow.workspace import Workspace

__all__ = ["fold_cases", "load_or_create_splits", "make_splits", "require_finished_store"]

log = logging.getLogger(__name__)


def make_splits(
    case_ids: Sequence[str], *, n_folds: int = 5, seed: int = 12345, groups: Mapping[str, str] | None = None
) -> list[dict[str, list[str]]]:
    """K folds over groups (each case its own group by default), seeded; at most one fold per group."""
    case_ids = sorted(case_ids)
    group_of = {c: str((groups or {}).get(c, c)) for c in case_ids}
    keys = sorted(set(group_of.values()))
    if len(keys) < 2:
        raise PlanError(
            f"cross-validation needs at least 2 cases (groups); got {len(keys)}. Train with --fold all instead."
        )
    k = min(n_folds, len(keys))
    order = np.random.default_rng(seed).permutation(len(keys))
    fold_of_group = {keys[g]: i % k for i, g in enumerate(order)}
    folds = []
    for f in range(k):
        val = [c for c in case_ids if fold_of_group[group_of[c]] == f]
        folds.append({"train": [c for c in case_ids if c not in set(val)], "val": val})
    return folds


def load_or_create_splits(
    work: Workspace,
    case_ids: Sequence[str],
    *,
    n_folds: int = 5,
    seed: int = 12345,
    groups: Mapping[str, str] | None = None,
) -> list[dict[str, list[str]]]:
    """Read ``work.splits`` if present (validated), else make it and write it atomically."""
    path = work.splits
    known = set(case_ids)
    if path.exists():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}. Fix or delete it.") from None
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
            raise PlanError(f"{path} must be a list of {{'train': [...], 'val': [...]}}; fix or delete it.")
        unknown = sorted({c for s in splits for c in (*s["train"], *s["val"])} - known)
        if unknown:
            raise PlanError(
                f"{path} names cases that are not in the preprocessed store: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}; fix the file or delete it to regenerate."
            )
        _check_coverage(path, splits, known, n_folds=n_folds, seed=seed, groups=groups)
        return splits
    splits = make_splits(case_ids, n_folds=n_folds, seed=seed, groups=groups)
    atomic_write_json(path, splits)
    log.info("wrote %d-fold splits to %s", len(splits), path)
    return splits


def _check_coverage(
    path: object,
    splits: list[dict[str, list[str]]],
    known: set[str],
    *,
    n_folds: int,
    seed: int,
    groups: Mapping[str, str] | None,
) -> None:
    """A voxflow-generated splits file must name every case of the store (a user's file may omit some)."""
    named = {c for s in splits for c in (*s["train"], *s["val"])}
    omitted = sorted(known - named)
    if not omitted:
        return
    try:
        generated = len(named) >= 2 and splits == make_splits(sorted(named), n_folds=n_folds, seed=seed, groups=groups)
    except PlanError:
        generated = False
    if not generated:
        log.info(
            "%s (written by hand) leaves out %d case(s) of the store, e.g. %s; they are not used",
            path,
            len(omitted),
            omitted[:3],
        )
        return
    raise PlanError(
        f"a splits file voxflow generated must cover every case of the preprocessed store; {path} was made "
        f"from {len(named)} cases and the store now has {len(known)} ({len(omitted)} new: {omitted[:5]}"
        f"{' ...' if len(omitted) > 5 else ''}), e.g. after an interrupted preprocess. Delete {path} to "
        f"regenerate it (then retrain folds trained on the old splits), or add the cases to it by hand."
    )


def require_finished_store(store: Store, work: Workspace, configuration: str) -> None:
    """Refuse to train on a preprocessed store whose preprocessing did not finish (killed, still
    running, or the dataset store gained cases since), naming the cases and the command to finish."""
    unfinished = store.unfinished_case_ids()
    if not unfinished:
        return
    raise IncompleteStoreError(
        f"training needs every case of {store.path} preprocessed; {len(unfinished)} case(s) are not: "
        f"{unfinished[:8]}{' ...' if len(unfinished) > 8 else ''}. Finish them with `voxflow preprocess "
        f"{work.dataset_store} -c {configuration} --work {work.root}` (it resumes; wait for a preprocess "
        f"that is still running), then train."
    )


def fold_cases(
    splits: Sequence[Mapping[str, Sequence[str]]], fold: int | str, case_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(train, val) case ids of ``fold``; ``"all"`` → (every case, every case)."""
    if str(fold) == "all":
        return sorted(case_ids), sorted(case_ids)
    try:
        k = int(fold)
        split = splits[k]
    except (ValueError, IndexError):
        raise PlanError(f"fold must be 0..{len(splits) - 1} or 'all'; got {fold!r}") from None
    return list(split["train"]), list(split["val"])

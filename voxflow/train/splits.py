"""Cross-validation splits: ``WORK/splits.json``, made once per dataset and shared by every configuration.

The file is nnU-Net's format, a list of folds ``[{"train": [case ids], "val": [case ids]}, ...]``.
An existing file (written by voxflow or by the user) is honoured as is, after checking that it
names only known cases. Folds are drawn with a seeded permutation; with ``groups`` (case id →
group key, e.g. the patient of several scans) all cases of one group land in the same fold.
Fold ``"all"`` trains on every case and reports the pseudo-Dice on the training cases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from voxflow._serial import atomic_write_json
from voxflow.errors import PlanError
from voxflow.workspace import Workspace

__all__ = ["fold_cases", "load_or_create_splits", "make_splits"]

log = logging.getLogger(__name__)


def make_splits(case_ids: Sequence[str], *, n_folds: int = 5, seed: int = 12345,
                groups: Mapping[str, str] | None = None) -> list[dict[str, list[str]]]:
    """K folds over groups (each case its own group by default), seeded; at most one fold per group."""
    case_ids = sorted(case_ids)
    group_of = {c: str((groups or {}).get(c, c)) for c in case_ids}
    keys = sorted(set(group_of.values()))
    if len(keys) < 2:
        raise PlanError(f"cross-validation needs at least 2 cases (groups); got {len(keys)}. "
                        f"Train with --fold all instead.")
    k = min(n_folds, len(keys))
    order = np.random.default_rng(seed).permutation(len(keys))
    fold_of_group = {keys[g]: i % k for i, g in enumerate(order)}
    folds = []
    for f in range(k):
        val = [c for c in case_ids if fold_of_group[group_of[c]] == f]
        folds.append({"train": [c for c in case_ids if c not in set(val)], "val": val})
    return folds


def load_or_create_splits(work: Workspace, case_ids: Sequence[str], *, n_folds: int = 5, seed: int = 12345,
                          groups: Mapping[str, str] | None = None) -> list[dict[str, list[str]]]:
    """Read ``work.splits`` if present (validated), else make it and write it atomically."""
    path = work.splits
    known = set(case_ids)
    if path.exists():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}. Fix or delete it.") from None
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s)
                                                     for s in splits):
            raise PlanError(f"{path} must be a list of {{'train': [...], 'val': [...]}}; fix or delete it.")
        unknown = sorted({c for s in splits for c in (*s["train"], *s["val"])} - known)
        if unknown:
            raise PlanError(f"{path} names cases that are not in the preprocessed store: {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}; fix the file or delete it to regenerate.")
        return splits
    splits = make_splits(case_ids, n_folds=n_folds, seed=seed, groups=groups)
    atomic_write_json(path, splits)
    log.info("wrote %d-fold splits to %s", len(splits), path)
    return splits


def fold_cases(splits: Sequence[Mapping[str, Sequence[str]]], fold: int | str,
               case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, val) case ids of ``fold``; ``"all"`` → (every case, every case)."""
    if str(fold) == "all":
        return sorted(case_ids), sorted(case_ids)
    try:
        k = int(fold)
        split = splits[k]
    except (ValueError, IndexError):
        raise PlanError(f"fold must be 0..{len(splits) - 1} or 'all'; got {fold!r}") from None
    return list(split["train"]), list(split["val"])

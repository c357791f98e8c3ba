"""Finding and loading the trained models of a prediction: folds of one or more configurations."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxflow.errors import IncompleteStoreError, VoxflowError
from voxflow.plan.schema import Configuration
from voxflow.store import DatasetMeta

__all__ = ["Ensemble", "find_checkpoints", "group_models"]

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint_final.pt"


def _config_dirs(model_dirs: Sequence[Path], configurations: Sequence[str] | None) -> list[Path]:
    """Each model dir is ``runs/<cfg>/`` (holding ``fold_*``) or ``runs/`` (select with configurations)."""
    out: list[Path] = []
    for d in model_dirs:
        if not d.is_dir():
            raise IncompleteStoreError(f"model dir {str(d)!r} must exist (WORK/runs/<configuration>); it does "
                                       f"not. Train a model first (`voxflow train`).")
        if any(d.glob("fold_*")):
            if configurations and d.name not in configurations:
                raise VoxflowError(f"model dir {str(d)!r} holds configuration {d.name!r}, not one of "
                                   f"{list(configurations)}; drop -c or point -m at WORK/runs.")
            out.append(d)
        elif configurations:
            out.extend(d / c for c in configurations)
        else:
            out.extend(sorted(p for p in d.iterdir() if p.is_dir() and any(p.glob("fold_*"))))
    if not out:
        raise IncompleteStoreError(f"model dirs {[str(d) for d in model_dirs]} must hold fold_<k>/{CHECKPOINT}; "
                                   f"found none.")
    return out


def find_checkpoints(model_dirs: Sequence[str | Path], *, configurations: Sequence[str] | None = None,
                     folds: Sequence[int | str] | None = None) -> list[Path]:
    """Checkpoint paths ``<cfg dir>/fold_<k>/checkpoint_final.pt`` (all folds present by default)."""
    paths: list[Path] = []
    for cdir in _config_dirs([Path(d) for d in model_dirs], configurations):
        wanted = ([cdir / f"fold_{f}" for f in folds] if folds
                  else sorted(p for p in cdir.glob("fold_*") if (p / CHECKPOINT).exists()))
        for fdir in wanted:
            ckpt = fdir / CHECKPOINT
            if not ckpt.exists():
                raise IncompleteStoreError(f"{ckpt} must exist to predict with {fdir.name} of {cdir.name}; it "
                                           f"does not. Finish training that fold or choose others with -f.")
            paths.append(ckpt)
        if not wanted:
            raise IncompleteStoreError(f"{cdir} must hold fold_<k>/{CHECKPOINT}; found none.")
    return paths


@dataclass
class Ensemble:
    """The folds (networks) of one configuration, averaged tile by tile."""

    configuration: Configuration
    dataset: DatasetMeta
    networks: list[Any]
    names: list[str]


def group_models(models: Sequence[tuple[Any, Configuration, DatasetMeta]],
                 names: Sequence[str] | None = None) -> list[Ensemble]:
    """Group ``(network, configuration, dataset)`` triples by configuration; all must share labels."""
    groups: dict[str, Ensemble] = {}
    for i, (net, cfg, meta) in enumerate(models):
        name = names[i] if names else f"{cfg.name}/model_{i}"
        ens = groups.get(cfg.name)
        if ens is None:
            groups[cfg.name] = Ensemble(cfg, meta, [net], [name])
            continue
        if cfg != ens.configuration:
            raise VoxflowError(f"models of configuration {cfg.name!r} must share one plan; {name} differs.")
        ens.networks.append(net)
        ens.names.append(name)
    out = list(groups.values())
    first = out[0].dataset if out else None
    for ens in out:
        if first is not None and (ens.dataset.labels != first.labels
                                  or ens.dataset.regions_class_order != first.regions_class_order):
            raise VoxflowError(f"ensembled configurations must predict the same labels; {ens.configuration.name!r} "
                               f"has {ens.dataset.labels}, {out[0].configuration.name!r} has {first.labels}.")
    if not out:
        raise VoxflowError("predict needs at least one model (model_dir or models); got none.")
    return out

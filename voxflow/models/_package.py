"""Model packaging: one zip with everything `voxflow predict` needs on another machine.

Layout inside the zip (also the layout of an unpacked model directory; the configuration
directories are :class:`~voxflow.workspace.ConfigurationDir`)::

    voxflow_model.json            {"format": "voxflow-model-1", "configurations": [...], "folds": {...}}
    plans.json                    the plan (all configurations)
    <cfg>/fold_<k>/checkpoint_final.pt
    <cfg>/postprocessing.json     when chosen by cross-validation
    <previous>/fold_<k>/...        a cascade's first stage (``previous_stages`` in the manifest),
                                  same folds; prediction runs it before the chosen stage

Checkpoints are saved from CPU tensors, so they load on CPU and CUDA alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from voxflow._types import PathLikeStr
from voxflow.errors import IncompleteStoreError, VoxflowError
from voxflow.workspace import CHECKPOINT_FINAL, ConfigurationDir, Workspace

__all__ = ["MODEL_FORMAT", "export_model", "is_model_package", "package_configurations", "unpack_model"]

log = logging.getLogger(__name__)
MODEL_FORMAT = "voxflow-model-1"
MANIFEST = "voxflow_model.json"


def _folds_with_final(work: Workspace, configuration: str) -> list[str]:
    return [f.fold for f in work.configuration(configuration).trained_folds()]


def _chosen_configurations(work: Workspace) -> list[str]:
    """The best configuration(s) recorded by ``voxflow run``, else every configuration directory."""
    if work.best_configuration.is_file():
        return list(json.loads(work.best_configuration.read_text())["configurations"])
    return work.configuration_names()


def export_model(
    work: PathLikeStr | Workspace,
    out_zip: PathLikeStr,
    *,
    configurations: Sequence[str] | None = None,
    folds: Sequence[str | int] | None = None,
) -> Path:
    """Write ``out_zip`` holding the plan, the final checkpoints and postprocessing.

    ``configurations`` defaults to the best configuration(s) recorded by ``voxflow run``
    (``WORK/best_configuration.json``), else every configuration with a finished fold.
    """
    work = work if isinstance(work, Workspace) else Workspace(work)
    if not work.plans.is_file():
        raise IncompleteStoreError(f"{work.plans} is missing; run `voxflow plan` / `voxflow run` first.")
    if configurations is None:
        configurations = _chosen_configurations(work)
    chosen: dict[str, list[str]] = {}
    for cfg in configurations:
        available = _folds_with_final(work, cfg)
        wanted = [str(f) for f in folds] if folds is not None else available
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise IncompleteStoreError(
                f"configuration {cfg!r} has no {CHECKPOINT_FINAL} for fold(s) {missing} in "
                f"{work.configuration_dir(cfg)}; finish training them or pass --folds."
            )
        if wanted:
            chosen[cfg] = wanted
    if not chosen:
        raise IncompleteStoreError(f"no trained fold found under {work.runs}; train first.")
    previous = _previous_stages(work, chosen)
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": MODEL_FORMAT, "configurations": list(chosen), "folds": chosen}
    if previous:
        manifest["previous_stages"] = previous
    tmp = out_zip.with_name(f".{out_zip.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(work.plans, work.plans.name)
        for cfg, fold_list in {**previous, **chosen}.items():
            src, dst = work.configuration(cfg), ConfigurationDir(cfg)  # dst: the same layout inside the zip
            for f in fold_list:
                zf.write(src.fold(f).checkpoint_final, dst.fold(f).checkpoint_final.as_posix())
            if src.postprocessing.is_file():
                zf.write(src.postprocessing, dst.postprocessing.as_posix())
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2))
    tmp.replace(out_zip)
    log.info("wrote model package %s (%s)", out_zip, ", ".join(f"{c}: folds {f}" for c, f in chosen.items()))
    return out_zip


def _previous_stages(work: Workspace, chosen: dict[str, list[str]]) -> dict[str, list[str]]:
    """First stages of the chosen cascade stages (not chosen themselves), with the same folds."""
    from voxflow.plan.schema import Plan

    plan = Plan.load(work.plans)
    out: dict[str, list[str]] = {}
    todo = list(chosen.items())
    while todo:
        cfg, folds = todo.pop()
        prev = plan.configurations[cfg].previous_stage if cfg in plan.configurations else None
        if prev is None or prev in chosen or prev in out:
            continue
        missing = sorted(set(folds) - set(_folds_with_final(work, prev)))
        if missing:
            raise IncompleteStoreError(
                f"the cascade stage {cfg!r} needs its first stage {prev!r} with the same folds; "
                f"{work.configuration_dir(prev)} has no {CHECKPOINT_FINAL} for fold(s) {missing}. Train them "
                f"(`voxflow train {work.root} -c {prev} -f K`)."
            )
        out[prev] = list(folds)
        todo.append((prev, folds))
    return out


def is_model_package(path: PathLikeStr) -> bool:
    p = Path(path)
    return p.is_file() and zipfile.is_zipfile(p)


def unpack_model(path: PathLikeStr, *, cache_dir: PathLikeStr | None = None) -> Path:
    """Unpack a model zip into a cache directory keyed by its content hash; return the directory."""
    path = Path(path)
    if not is_model_package(path):
        raise VoxflowError(f"{path} is not a voxflow model package (.zip written by `voxflow export-model`).")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "voxflow-models"
    target = root / digest
    if (target / MANIFEST).is_file():
        return target
    tmp = root / f".{digest}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if MANIFEST not in names:
            raise VoxflowError(f"{path} lacks {MANIFEST}; it was not written by `voxflow export-model`.")
        for n in names:
            if n.startswith("/") or ".." in Path(n).parts:
                raise VoxflowError(f"{path} holds an unsafe path {n!r}; refusing to unpack.")
        zf.extractall(tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    if manifest.get("format") != MODEL_FORMAT:
        raise VoxflowError(f"{path}: unknown model format {manifest.get('format')!r}; expected {MODEL_FORMAT!r}.")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def package_configurations(root: PathLikeStr) -> list[str]:
    """The configurations an unpacked model package (:func:`unpack_model`) holds."""
    return list(json.loads((Path(root) / MANIFEST).read_text())["configurations"])

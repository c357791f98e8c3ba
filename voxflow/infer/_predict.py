"""``predict``: resolve the models (trained folds, model packages, loaded networks, or any
:class:`~voxflow.infer.PredictionModel`), then run the case pipeline (:mod:`voxflow.infer._engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from voxflow._lock import dir_lock_file, locked
from voxflow.errors import VoxflowError
from voxflow.infer._engine import run_prediction
from voxflow.infer._models import CheckpointLoader, find_trained_folds, group_models
from voxflow.infer._options import PredictOptions, resolve_postprocessing
from voxflow.infer._protocols import ModelLoader, PredictionModel
from voxflow.store import Store

__all__ = ["PredictOptions", "predict"]


@dataclass(frozen=True)
class _Resolved:
    models: list[PredictionModel]
    loader: ModelLoader | None
    configuration_dirs: list[Path]  # where "auto" postprocessing is looked up


def _unpack_packages(
    dirs: Sequence[str | Path], configs: Sequence[str] | None
) -> tuple[list[str | Path], Sequence[str] | None]:
    """Replace model packages (``voxflow export-model`` zips) by their unpacked folders; the
    package's configurations become the default selection."""
    from voxflow.models import is_model_package, package_configurations, unpack_model

    out: list[str | Path] = []
    for d in dirs:
        if is_model_package(d):
            root = unpack_model(d)
            out.append(root)
            if configs is None:
                configs = package_configurations(root)
        else:
            out.append(d)
    return out, configs


def _resolve_models(
    model_dir: str | Path | Sequence[str | Path] | None,
    models: Sequence[Any] | None,
    configuration: str | Sequence[str] | None,
    folds: Sequence[int | str] | None,
    device: str,
) -> _Resolved:
    """Loaded models (``models``: triples or prediction models) or the folds found in ``model_dir``."""
    if models is not None:
        triples = [m for m in models if isinstance(m, tuple)]
        ready: list[PredictionModel] = [m for m in models if not isinstance(m, tuple)]
        return _Resolved([*group_models(triples), *ready], None, [])
    if model_dir is None:
        raise VoxflowError("predict needs model_dir (WORK/runs/<configuration>) or models; got neither.")
    dirs = [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
    configs = [configuration] if isinstance(configuration, str) else configuration
    dirs, configs = _unpack_packages(dirs, configs)
    runs = find_trained_folds(dirs, configurations=configs, folds=folds)
    loader = CheckpointLoader(tuple(r.path for r in runs))
    return _Resolved(list(loader(device)), loader, [r.configuration.path for r in runs])


@locked(lambda a: dir_lock_file(a["output"]), command="predict")
def predict(
    source: Store | str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    model_dir: str | Path | Sequence[str | Path] | None = None,
    models: Sequence[Any] | None = None,
    configuration: str | Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    case_ids: Sequence[str] | None = None,
    postprocessing: Any = "auto",
    options: PredictOptions | None = None,
    **option_values: Any,
) -> Store:
    """Segment every case of ``source`` and write ``output/prediction.zarr`` (+ files in ``output``).

    Parameters
    ----------
    source : a voxflow store (dataset or matching preprocessed store), a folder of images, or files
        (nnU-Net ``<case>_<channel:04d>`` names give multi-channel cases).
    output : output folder: the prediction store (kind "prediction"; per case ``label`` uint8 in the
        original geometry, and ``probs`` float16 (K, Z, Y, X) with ``save_probabilities``), exported
        ``<case><file_ending>`` label files and (while running) scratch data.
    model_dir : ``WORK/runs/<cfg>`` (or ``WORK/runs`` with ``configuration``, or a model package);
        one or several, whose configurations are ensembled. Alternatively ``models``: ``(network,
        Configuration, DatasetMeta)`` triples as returned by :func:`voxflow.models.load_model`, or
        prediction models (:class:`~voxflow.infer.PredictionModel`, e.g. an nnU-Net model's).
    folds : folds to ensemble (default: every ``fold_<k>`` with ``checkpoint_final.pt``).
    case_ids : the cases to predict (default: all of ``source``).
    postprocessing : ``"auto"`` applies the model dir's ``postprocessing.json`` (chosen by
        cross-validation; single configuration only), ``None`` disables it, or give a spec / path.
        With postprocessing, the plain argmax is kept as ``label_raw`` beside ``label``.
    options, **option_values : how to run (:class:`PredictOptions`; its fields are keywords here):
        ``step`` (sliding-window step as a fraction of the patch), ``tta`` (mirroring over the
        configuration's ``train.mirror_axes``), ``device`` (``cpu``, ``cuda``, ``cuda:1``; several --
        ``"cuda:0,cuda:1"``, a list, or ``cuda`` with several GPUs -- predict different cases in one
        process per device), ``save_probabilities``, ``batch_size``, ``cache_bytes`` (memory for
        partial accumulator blocks before they spill to a scratch file), ``amp``, ``progress``,
        ``scheduler``/``memory_limit`` (dask, see :mod:`voxflow.cluster`), ``export`` (label files),
        ``overwrite`` (redo complete cases; else they are skipped: resume).

    Memory is bounded by ``cache_bytes``, the patch and the store chunks, not by the volume; this
    fixes glibc's mmap threshold for the process (:func:`release_large_allocations`).
    """
    opts = PredictOptions.build(options, **option_values)
    resolved = _resolve_models(model_dir, models, configuration, folds, opts.devices()[0])
    opts = replace(opts, postprocessing=resolve_postprocessing(postprocessing, resolved.configuration_dirs))
    return run_prediction(source, output, resolved.models, opts, loader=resolved.loader, case_ids=case_ids)

"""One case through crop -> normalise -> resample, as a lazy graph (no I/O, no compute)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from voxflow.errors import VoxflowError
from voxflow.geometry import Geometry
from voxflow.plan.schema import Configuration
from voxflow.preprocess._crop import BBox, crop, nonzero_bbox
from voxflow.preprocess._foreground import foreground_index
from voxflow.preprocess._normalize import normalize
from voxflow.preprocess._resample import resample_label_to_shape, resample_to_shape

__all__ = ["PreprocessedCase", "preprocess_case", "preprocessed_chunks", "target_shape"]


@dataclass(frozen=True)
class PreprocessedCase:
    """The lazy result of :func:`preprocess_case` plus everything needed to undo it.

    ``image`` (C, Z, Y, X) float32 and ``label`` (Z, Y, X) uint8 live on ``geometry`` (the target
    grid). ``crop_bbox_zyx`` is the ``[lo, hi)`` voxel box of the original grid that was kept and
    ``shape_after_crop_zyx`` its shape: inference resamples back to that shape with
    :func:`~voxflow.preprocess.resample_to_shape` and pads into ``original_geometry``.
    ``fg_index`` is a delayed ``(index (N, 4) int32, classes_present)`` (see ``foreground_index``).
    """

    image: da.Array
    label: da.Array | None
    geometry: Geometry
    original_geometry: Geometry
    crop_bbox_zyx: BBox
    shape_after_crop_zyx: tuple[int, int, int]
    fg_index: Delayed | None = None

    def attrs(self) -> dict[str, Any]:
        """JSON attributes for the preprocessed store's case block."""
        return {
            "original_geometry": self.original_geometry.to_dict(),
            "crop_bbox_zyx": [list(b) for b in self.crop_bbox_zyx],
            "shape_after_crop_zyx": list(self.shape_after_crop_zyx),
        }


def target_shape(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], config: Configuration) -> tuple[int, int, int]:
    """Grid shape at the configuration's spacing: ``round(shape * spacing / target)`` (>= 1).

    A 2D configuration keeps the z axis as it is (slices are never resampled across).
    """
    target = list(config.spacing_zyx)
    if config.is_2d:
        target[0] = spacing_zyx[0]
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_zyx, spacing_zyx, target, strict=True))  # type: ignore[return-value]


def preprocessed_chunks(config: Configuration, shape_zyx: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Chunks of the preprocessed arrays: half the patch size per axis (the sampler reads ~8 per patch)."""
    chunks = tuple(max(1, p // 2) for p in config.patch_size_vox)
    if shape_zyx is not None:
        chunks = tuple(min(c, int(s)) for c, s in zip(chunks, shape_zyx, strict=True))
    return chunks  # type: ignore[return-value]


def _resampled_geometry(cropped: Geometry, out_shape: Sequence[int]) -> Geometry:
    ratio = np.asarray(cropped.shape_zyx, dtype=float) / np.asarray(out_shape, dtype=float)
    spacing = tuple(float(s) for s in np.asarray(cropped.spacing_zyx) * ratio)
    origin = tuple(float(v) for v in cropped.index_to_physical(0.5 * ratio - 0.5))
    return cropped.with_shape(out_shape, spacing_zyx=spacing, origin_zyx=origin)


def preprocess_case(
    image: da.Array,
    geometry: Geometry,
    config: Configuration,
    *,
    label: da.Array | None = None,
    seed: int = 0,
    bbox_zyx: BBox | None = None,
    label_values: Sequence[int] | None = None,
    out_chunks: Sequence[int] | None = None,
    max_fg_per_class: int = 10_000,
    case_id: str | None = None,
) -> PreprocessedCase:
    """Crop to the nonzero box, normalise per channel and resample to ``config.spacing_zyx``, lazily.

    ``image`` is (C, Z, Y, X) on ``geometry``; ``label`` (Z, Y, X) on the same grid. The crop box
    is data-dependent: pass ``bbox_zyx`` (``run_preprocess`` computes all boxes in one cheap
    reduction) or it is computed here from ``image`` (one read). Likewise ``label_values``
    (default: the values found in ``label``). Images are resampled with
    ``config.resampling.image_order``, labels one-hot with ``label_order`` (argmax); the coarse
    axis with ``separate_order`` when ``separate_z`` is set.
    """
    where = f" for case {case_id!r}" if case_id else ""
    if image.ndim != 4 or tuple(image.shape[1:]) != geometry.shape_zyx:
        raise VoxflowError(
            f"image must be (C, Z, Y, X) with (Z, Y, X) = geometry {geometry.shape_zyx}; got {image.shape}{where}"
        )
    if label is not None and tuple(label.shape) != geometry.shape_zyx:
        raise VoxflowError(f"label shape must equal the image grid {geometry.shape_zyx}; got {label.shape}{where}")
    if image.shape[0] != config.n_channels:
        raise VoxflowError(
            f"the plan expects {config.n_channels} channels; got {image.shape[0]}{where}. "
            f"Check that plans.json belongs to this dataset."
        )
    bbox = nonzero_bbox(image) if bbox_zyx is None else tuple(tuple(int(v) for v in b) for b in bbox_zyx)
    cropped_geom = geometry.cropped(bbox)
    shape_crop = cropped_geom.shape_zyx
    out_shape = target_shape(shape_crop, geometry.spacing_zyx, config)
    chunks = tuple(out_chunks) if out_chunks is not None else preprocessed_chunks(config, out_shape)
    res = config.resampling
    sep = res.separate_axis if res.separate_z else None
    img = normalize(crop(image, bbox), config.normalization)  # type: ignore[arg-type]
    img = resample_to_shape(
        img, out_shape, order=res.image_order, separate_axis=sep, separate_order=res.separate_order, out_chunks=chunks
    )
    img = img.rechunk({0: img.shape[0]})
    lab = fg = None
    if label is not None:
        lab = crop(label, bbox)  # type: ignore[arg-type]
        values = list(label_values) if label_values is not None else [int(v) for v in dask.compute(da.unique(lab))[0]]
        if max(values, default=0) > 255:
            raise VoxflowError(f"label values must fit uint8 (<= 255); got max {max(values)}{where}")
        lab = resample_label_to_shape(
            lab,
            out_shape,
            values=sorted(set(values) | {0}),
            order=res.label_order,
            separate_axis=sep,
            separate_order=res.separate_order,
            out_chunks=chunks,
        ).astype(np.uint8)
        fg = foreground_index(lab, max_per_class=max_fg_per_class, seed=seed)
    return PreprocessedCase(
        image=img,
        label=lab,
        geometry=_resampled_geometry(cropped_geom, out_shape),
        original_geometry=geometry,
        crop_bbox_zyx=bbox,  # type: ignore[arg-type]
        shape_after_crop_zyx=shape_crop,  # type: ignore[arg-type]
        fg_index=fg,
    )

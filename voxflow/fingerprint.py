"""Dataset fingerprint: the measurements the planner derives every hyper-parameter from.

:func:`compute_fingerprint` builds **one** lazy Dask graph over a dataset store and computes it
once (:func:`voxflow.cluster.compute`, with a progress bar, on whatever scheduler is active):

* per chunk (one task reads one spatial block of the image, all channels, and the matching block
  of the label): the bounding box of the nonzero voxels (any channel), the label value counts
  (``np.bincount``), the number of foreground (label > 0) voxels and a seeded random sample of at
  most ``samples_per_case`` of their intensities. The generator is seeded by
  ``(seed, crc32(case_id), block index)``, so the result does not depend on the scheduler, the
  worker or the order tasks run in;
* per case (one small task over the chunk results): the union of the chunk boxes, summed counts,
  and the case sample: ``min(samples_per_case, n_foreground)`` values drawn from the chunk samples
  in proportion to each chunk's foreground count (largest-remainder allocation, ties by block
  order; each chunk sample is in random order, so its prefix is a uniform sample of the chunk);
* optionally per case, when the case is small (``components_max_voxels``), the number of
  6-connected components per class with ``scipy.ndimage.label``.

Memory stays at about one chunk per running task plus ``samples_per_case`` values per chunk.
Dataset-level statistics (intensity mean/std/median/min/max and 0.5/99.5 percentiles from the
pooled foreground samples, as nnU-Net does; median and 10th/90th percentiles of spacing and shape)
are computed from those small per-case results. A channel with a generic name (``image``) whose
integer voxels span the Hounsfield range gets a :class:`~voxflow.errors.VoxflowWarning` (name it
``CT`` for CT normalisation). The result is a :class:`Fingerprint`, a frozen
dataclass that round-trips through JSON (:meth:`Fingerprint.save` / :meth:`Fingerprint.load`).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

from voxflow import _serial
from voxflow._types import PathLikeStr
from voxflow.errors import PlanError, VoxflowWarning
from voxflow.store import Store

__all__ = [
    "FINGERPRINT_VERSION",
    "AxisStats",
    "CaseFingerprint",
    "ClassStats",
    "Fingerprint",
    "IntensityStats",
    "compute_fingerprint",
    "fingerprint_graph",
    "intensity_stats",
]

log = logging.getLogger(__name__)
FINGERPRINT_VERSION = 1
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# ---------------------------------------------------------------------------------------- schema
def _triple(value: Any, name: str, cast: type) -> tuple[Any, Any, Any]:
    return _serial.number_tuple(value, name, cast=cast, length=3, axes="(z, y, x)")


@dataclass(frozen=True, kw_only=True)
class CaseFingerprint:
    """Measurements of one case; boxes are ``[lo, hi)`` voxel ranges per axis (z, y, x)."""

    case_id: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    source_ndim: int = 3
    nonzero_bbox_zyx: Box
    shape_after_crop_zyx: tuple[int, int, int]
    fraction_kept_by_crop: float
    labelled: bool = True
    n_foreground_voxels: int = 0
    class_voxel_counts: dict[int, int] = field(default_factory=dict)
    n_components: dict[int, int] | None = None

    def __post_init__(self) -> None:
        s = _serial.set_field
        s(self, "shape_zyx", _triple(self.shape_zyx, "shape_zyx", int))
        s(self, "spacing_zyx", _triple(self.spacing_zyx, "spacing_zyx", float))
        s(self, "shape_after_crop_zyx", _triple(self.shape_after_crop_zyx, "shape_after_crop_zyx", int))
        box = tuple(tuple(int(v) for v in b) for b in self.nonzero_bbox_zyx)
        if len(box) != 3 or any(
            len(b) != 2 or not 0 <= b[0] < b[1] <= n for b, n in zip(box, self.shape_zyx, strict=True)
        ):
            raise PlanError(
                f"nonzero_bbox_zyx must be 3 [lo, hi) ranges inside shape_zyx {self.shape_zyx}; "
                f"got {self.nonzero_bbox_zyx!r} for case {self.case_id!r}"
            )
        s(self, "nonzero_bbox_zyx", box)
        s(self, "class_voxel_counts", {int(k): int(v) for k, v in dict(self.class_voxel_counts).items()})
        if self.n_components is not None:
            s(self, "n_components", {int(k): int(v) for k, v in dict(self.n_components).items()})
        if not 0.0 < float(self.fraction_kept_by_crop) <= 1.0:
            raise PlanError(
                f"fraction_kept_by_crop must be in (0, 1]; got {self.fraction_kept_by_crop!r} for case {self.case_id!r}"
            )
        if any(v <= 0 for v in self.spacing_zyx) or any(v <= 0 for v in self.shape_zyx):
            raise PlanError(
                f"shape_zyx and spacing_zyx must be positive; got {self.shape_zyx} and "
                f"{self.spacing_zyx} for case {self.case_id!r}"
            )


@dataclass(frozen=True, kw_only=True)
class IntensityStats:
    """Foreground intensity statistics of one channel from the pooled per-case samples (``None``
    when the dataset has no foreground voxel)."""

    channel: str
    n_samples: int
    mean: float | None = None
    std: float | None = None
    median: float | None = None
    min: float | None = None
    max: float | None = None
    percentile_00_5: float | None = None
    percentile_99_5: float | None = None


@dataclass(frozen=True, kw_only=True)
class ClassStats:
    """One label value: its name, voxel count over the dataset and how many cases contain it."""

    value: int
    name: str
    voxel_count: int
    n_cases: int


@dataclass(frozen=True, kw_only=True)
class AxisStats:
    """Median and 10th/90th percentiles over cases of a per-axis quantity (z, y, x)."""

    median_zyx: tuple[float, float, float]
    p10_zyx: tuple[float, float, float]
    p90_zyx: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("median_zyx", "p10_zyx", "p90_zyx"):
            _serial.set_field(self, name, _triple(getattr(self, name), name, float))

    @classmethod
    def of(cls, values: np.ndarray) -> AxisStats:
        v = np.asarray(values, dtype=np.float64).reshape(-1, 3)
        return cls(
            median_zyx=tuple(np.median(v, axis=0)),
            p10_zyx=tuple(np.percentile(v, 10, axis=0)),
            p90_zyx=tuple(np.percentile(v, 90, axis=0)),
        )


@dataclass(frozen=True, kw_only=True)
class Fingerprint:
    """Everything measured about a dataset store (see the module docstring)."""

    fingerprint_version: int = FINGERPRINT_VERSION
    dataset_name: str = ""
    channel_names: tuple[str, ...]
    labels: dict[str, Any]
    regions_class_order: tuple[int, ...] | None = None
    samples_per_case: int
    seed: int
    cases: tuple[CaseFingerprint, ...]
    intensity: tuple[IntensityStats, ...]
    classes: tuple[ClassStats, ...]
    spacing: AxisStats
    shape: AxisStats
    shape_after_crop: AxisStats

    def __post_init__(self) -> None:
        s = _serial.set_field
        if self.fingerprint_version != FINGERPRINT_VERSION:
            raise PlanError(
                f"fingerprint_version must be {FINGERPRINT_VERSION}; got {self.fingerprint_version!r}. "
                f"Re-run `voxflow fingerprint`."
            )
        s(self, "channel_names", tuple(str(c) for c in self.channel_names))
        if self.regions_class_order is not None:
            s(self, "regions_class_order", tuple(int(v) for v in self.regions_class_order))
        for name, cls in (("cases", CaseFingerprint), ("intensity", IntensityStats), ("classes", ClassStats)):
            s(self, name, tuple(_serial.coerce(cls, c, f"{name}[{i}]") for i, c in enumerate(getattr(self, name))))
        for name in ("spacing", "shape", "shape_after_crop"):
            s(self, name, _serial.coerce(AxisStats, getattr(self, name), name))
        if not self.cases:
            raise PlanError("cases must not be empty: a fingerprint needs at least one complete case")
        if len(self.intensity) != len(self.channel_names):
            raise PlanError(
                f"intensity must have one entry per channel ({len(self.channel_names)}); got {len(self.intensity)}"
            )

    # -------------------------------------------------------------- derived views
    @property
    def n_cases(self) -> int:
        return len(self.cases)

    @property
    def is_2d(self) -> bool:
        """True when every case is a single slice (a 2D dataset)."""
        return all(c.source_ndim == 2 or c.shape_zyx[0] == 1 for c in self.cases)

    @property
    def spacings(self) -> np.ndarray:
        """(n_cases, 3) spacings in mm, (z, y, x)."""
        return np.array([c.spacing_zyx for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        """(n_cases, 3) shapes after cropping to the nonzero box, (z, y, x)."""
        return np.array([c.shape_after_crop_zyx for c in self.cases], dtype=np.float64)

    @property
    def median_fraction_kept_by_crop(self) -> float:
        return float(np.median([c.fraction_kept_by_crop for c in self.cases]))

    # -------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return _serial.to_jsonable(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        return _serial.from_dict(cls, data, "fingerprint")

    def save(self, path: PathLikeStr) -> None:
        _serial.atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLikeStr) -> Fingerprint:
        return _serial.load_json_file(path, cls.from_dict, what="fingerprint", command="voxflow fingerprint")


# ---------------------------------------------------------------------------------------- graph
def _block_seed(seed: int, case_id: str, block_index: Sequence[int]) -> np.random.SeedSequence:
    """Seed of one chunk's sampler: independent of scheduler, worker and process (no ``hash()``)."""
    return np.random.SeedSequence([int(seed), zlib.crc32(case_id.encode()), *(int(i) for i in block_index)])


def chunk_statistics(
    image: np.ndarray,
    label: np.ndarray | None,
    *,
    offset_zyx: Sequence[int],
    max_samples: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Statistics of one block: nonzero box (global voxel indices), label counts, fg sample.

    ``image`` is (C, z, y, x), ``label`` (z, y, x) or ``None``. The sample is ``min(max_samples,
    n_fg)`` foreground voxels in random order, as a (C, k) float64 array.
    """
    nonzero = np.any(image != 0, axis=0)
    box = None
    if nonzero.any():
        box = []
        for ax in range(3):
            hit = np.flatnonzero(np.any(nonzero, axis=tuple(a for a in range(3) if a != ax)))
            box.append((int(offset_zyx[ax] + hit[0]), int(offset_zyx[ax] + hit[-1] + 1)))
    n_channels = image.shape[0]
    flat = image.reshape(n_channels, -1)
    value_range = np.stack([flat.min(axis=1), flat.max(axis=1)], axis=1).astype(np.float64)  # (C, 2)
    if label is None:
        return {"box": box, "counts": {}, "n_fg": 0, "samples": np.empty((n_channels, 0)), "range": value_range}
    counts = np.bincount(label.ravel().astype(np.int64, copy=False))
    fg_index = np.flatnonzero(label.ravel() > 0)
    n_fg = int(fg_index.size)
    k = min(n_fg, int(max_samples))
    pick = rng.choice(n_fg, size=k, replace=False) if k < n_fg else rng.permutation(n_fg)
    samples = image.reshape(n_channels, -1)[:, fg_index[pick]].astype(np.float64)
    return {
        "box": box,
        "counts": {int(v): int(c) for v, c in enumerate(counts) if c},
        "n_fg": n_fg,
        "samples": samples,
        "range": value_range,
    }


def allocate_samples(counts: Sequence[int], total: int) -> np.ndarray:
    """Split ``min(total, sum(counts))`` draws over strata in proportion to ``counts``.

    Largest-remainder rounding, ties broken by position; never more than ``counts[i]`` per stratum.
    """
    n = np.asarray(counts, dtype=np.int64)
    n_all = int(n.sum())
    if n_all <= total:
        return n.copy()
    exact = n * total / n_all
    quota = np.floor(exact).astype(np.int64)
    rest = total - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:rest]] += 1
    return np.minimum(quota, n)


def _chunk_task(
    image: np.ndarray,
    label: np.ndarray | None,
    *,
    offset_zyx: tuple[int, ...],
    block_index: tuple[int, ...],
    case_id: str,
    seed: int,
    max_samples: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(_block_seed(seed, case_id, block_index))
    return chunk_statistics(image, label, offset_zyx=offset_zyx, max_samples=max_samples, rng=rng)


def _case_task(
    chunks: list[dict[str, Any]],
    *,
    shape_zyx: tuple[int, int, int],
    samples_per_case: int,
    n_channels: int,
    components: dict[int, int] | None,
) -> dict[str, Any]:
    boxes = [c["box"] for c in chunks if c["box"] is not None]
    if boxes:
        box = tuple((min(b[ax][0] for b in boxes), max(b[ax][1] for b in boxes)) for ax in range(3))
    else:  # an all-zero image: nothing to crop away
        box = tuple((0, n) for n in shape_zyx)
    counts: dict[int, int] = {}
    for c in chunks:
        for v, n in c["counts"].items():
            counts[v] = counts.get(v, 0) + n
    quota = allocate_samples([c["n_fg"] for c in chunks], samples_per_case)
    parts = [c["samples"][:, :q] for c, q in zip(chunks, quota, strict=True)]
    samples = np.concatenate(parts, axis=1) if parts else np.empty((n_channels, 0))
    counts = dict(sorted(counts.items()))
    ranges = np.stack([c["range"] for c in chunks]) if chunks else np.zeros((0, n_channels, 2))
    value_range = np.stack([ranges[..., 0].min(axis=0), ranges[..., 1].max(axis=0)], axis=1) if chunks else None
    return {
        "box": box,
        "counts": counts,
        "n_fg": int(sum(c["n_fg"] for c in chunks)),
        "samples": samples,
        "components": components,
        "range": value_range,
    }


def count_components(label: np.ndarray, values: Sequence[int]) -> dict[int, int]:
    """Number of 6-connected components of each label value (scipy, whole array)."""
    from scipy import ndimage

    return {int(v): int(ndimage.label(label == v)[1]) for v in values}


def _spatial_blocks(image: da.Array, label: da.Array | None) -> tuple[da.Array, da.Array | None]:
    """Image with all channels in one chunk, label chunked like the image's spatial grid."""
    image = image.rechunk({0: image.shape[0]})
    if label is not None:
        label = label.rechunk(image.chunks[1:])
    return image, label


def fingerprint_graph(
    store: Store, *, samples_per_case: int = 10_000, seed: int = 0, components_max_voxels: int = 2**22
) -> dict[str, Any]:
    """The lazy per-case results ``{case_id: Delayed dict}`` (chunk tasks reduced per case).

    Computing it touches every chunk once; nothing is computed while building it.
    """
    if samples_per_case < 1:
        raise PlanError(f"samples_per_case must be >= 1; got {samples_per_case!r}")
    values = [v for v in store.meta.label_values if v > 0]
    out: dict[str, Any] = {}
    for case_id in store.case_ids():
        image, label = _spatial_blocks(store.image(case_id), store.label(case_id))
        offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in image.chunks[1:]]
        img_blocks = image.to_delayed()[0]
        lab_blocks = label.to_delayed() if label is not None else None
        chunk_results = []
        for idx in np.ndindex(*img_blocks.shape):
            off = tuple(int(offsets[ax][i]) for ax, i in enumerate(idx))
            lab = lab_blocks[idx] if lab_blocks is not None else None
            chunk_results.append(
                dask.delayed(_chunk_task, pure=True)(
                    img_blocks[idx],
                    lab,
                    offset_zyx=off,
                    block_index=idx,
                    case_id=case_id,
                    seed=seed,
                    max_samples=samples_per_case,
                )
            )
        components = None
        if label is not None and components_max_voxels and math.prod(label.shape) <= components_max_voxels:
            components = dask.delayed(count_components, pure=True)(label, values)
        out[case_id] = dask.delayed(_case_task, pure=True)(
            chunk_results,
            shape_zyx=tuple(image.shape[1:]),
            samples_per_case=samples_per_case,
            n_channels=image.shape[0],
            components=components,
        )
    return out


# ---------------------------------------------------------------------------------------- assembly
def intensity_stats(channel: str, samples: np.ndarray) -> IntensityStats:
    """nnU-Net's foreground intensity properties of one channel from pooled samples."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return IntensityStats(channel=channel, n_samples=0)
    lo, hi = np.percentile(x, [0.5, 99.5])
    return IntensityStats(
        channel=channel,
        n_samples=int(x.size),
        mean=float(x.mean()),
        std=float(x.std()),
        median=float(np.median(x)),
        min=float(x.min()),
        max=float(x.max()),
        percentile_00_5=float(lo),
        percentile_99_5=float(hi),
    )


_GENERIC_CHANNEL = re.compile(r"(image|img|channel|ch|input|data|volume)?[_ -]?\d*", re.IGNORECASE)


def warn_if_unnamed_ct(store: Store, results: Mapping[str, dict[str, Any]]) -> None:
    """Warn (VoxflowWarning) for a channel with a generic name (``image``, ``channel_0``, ...) whose
    voxels look like CT: integer values from about -1024 HU (air) up into bone. Named ``CT`` it would
    get CT normalisation; z-scored per image it loses the meaning of Hounsfield units."""
    names = store.meta.channel_names
    for i, name in enumerate(names):
        if not _GENERIC_CHANNEL.fullmatch(name):
            continue
        ranges = [r["range"][i] for r in results.values() if r.get("range") is not None]
        ids = [cid for cid, r in results.items() if r.get("range") is not None]
        if not ranges or any(store.zarr_array(c, "image").dtype.kind != "i" for c in ids):
            continue
        lo, hi = min(float(r[0]) for r in ranges), max(float(r[1]) for r in ranges)
        if -3100 <= lo <= -900 and hi >= 300:
            new = [("CT" if j == i else n) for j, n in enumerate(names)]
            warnings.warn(
                VoxflowWarning(
                    f"channel {i} is named {name!r} but looks like CT (integer values from {lo:.0f} to {hi:.0f}, Hounsfield "
                    f"units); it will be z-scored per image instead of CT normalisation. If it is CT, reconvert with "
                    f"`voxflow convert --channel-names {','.join(new)}` (or set channel_names in dataset.json)."
                ),
                stacklevel=3,
            )


def _class_names(labels: Mapping[str, Any]) -> dict[int, str]:
    return {int(v): k for k, v in labels.items() if not isinstance(v, (list, tuple))}


def assemble_fingerprint(
    store: Store, results: Mapping[str, dict[str, Any]], *, samples_per_case: int, seed: int
) -> Fingerprint:
    """Build the :class:`Fingerprint` from computed per-case results (pure, small data)."""
    meta = store.meta
    warn_if_unnamed_ct(store, results)
    cases = []
    for case_id, r in results.items():
        geom = store.geometry(case_id)
        crop = tuple(hi - lo for lo, hi in r["box"])
        cases.append(
            CaseFingerprint(
                case_id=case_id,
                shape_zyx=geom.shape_zyx,
                spacing_zyx=geom.spacing_zyx,
                source_ndim=geom.source_ndim,
                nonzero_bbox_zyx=r["box"],
                shape_after_crop_zyx=crop,
                fraction_kept_by_crop=math.prod(crop) / math.prod(geom.shape_zyx),
                labelled=store.has_array(case_id, "label"),
                n_foreground_voxels=r["n_fg"],
                class_voxel_counts=r["counts"],
                n_components=r["components"],
            )
        )
    n_ch = len(meta.channel_names)
    pooled = np.concatenate([r["samples"] for r in results.values()], axis=1) if results else np.empty((n_ch, 0))
    names = _class_names(meta.labels)
    seen = sorted(set(names) | {v for c in cases for v in c.class_voxel_counts})
    classes = tuple(
        ClassStats(
            value=v,
            name=names.get(v, f"value_{v}"),
            voxel_count=sum(c.class_voxel_counts.get(v, 0) for c in cases),
            n_cases=sum(1 for c in cases if c.class_voxel_counts.get(v, 0) > 0),
        )
        for v in seen
    )
    return Fingerprint(
        dataset_name=meta.name,
        channel_names=meta.channel_names,
        labels=dict(meta.labels),
        regions_class_order=meta.regions_class_order,
        samples_per_case=samples_per_case,
        seed=seed,
        cases=tuple(cases),
        intensity=tuple(intensity_stats(ch, pooled[i]) for i, ch in enumerate(meta.channel_names)),
        classes=classes,
        spacing=AxisStats.of(np.array([c.spacing_zyx for c in cases])),
        shape=AxisStats.of(np.array([c.shape_zyx for c in cases])),
        shape_after_crop=AxisStats.of(np.array([c.shape_after_crop_zyx for c in cases])),
    )


def compute_fingerprint(
    store: Store | PathLikeStr,
    *,
    samples_per_case: int = 10_000,
    seed: int = 0,
    components_max_voxels: int = 2**22,
    progress: bool = True,
) -> Fingerprint:
    """Fingerprint a dataset store with one ``dask.compute`` on the active scheduler.

    Parameters
    ----------
    store
        A dataset :class:`~voxflow.store.Store` or its path; only complete cases are measured.
    samples_per_case
        Foreground voxels sampled per case for the intensity statistics (nnU-Net: 10 000).
    seed
        Sampling seed; the same seed gives the same fingerprint on any scheduler.
    components_max_voxels
        Count connected components per class for cases with at most this many voxels (whole-case
        task with scipy); 0 disables.
    """
    from voxflow.cluster import compute

    st = store if isinstance(store, Store) else Store.open(store)
    if not st.case_ids():
        raise PlanError(f"{st.path} holds no complete case to fingerprint; run `voxflow convert` first.")
    graph = fingerprint_graph(
        st, samples_per_case=samples_per_case, seed=seed, components_max_voxels=components_max_voxels
    )
    computed = compute(*graph.values(), desc="fingerprint", progress=progress)
    results = dict(zip(graph, computed, strict=True))
    log.info("fingerprinted %d cases of %s", len(results), st.path)
    return assemble_fingerprint(st, results, samples_per_case=samples_per_case, seed=seed)

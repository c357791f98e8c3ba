"""Fixtures for the data tests: small preprocessed stores written directly with voxflow.store."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from voxflow.geometry import Geometry
from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec, TrainSpec
from voxflow.store import DatasetMeta, Store

Case = tuple[np.ndarray, np.ndarray | None]


def write_preprocessed_store(
    path: Path,
    cases: Mapping[str, Case],
    *,
    chunks_zyx: Sequence[int] = (7, 6, 5),
    fg_index: bool = True,
    labels: Mapping[str, int] | None = None,
) -> Store:
    """A store laid out like `voxflow preprocess` output: image float32 (C,Z,Y,X), label uint8,
    fg_index int32 (N, 4) with every foreground voxel, classes_present in the case attrs."""
    n_channels = next(iter(cases.values()))[0].shape[0]
    meta = DatasetMeta(
        channel_names=tuple(f"ch{i}" for i in range(n_channels)),
        labels=dict(labels or {"background": 0, "a": 1, "b": 2, "c": 3}),
        kind="preprocessed",
        extra={"configuration": "3d_fullres"},
    )
    store = Store.create(path, meta)
    for cid, (image, label) in cases.items():
        store.begin_case(cid, geometry=Geometry(shape_zyx=image.shape[1:], spacing_zyx=(1.0, 1.0, 1.0)))
        arr = store.create_array(cid, "image", shape=image.shape, dtype="float32", chunks=(1, *chunks_zyx))
        arr[...] = image.astype(np.float32)
        if label is not None:
            lab = store.create_array(cid, "label", shape=label.shape, dtype="uint8", chunks=chunks_zyx)
            lab[...] = label
            present = sorted(int(v) for v in np.unique(label))
            if fg_index:
                rows = np.concatenate(
                    [np.c_[np.full(int((label == k).sum()), k), np.argwhere(label == k)] for k in present if k != 0]
                    or [np.zeros((0, 4), int)]
                ).astype(np.int32)
                fg = store.create_array(
                    cid,
                    "fg_index",
                    shape=rows.shape,
                    dtype="int32",
                    chunks=(max(len(rows), 1), 4),
                    dimension_names=("n", "k"),
                )
                if len(rows):
                    fg[...] = rows
            store.update_case_attrs(cid, classes_present=present)
        store.mark_complete(cid)
    return store


def make_config(
    patch: Sequence[int] = (8, 8, 8),
    *,
    batch_size: int = 2,
    n_channels: int = 1,
    oversample: float = 1 / 3,
    mirror_axes: Sequence[int] = (0, 1, 2),
    val_iters: int = 3,
) -> Configuration:
    """A small valid Configuration (2D when ``patch[0] == 1``)."""
    is_2d = patch[0] == 1
    k = (3, 3) if is_2d else (3, 3, 3)
    net = NetworkSpec(
        spatial_dims=2 if is_2d else 3,
        n_stages=2,
        features_per_stage=(4, 8),
        kernel_sizes=(k, k),
        strides=(tuple(1 for _ in k), tuple(2 for _ in k)),
        n_blocks_per_stage=(1, 1),
        n_conv_per_stage_decoder=(1,),
    )
    return Configuration(
        name="2d" if is_2d else "3d_fullres",
        spacing_zyx=(1.0, 1.0, 1.0),
        median_shape_vox=(16, 16, 16),
        patch_size_vox=tuple(patch),
        batch_size=batch_size,
        normalization=tuple(ChannelNormalization(scheme="zscore") for _ in range(n_channels)),
        resampling=ResamplingSpec(),
        network=net,
        train=TrainSpec(oversample_foreground=oversample, mirror_axes=tuple(mirror_axes), val_iters=val_iters),
    )


def blob_case(shape: Sequence[int], rng: np.random.Generator, *, n_channels: int = 1) -> Case:
    """Random image, label with a box of class 1 and a single voxel of class 2."""
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:7, 1:5] = 1
    label[shape[0] - 2, shape[1] - 3, shape[2] - 2] = 2
    image = rng.normal(size=(n_channels, *shape)).astype(np.float32) + label
    return image, label


@pytest.fixture
def preprocessed_store(tmp_path: Path, rng: np.random.Generator) -> Callable[..., Store]:
    def make(cases: Mapping[str, Case] | None = None, **kw: object) -> Store:
        if cases is None:
            cases = {"c0": blob_case((20, 18, 16), rng), "c1": blob_case((13, 21, 11), rng)}
        return write_preprocessed_store(tmp_path / "pre.zarr", cases, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def config_factory() -> Callable[..., Configuration]:
    return make_config

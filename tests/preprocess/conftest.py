"""Fixtures for the preprocessing tests: a small plan configuration and a tiny dataset store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from voxflow.geometry import Geometry
from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, Plan, ResamplingSpec
from voxflow.store import DatasetMeta, Store


def make_config(
    *,
    spacing_zyx=(2.0, 1.0, 1.0),
    patch=(16, 16, 16),
    norms=None,
    resampling=None,
    name: str = "3d_fullres",
    network: NetworkSpec | None = None,
) -> Configuration:
    net = network or NetworkSpec(
        n_stages=2,
        features_per_stage=(4, 8),
        kernel_sizes=((3, 3, 3), (3, 3, 3)),
        strides=((1, 1, 1), (2, 2, 2)),
        n_blocks_per_stage=(1, 1),
        n_conv_per_stage_decoder=(1,),
    )
    return Configuration(
        name=name,
        spacing_zyx=spacing_zyx,
        median_shape_vox=(10, 10, 10),
        patch_size_vox=patch,
        batch_size=2,
        normalization=tuple(norms or (ChannelNormalization(scheme="zscore", use_mask=True),)),
        resampling=resampling or ResamplingSpec(image_order=3, label_order=1),
        network=net,
    )


def make_plan(config: Configuration, channels=("MR",)) -> Plan:
    return Plan(
        channel_names=tuple(channels), labels={"background": 0, "a": 1, "b": 2}, configurations={config.name: config}
    )


def write_store(
    path: Path, cases: dict[str, tuple[np.ndarray, np.ndarray | None, Geometry]], channels=("MR",), chunks=(7, 9, 8)
) -> Store:
    meta = DatasetMeta(channel_names=channels, labels={"background": 0, "a": 1, "b": 2})
    store = Store.create(path, meta)
    for cid, (image, label, geom) in cases.items():
        store.begin_case(cid, geometry=geom)
        arr = store.create_array(cid, "image", shape=image.shape, dtype=image.dtype, chunks=(1, *chunks))
        arr[...] = image
        if label is not None:
            lab = store.create_array(cid, "label", shape=label.shape, dtype=np.uint8, chunks=chunks)
            lab[...] = label
        store.mark_complete(cid)
    return store


def small_case(
    rng: np.random.Generator, shape=(14, 26, 23), spacing=(3.0, 0.8, 1.1), pad=2, n_channels=1
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    from voxflow.testing import synthetic_case

    inner = tuple(s - 2 * pad for s in shape)
    img_i, lab_i = synthetic_case(inner, n_labels=2, rng=rng, n_channels=n_channels)
    image = np.zeros((n_channels, *shape), np.float32)
    label = np.zeros(shape, np.uint8)
    sl = tuple(slice(pad, pad + n) for n in inner)
    image[(slice(None), *sl)] = img_i + 100.0
    label[sl] = lab_i
    return image, label, Geometry(shape_zyx=shape, spacing_zyx=spacing, origin_zyx=(5.0, -3.0, 2.0))


@pytest.fixture
def small_store(tmp_path: Path, rng: np.random.Generator) -> Callable[..., Store]:
    def _make(n_cases: int = 2, **kw: Any) -> Store:
        cases = {}
        for i in range(n_cases):
            image, label, geom = small_case(rng, **kw)
            cases[f"case_{i:03d}"] = (image, label, geom)
        return write_store(tmp_path / "dataset.zarr", cases)

    return _make


@pytest.fixture
def helpers() -> Any:
    """The module's helper functions, for tests (importlib mode cannot import conftest)."""
    import types

    return types.SimpleNamespace(
        make_config=make_config, make_plan=make_plan, write_store=write_store, small_case=small_case
    )

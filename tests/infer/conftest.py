"""Fixtures for inference tests: a tiny plan configuration, small networks, a tiny dataset store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from voxflow.geometry import Geometry
from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec, TrainSpec
from voxflow.store import DatasetMeta, Store
from voxflow.testing import synthetic_case


def _make_config(
    patch: tuple[int, int, int] = (8, 16, 16),
    *,
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    name: str = "3d_fullres",
    mirror_axes: tuple[int, ...] = (0, 1, 2),
    n_stages: int = 2,
    scheme: str = "zscore",
) -> Configuration:
    spec = NetworkSpec(
        n_stages=n_stages,
        features_per_stage=(4, 8)[:n_stages],
        kernel_sizes=((3, 3, 3),) * n_stages,
        strides=((1, 1, 1), (2, 2, 2))[:n_stages],
        n_blocks_per_stage=(1,) * n_stages,
        n_conv_per_stage_decoder=(1,) * (n_stages - 1),
    )
    return Configuration(
        name=name,
        spacing_zyx=spacing,
        median_shape_vox=(10, 20, 20),
        patch_size_vox=patch,
        batch_size=2,
        normalization=(ChannelNormalization(scheme=scheme),),
        resampling=ResamplingSpec(),
        network=spec,
        train=TrainSpec(mirror_axes=mirror_axes),
    )


def _conv_net(in_ch: int = 1, k: int = 3, seed: int = 0) -> nn.Module:
    """A small fully convolutional net (zero padding: its output depends on the tile borders)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(in_ch, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, k, 3, padding=1)).eval()


class MirrorSymmetricNet(nn.Module):
    """Mirror-equivariant: the average of a conv net over all flips of z, y and x."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from voxflow.infer import mirror_combinations

        outs = [
            torch.flip(self.inner(torch.flip(x, [a + 2 for a in c])), [a + 2 for a in c])
            for c in mirror_combinations((0, 1, 2))
        ]
        return torch.stack(outs).mean(0)


@pytest.fixture
def meta() -> DatasetMeta:
    return DatasetMeta(channel_names=("MR",), labels={"background": 0, "a": 1, "b": 2})


def _write_store(
    path: Path,
    meta: DatasetMeta,
    shapes: list[tuple[int, int, int]],
    spacing: tuple[float, float, float] = (1.5, 1.0, 0.9),
) -> Store:
    store = Store.create(path, meta)
    for i, shape in enumerate(shapes):
        img, lab = synthetic_case(shape, rng=np.random.default_rng(i))
        img[:, :1] = 0  # a zero border slab, so preprocessing crops
        geom = Geometry(shape_zyx=shape, spacing_zyx=spacing, origin_zyx=(3.0, -2.0, 1.0))
        cid = f"case_{i:03d}"
        store.begin_case(cid, geometry=geom)
        z = store.create_array(cid, "image", shape=img.shape, dtype=img.dtype, chunks=(1, 7, 6, 5))
        z[...] = img
        store.mark_complete(cid)
    return store


@pytest.fixture
def make_config():  # noqa: ANN201
    """Factory: a tiny, valid Configuration."""
    return _make_config


@pytest.fixture
def conv_net():  # noqa: ANN201
    """Factory: ``conv_net(in_ch=1, k=3, seed=0)`` small zero-padded 3x3x3 conv net."""
    return _conv_net


@pytest.fixture
def symmetric_net():  # noqa: ANN201
    """Factory: a mirror-equivariant net wrapping a conv net."""
    return lambda seed=0: MirrorSymmetricNet(_conv_net(seed=seed))


@pytest.fixture
def write_store():  # noqa: ANN201
    """Factory: ``write_store(path, meta, shapes)`` -> dataset Store of synthetic cases."""
    return _write_store

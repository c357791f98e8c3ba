"""Test helpers for the trainer: a tiny workspace (plans.json + preprocessed store) and a small
in-memory patch loader with the ``voxflow.data.build_loader`` signature (importable by spawned
processes once this folder is on ``sys.path``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxflow.geometry import Geometry
from voxflow.plan.schema import (
    ChannelNormalization,
    Configuration,
    NetworkSpec,
    Plan,
    ResamplingSpec,
    TrainSpec,
)
from voxflow.store import DatasetMeta, Store
from voxflow.testing import synthetic_case
from voxflow.workspace import Workspace


def tiny_network(
    *,
    dims: int = 3,
    architecture: str = "unet",
    features: tuple[int, ...] = (4, 8),
    strides: Sequence[Sequence[int]] | None = None,
    deep_supervision: bool = True,
) -> NetworkSpec:
    n = len(features)
    strides = strides or [(1,) * dims] + [(2,) * dims] * (n - 1)
    return NetworkSpec(
        architecture=architecture,
        spatial_dims=dims,
        n_stages=n,
        features_per_stage=features,
        kernel_sizes=[(3,) * dims] * n,
        strides=strides,
        n_blocks_per_stage=[1] * n,
        n_conv_per_stage_decoder=[1] * (n - 1),
        deep_supervision=deep_supervision,
    )


def make_workspace(
    root: Path,
    *,
    n_cases: int = 4,
    shape: tuple[int, int, int] = (16, 20, 20),
    patch: tuple[int, int, int] = (16, 16, 16),
    network: NetworkSpec | None = None,
    labels: dict[str, Any] | None = None,
    batch_size: int = 2,
    seed: int = 0,
    **train: Any,
) -> Workspace:
    """plans.json with one configuration ``tiny`` and its preprocessed store of blob cases."""
    work = Workspace(root).ensure()
    labels = labels or {"background": 0, "organ": 1, "lesion": 2}
    network = network or tiny_network()
    cfg = Configuration(
        name="tiny",
        spacing_zyx=(1.0, 1.0, 1.0),
        median_shape_vox=shape,
        patch_size_vox=patch,
        batch_size=batch_size,
        normalization=[ChannelNormalization(scheme="zscore")],
        resampling=ResamplingSpec(),
        network=network,
        train=TrainSpec(
            **{"epochs": 2, "iters_per_epoch": 2, "val_iters": 1, "checkpoint_every": 1, "seed": 1, **train}
        ),
    )
    Plan(channel_names=("img",), labels=labels, configurations={"tiny": cfg}).save(work.plans)
    meta = DatasetMeta(channel_names=("img",), labels=labels, kind="preprocessed", extra={"configuration": "tiny"})
    store = Store.create(work.preprocessed("tiny"), meta, overwrite=True)
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        image, label = synthetic_case(shape, n_labels=2, rng=rng)
        image = (image - image.mean()) / image.std()
        cid = f"case_{i:03d}"
        store.begin_case(cid, geometry=Geometry(shape_zyx=shape, spacing_zyx=(1.0, 1.0, 1.0)))
        store.create_array(cid, "image", shape=image.shape, dtype="float32", chunks=(1, 8, 8, 8))[...] = image
        store.create_array(cid, "label", shape=label.shape, dtype="uint8", chunks=(8, 8, 8))[...] = label
        store.mark_complete(cid)
    return work


@dataclass
class FakeBatch:
    image: torch.Tensor
    target: list[torch.Tensor]


class FakeLoader:
    """Random (half foreground-centred) patches from the cases held in memory; infinite when ``train``,
    ``n_val`` batches otherwise. Deterministic per (seed, rank)."""

    def __init__(
        self,
        store: Any,
        case_ids: Sequence[str],
        config: Configuration,
        *,
        train: bool = True,
        device: Any = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        ds_scales: Sequence[Sequence[float]] | None = None,
        augment: bool = True,
        n_val: int = 2,
    ):
        store = store if isinstance(store, Store) else Store.open(store)
        self.cases = [
            (np.asarray(store.zarr_array(c, "image")[...]), np.asarray(store.zarr_array(c, "label")[...]))
            for c in case_ids
        ]
        self.config, self.train, self.device, self.n_val = config, train, device, n_val
        self.seed, self.rank = seed, rank
        self.steps = [tuple(round(1 / s) for s in sc) for sc in (ds_scales or [(1.0,) * 3])]
        self.closed = False

    def _batch(self, rng: np.random.Generator) -> FakeBatch:
        p = self.config.patch_size_vox
        imgs, labs = [], []
        for _ in range(self.config.batch_size):
            image, label = self.cases[rng.integers(len(self.cases))]
            hi = [s - q for s, q in zip(label.shape, p, strict=True)]
            if rng.random() < 0.5 and (label > 0).any():
                fg = np.argwhere(label > 0)[rng.integers(int((label > 0).sum()))]
                lo = [int(np.clip(c - q // 2, 0, h)) for c, q, h in zip(fg, p, hi, strict=True)]
            else:
                lo = [int(rng.integers(h + 1)) for h in hi]
            sl = tuple(slice(a, a + q) for a, q in zip(lo, p, strict=True))
            imgs.append(image[(slice(None), *sl)])
            labs.append(label[sl][None])
        image = torch.from_numpy(np.stack(imgs))
        label = torch.from_numpy(np.stack(labs).astype(np.int64))
        if self.config.is_2d:
            image, label = image[:, :, 0], label[:, :, 0]
        targets = [label[(Ellipsis, *[slice(None, None, s) for s in st])] for st in self.steps]
        return FakeBatch(image.to(self.device), [t.to(self.device) for t in targets])

    def __iter__(self) -> Iterator[FakeBatch]:
        rng = np.random.default_rng([self.seed, self.rank, int(self.train)])
        n = 0
        while self.train or n < self.n_val:
            yield self._batch(rng)
            n += 1

    def close(self) -> None:
        self.closed = True


def fake_build_loader(store: Any, case_ids: Sequence[str], config: Configuration, **kwargs: Any) -> FakeLoader:
    return FakeLoader(store, case_ids, config, **kwargs)

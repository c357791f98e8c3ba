"""A cascade's first-stage label map on the second stage's grid (crop + label resampling, lazy), and
the cascade Ensemble's ``prepare`` appending it as one-hot channels."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

from voxflow.geometry import Geometry
from voxflow.infer import Ensemble
from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec
from voxflow.preprocess import nonzero_bbox, one_hot_channels, preprocess_case, previous_onto_grid
from voxflow.store import DatasetMeta, Store
from voxflow.testing import raise_if_computes

SHAPE = (20, 26, 22)
SPACING = (1.0, 0.7, 0.9)
BBOX = ((2, 19), (3, 24), (1, 22))


def _config(previous: str | None = None, resampling: ResamplingSpec | None = None) -> Configuration:
    spec = NetworkSpec(
        n_stages=1,
        features_per_stage=(4,),
        kernel_sizes=((1, 1, 1),),
        strides=((1, 1, 1),),
        n_blocks_per_stage=(1,),
        n_conv_per_stage_decoder=(),
    )
    return Configuration(
        name="3d_cascade_fullres" if previous else "3d_lowres",
        spacing_zyx=(1.3, 1.1, 1.2),
        median_shape_vox=(16, 16, 16),
        patch_size_vox=(8, 8, 8),
        batch_size=2,
        resampling=resampling or ResamplingSpec(),
        network=spec,
        previous_stage=previous,
        normalization=(ChannelNormalization(scheme="zscore"),),
    )


def _case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(size=(1, *SHAPE)).astype(np.float32)
    image[:, : BBOX[0][0]] = 0  # a nonzero box smaller than the grid
    label = np.zeros(SHAPE, np.uint8)
    label[5:15, 6:20, 4:18] = 1
    label[8:12, 10:16, 8:14] = 2
    return image, label


@pytest.mark.parametrize("resampling", [ResamplingSpec(), ResamplingSpec(separate_z=True, separate_axis=0)])
def test_previous_onto_grid_is_lazy_and_resamples_like_the_preprocessed_label(resampling: ResamplingSpec) -> None:
    image, label = _case(np.random.default_rng(0))
    cfg = _config("3d_lowres", resampling)
    geom = Geometry(shape_zyx=SHAPE, spacing_zyx=SPACING)
    ref = preprocess_case(
        da.from_array(image, chunks=(1, 7, 6, 5)),
        geom,
        cfg,
        bbox_zyx=BBOX,
        label=da.from_array(label, chunks=(7, 6, 5)),
        label_values=(0, 1, 2),
    )
    with raise_if_computes():
        got = previous_onto_grid(
            da.from_array(label, chunks=(7, 6, 5)),
            cfg,
            crop_bbox_zyx=BBOX,
            out_shape_zyx=ref.image.shape[1:],
            values=(1, 2),
            out_chunks=(5, 6, 7),
        )
        onehot = one_hot_channels(got, (1, 2))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got.compute(), ref.label.compute())
    assert onehot.shape == (2, *got.shape)
    assert onehot.chunks[0] == (2,)
    np.testing.assert_array_equal(onehot.compute()[1], (ref.label.compute() == 2).astype(np.float32))


def test_cascade_prepare_appends_the_previous_stage_as_one_hot_channels(tmp_path: object) -> None:
    image, label = _case(np.random.default_rng(1))
    meta = DatasetMeta(channel_names=("MR",), labels={"background": 0, "a": 1, "b": 2})
    src = Store.create(tmp_path / "ds.zarr", meta)  # type: ignore[operator]
    src.begin_case("c", geometry=Geometry(shape_zyx=SHAPE, spacing_zyx=SPACING))
    src.create_array("c", "image", shape=image.shape, dtype=np.float32, chunks=(1, 8, 8, 8))[...] = image
    src.mark_complete("c")
    cfg = _config("3d_lowres")
    net = torch.nn.Conv3d(3, 3, 1)
    ens = Ensemble(cfg, meta, [net], ["3d_cascade_fullres/fold_0"])
    assert ens.previous_labels == (1, 2)
    prev = da.from_array(label, chunks=(9, 9, 9))
    case = ens.prepare(src, "c", out_chunks=(8, 8, 8), previous={"3d_lowres": prev})  # computes the crop box
    plain = Ensemble(_config(), meta, [torch.nn.Conv3d(1, 3, 1)], ["x"]).prepare(
        src, "c", out_chunks=(8, 8, 8), previous={}
    )
    assert case.image.shape == (3, *plain.image.shape[1:])
    assert case.image.chunks[0] == (3,)
    np.testing.assert_array_equal(case.image[:1].compute(), plain.image.compute())
    onto = previous_onto_grid(
        prev, cfg, crop_bbox_zyx=nonzero_bbox(da.from_array(image)), out_shape_zyx=plain.image.shape[1:], values=(1, 2)
    ).compute()
    assert set(np.unique(case.image[1:].compute())) <= {0.0, 1.0}
    np.testing.assert_array_equal(case.image[2].compute(), (onto == 2).astype(np.float32))
    with pytest.raises(Exception, match="needs the 3d_lowres segmentation"):
        ens.prepare(src, "c", out_chunks=(8, 8, 8), previous={})

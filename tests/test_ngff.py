"""OME-NGFF 0.5: pure metadata helpers, lazy pyramid levels, and every store kind validated with
``ome-zarr-models`` and opened with ``ome_zarr``'s reader (the napari test is tests/viewer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from torch import nn

import voxflow._ngff as ngff
from voxflow.testing import raise_if_computes

ome_zarr_models = pytest.importorskip("ome_zarr_models")


# ------------------------------------------------------------------------------------ pure helpers
def test_pyramid_factors_stop_at_the_voxel_budget_and_respect_anisotropy() -> None:
    assert ngff.pyramid_factors((64, 64, 64), (1.0, 1.0, 1.0)) == [(1, 1, 1)]
    assert ngff.pyramid_factors((600, 512, 512), (1.0, 1.0, 1.0)) == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    # 5 mm slices stay until x/y reach 2.8 mm (within 2x of the finest spacing)
    f = ngff.pyramid_factors((100, 1024, 1024), (5.0, 0.7, 0.7), max_voxels=10**4)
    assert f[:4] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 8, 8)]
    assert np.prod(ngff.level_shape((100, 1024, 1024), f[-1])) <= 10**4
    # 2-D (one slice): z is never halved
    assert all(fz == 1 for fz, _, _ in ngff.pyramid_factors((1, 4096, 4096), (1.0, 0.5, 0.5)))


def test_level_geometry_places_voxel_centres() -> None:
    # mean over 2-blocks: the first coarse voxel sits between voxels 0 and 1
    assert ngff.level_geometry((2.0, 0.5, 0.5), (1.0, 2.0, 3.0), (1, 2, 4), mean=True) == (
        [2.0, 1.0, 2.0],
        [1.0, 2.25, 3.75],
    )
    assert ngff.level_geometry((2.0, 0.5, 0.5), (1.0, 2.0, 3.0), (1, 2, 4), mean=False) == (
        [2.0, 1.0, 2.0],
        [1.0, 2.0, 3.0],
    )


def test_label_names_and_colours_come_from_dataset_json() -> None:
    labels = {"background": 0, "whole tumour": (1, 2, 3), "core": (2, 3), "enhancing": (3,)}
    assert ngff.label_names(labels, (1, 2, 3), predicted=True) == {
        0: "background",
        1: "whole tumour",
        2: "core",
        3: "enhancing",
    }
    names = ngff.label_names({"background": 0, "liver": 1, "tumour": 2}, None, predicted=False)
    meta = ngff.image_label_metadata(names, source="../../")
    assert meta["properties"] == [
        {"label-value": 0, "name": "background"},
        {"label-value": 1, "name": "liver"},
        {"label-value": 2, "name": "tumour"},
    ]
    rgba = {c["label-value"]: c["rgba"] for c in meta["colors"]}
    assert rgba[0] == [0, 0, 0, 0]
    assert rgba[1] != rgba[2]
    assert rgba[1][3] == 255
    assert meta["source"] == {"image": "../../"}
    assert meta["version"] == "0.5"


@pytest.mark.parametrize("chunks", [(1, 7, 6, 5), (1, 24, 20, 16)])
def test_downsample_image_is_lazy_and_matches_numpy(chunks: tuple[int, ...], rng: np.random.Generator) -> None:
    x = rng.normal(size=(1, 13, 20, 9)).astype(np.float32)
    with raise_if_computes():
        lazy = ngff.downsample_image(da.from_array(x, chunks=chunks), (1, 2, 2))
    padded = np.pad(x, [(0, 0), (0, 0), (0, 0), (0, 1)], mode="edge")
    expected = padded.reshape(1, 13, 10, 2, 5, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(lazy.compute(), expected, rtol=1e-6)
    ints = (x * 100).astype(np.int16)
    got = ngff.downsample_image(da.from_array(ints, chunks=chunks), (2, 2, 2)).compute()
    assert got.dtype == np.int16
    assert got.shape == (1, 7, 10, 5)


def test_downsample_label_is_nearest(rng: np.random.Generator) -> None:
    x = rng.integers(0, 4, size=(13, 20, 9)).astype(np.uint8)
    got = ngff.downsample_label(da.from_array(x, chunks=(7, 6, 5)), (2, 2, 2)).compute()
    np.testing.assert_array_equal(got, x[::2, ::2, ::2])


# ------------------------------------------------------------------------------------ store kinds
def _config() -> Any:
    from voxflow.plan.schema import (
        ChannelNormalization,
        Configuration,
        NetworkSpec,
        ResamplingSpec,
        TrainSpec,
    )

    spec = NetworkSpec(
        n_stages=1,
        features_per_stage=(4,),
        kernel_sizes=((3, 3, 3),),
        strides=((1, 1, 1),),
        n_blocks_per_stage=(1,),
        n_conv_per_stage_decoder=(),
    )
    return Configuration(
        name="3d_fullres",
        spacing_zyx=(2.0, 1.0, 1.0),
        median_shape_vox=(8, 16, 16),
        patch_size_vox=(8, 16, 16),
        batch_size=2,
        normalization=(ChannelNormalization(scheme="zscore"),),
        resampling=ResamplingSpec(),
        network=spec,
        train=TrainSpec(mirror_axes=()),
    )


def _check_case(case: Path, *, image: bool, labels: tuple[str, ...], n_channels: int = 1) -> None:
    """The case validates with ome-zarr-models and opens with ome_zarr's reader at every level."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    group = zarr.open_group(str(case), mode="r")
    model = ome_zarr_models.open_ome_zarr(group)
    assert isinstance(model, ImageLabel if not image else Image), type(model)
    paths = [d.path for d in model.ome_attributes.multiscales[0].datasets]
    assert len(paths) >= 2, "expected a pyramid"
    if labels:
        Labels.from_zarr(group["labels"])
        for name in labels:
            label = ImageLabel.from_zarr(group[f"labels/{name}"])
            assert len(label.ome_attributes.multiscales[0].datasets) == len(paths)
    nodes = list(Reader(parse_url(str(case)))())
    first = nodes[0]
    assert first.specs
    assert isinstance(first.specs[0], Label if not image else Multiscales)
    assert len(first.data) == len(paths)
    if image:
        assert first.data[0].shape[0] == n_channels
    names = [n.metadata.get("name") for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(names) == (len(labels) if image else 1)
    for node in nodes:
        for level in node.data:  # every level is readable
            assert np.asarray(level[(0,) * (level.ndim - 3)]).size > 0


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from voxflow.infer import predict
    from voxflow.io import convert
    from voxflow.plan.schema import Plan
    from voxflow.postprocess import run_postprocess
    from voxflow.preprocess import run_preprocess
    from voxflow.synthetic import make_dataset

    mp = pytest.MonkeyPatch()
    mp.setattr(ngff, "MAX_LEVEL_VOXELS", 2000)  # small volumes get a pyramid too
    root = tmp_path_factory.mktemp("ngff")
    raw = make_dataset(root / "raw", kind="ct", n_cases=2, n_test_cases=0, shape_zyx=(12, 24, 20), seed=1)
    ds = convert(raw, root / "dataset.zarr", progress=False)
    cfg = _config()
    plan = Plan(channel_names=ds.meta.channel_names, labels=ds.meta.labels, configurations={cfg.name: cfg})
    pre = run_preprocess(ds, plan, cfg.name, root / "pre.zarr", progress=False)
    torch.manual_seed(0)
    k = len(ds.meta.labels)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, k, 3, padding=1)).eval()
    probs = predict(
        ds, root / "probs", models=[(net, cfg, ds.meta)], save_probabilities=True, progress=False, export=False
    )
    plain = predict(ds, root / "plain", models=[(net, cfg, ds.meta)], progress=False, export=False)
    post = Path(run_postprocess(plain, root / "post.zarr", {"operations": []}, progress=False))
    mp.undo()
    return {"dataset": ds, "preprocessed": pre, "probs": probs, "plain": plain, "post": post}


def test_dataset_and_preprocessed_cases_are_ngff_images_with_labels(stores: dict[str, Any]) -> None:
    for kind in ("dataset", "preprocessed"):
        st = stores[kind]
        for cid in st.case_ids():
            _check_case(st.path / "cases" / cid, image=True, labels=("label",))


def test_prediction_cases_validate(stores: dict[str, Any]) -> None:
    probs, plain = stores["probs"], stores["plain"]
    k = len(probs.meta.labels)
    for cid in probs.case_ids():
        _check_case(probs.path / "cases" / cid, image=True, labels=("label",), n_channels=k)
        _check_case(plain.path / "cases" / cid, image=False, labels=())
        _check_case(stores["post"] / "cases" / cid, image=False, labels=())


def test_levels_match_level_zero_and_do_not_confuse_readers(stores: dict[str, Any]) -> None:
    from voxflow.io import store_info
    from voxflow.store import open_case

    st = stores["dataset"]
    cid = st.case_ids()[0]
    g = st.case_group(cid)
    label = st.label(cid).compute()
    paths = [d["path"] for d in g.attrs["ome"]["multiscales"][0]["datasets"]]
    for k, path in enumerate(paths):
        level = g[f"labels/label/{k}"][...]
        factor = [a // b for a, b in zip(label.shape, level.shape, strict=True)]
        np.testing.assert_array_equal(
            level, label[tuple(slice(None, None, max(f, 1)) for f in factor)][tuple(slice(0, n) for n in level.shape)]
        )
        assert g[path].shape[1:] == level.shape
    assert sorted(g.array_keys()) == ["image", "label"]  # levels live in subgroups
    entry = store_info(st)["cases"][0]
    assert set(entry) == {
        "case_id",
        "complete",
        "shape_zyx",
        "spacing_zyx",
        "image_dtype",
        "image_shape",
        "label_dtype",
        "label_shape",
        "status",
        "problems",
    }  # no level arrays listed
    assert entry["status"] == "ok"
    assert open_case(st, cid).shape == st.image(cid).shape
    names = g.attrs["ome"]
    assert names["version"] == "0.5"
    assert "multiscales" in names
    props = g["labels/label"].attrs["ome"]["image-label"]["properties"]
    assert [p["name"] for p in props] == list(st.meta.labels)


def test_rewriting_a_case_drops_its_old_pyramid(tmp_path: Path) -> None:
    from voxflow.geometry import Geometry
    from voxflow.store import DatasetMeta, Store

    st = Store.create(tmp_path / "s.zarr", DatasetMeta(channel_names=("MR",), labels={"background": 0, "a": 1}))
    geom = Geometry(shape_zyx=(4, 6, 6), spacing_zyx=(1.0, 1.0, 1.0), origin_zyx=(0.0, 0.0, 0.0))
    st.begin_case("c", geometry=geom)
    st.create_array("c", "image", shape=(1, 4, 6, 6), dtype=np.float32, chunks=(1, 4, 6, 6))[...] = 1.0
    st.write_ngff("c")
    st.update_case_attrs("c", complete=True)
    ngff.write_case_ngff(
        st.case_group("c"),
        case_id="c",
        geometry=geom,
        labels=st.meta.labels,
        regions_class_order=None,
        kind="dataset",
        max_voxels=10,
    )
    assert "levels" in st.case_group("c")
    st.mark_complete("c")  # default budget: one level, the old levels are gone
    assert "levels" not in st.case_group("c")
    assert [d["path"] for d in st.case_group("c").attrs["ome"]["multiscales"][0]["datasets"]] == ["image"]

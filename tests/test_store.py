from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from voxflow.errors import CaseNotFoundError, IncompleteStoreError, LayoutError
from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store, label_dtype_for, open_case
from voxflow.testing import synthetic_case

META = DatasetMeta(channel_names=("CT",), labels={"background": 0, "organ": 1, "lesion": 2})


def _write(store: Store, cid: str, image: np.ndarray, label: np.ndarray, geom: Geometry, complete: bool = True) -> None:
    store.begin_case(cid, geometry=geom, attrs={"provenance": {"image": ["x.nii.gz"]}})
    store.create_array(cid, "image", shape=image.shape, dtype=image.dtype, chunks=(1, 7, 6, 5))[...] = image
    store.create_array(cid, "label", shape=label.shape, dtype=label.dtype, chunks=(7, 6, 5))[...] = label
    if complete:
        store.mark_complete(cid)


@pytest.fixture
def small_store(tmp_path, rng):
    store = Store.create(tmp_path / "ds.zarr", META)
    image, label = synthetic_case((12, 10, 9), rng=rng)
    geom = Geometry(shape_zyx=(12, 10, 9), spacing_zyx=(2.0, 0.5, 0.5), origin_zyx=(1.0, 2.0, 3.0))
    _write(store, "case_001", image, label, geom)
    _write(store, "case_002", image, label, geom, complete=False)
    return store, image, label, geom


def test_round_trip_and_completion(small_store) -> None:
    store, image, label, geom = small_store
    reopened = Store.open(store.path)
    assert reopened.case_ids() == ["case_001"]
    assert reopened.incomplete_case_ids() == ["case_002"]
    assert reopened.meta == META
    assert reopened.geometry("case_001") == geom
    np.testing.assert_array_equal(reopened.image("case_001").compute(), image)
    np.testing.assert_array_equal(reopened.label("case_001").compute(), label)
    with pytest.raises(IncompleteStoreError, match="case_002"):
        reopened.image("case_002")
    with pytest.raises(CaseNotFoundError, match="nope"):
        reopened.image("nope")


def test_open_case_gives_lazy_xarray(small_store) -> None:
    store, image, _, geom = small_store
    xa = open_case(store.path, "case_001")
    assert xa.dims == ("c", "z", "y", "x")
    assert isinstance(xa.data, da.Array)
    np.testing.assert_allclose(xa.coords["z"].values, 1.0 + 2.0 * np.arange(12))
    assert xa.attrs["geometry"]["spacing_zyx"] == [2.0, 0.5, 0.5]
    assert list(xa.coords["c"].values) == ["CT"]


def test_xarray_open_zarr_opens_case_group(small_store) -> None:
    store, image, label, _ = small_store
    ds = xr.open_zarr(store.path, group="cases/case_001", consolidated=False)
    assert ds["image"].dims == ("c", "z", "y", "x")
    np.testing.assert_array_equal(ds["label"].values, label)


def test_ngff_reader_opens_case(small_store) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    store, image, _, geom = small_store
    nodes = list(Reader(parse_url(str(store.path / "cases" / "case_001")))())
    assert nodes, "ome-zarr found no image"
    node = nodes[0]
    np.testing.assert_array_equal(np.asarray(node.data[0]), image)
    axes = node.metadata["axes"]
    assert [a["name"] for a in axes] == ["c", "z", "y", "x"]
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == [1.0, *geom.spacing_zyx]


def test_create_refuses_different_metadata(small_store) -> None:
    store, *_ = small_store
    other = DatasetMeta(channel_names=("T1",), labels={"background": 0, "x": 1})
    with pytest.raises(LayoutError, match="different metadata"):
        Store.create(store.path, other)
    assert Store.create(store.path, META).case_ids() == ["case_001"]  # resume keeps cases


def test_label_dtype_and_regions() -> None:
    assert label_dtype_for(2) == np.uint8
    assert label_dtype_for(300) == np.uint16
    meta = DatasetMeta(
        channel_names=("a",), labels={"background": 0, "wt": [1, 2, 3], "tc": [2, 3]}, regions_class_order=(1, 2)
    )
    assert meta.has_regions
    assert meta.label_values == (0, 1, 2, 3)
    assert DatasetMeta.from_dict(meta.to_dict()) == meta


def test_bad_case_id_rejected(tmp_path) -> None:
    store = Store.create(tmp_path / "s.zarr", META)
    with pytest.raises(LayoutError, match="case id"):
        store.begin_case("../evil", geometry=Geometry(shape_zyx=(1, 1, 1), spacing_zyx=(1, 1, 1)))

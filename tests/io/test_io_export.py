from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import CaseNotFoundError
from voxflow.io import convert, export_store, format_info, store_info
from voxflow.store import Store
from voxflow.synthetic import make_dataset


@pytest.mark.parametrize(
    ("ending", "dtype"),
    [
        (".nii.gz", np.float32),
        (".nii.gz", np.int16),
        (".nii", np.uint8),
        (".nrrd", np.float32),
        (".nrrd", np.int16),
        (".mha", np.float32),
        (".mha", np.uint8),
    ],
)
def test_export_round_trip_is_bit_exact(tmp_path: Path, image_factory, oblique_xyz, ending: str, dtype: type) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/labels").mkdir()
    vol = (rng.normal(size=(7, 9, 11)) * 100).astype(dtype)
    lab = rng.integers(0, 4, size=vol.shape).astype(np.uint8)
    geo = dict(spacing_xyz=(0.712345, 0.8, 2.53), origin_xyz=(-101.25, 33.125, 7.0625), direction=oblique_xyz)
    sitk.WriteImage(image_factory(vol, **geo), str(tmp_path / f"src/images/c1{ending}"))
    sitk.WriteImage(image_factory(lab, **geo), str(tmp_path / f"src/labels/c1{ending}"))
    store = convert(tmp_path / "src", tmp_path / "ds.zarr", chunks_zyx=(3, 4, 5), progress=False)
    out = export_store(store, tmp_path / "out", file_ending=ending, progress=False)
    out += export_store(store, tmp_path / "out", array="image", file_ending=ending, progress=False)
    assert [p.name for p in out] == [f"c1{ending}", f"c1_0000{ending}"]
    for exported, original in zip(
        out, [tmp_path / f"src/labels/c1{ending}", tmp_path / f"src/images/c1{ending}"], strict=True
    ):
        a, b = sitk.ReadImage(str(original)), sitk.ReadImage(str(exported))
        assert a.GetPixelID() == b.GetPixelID()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin()
        assert a.GetDirection() == b.GetDirection()


def test_2d_exports_2d(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", kind="2d", n_cases=1, shape_zyx=(1, 12, 14))
    store = convert(src, tmp_path / "ds.zarr", progress=False)
    (path,) = export_store(store, tmp_path / "out", progress=False)
    a, b = sitk.ReadImage(str(src / "labelsTr" / path.name)), sitk.ReadImage(str(path))
    assert b.GetDimension() == 2
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_export_unknown_case_errors(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", n_cases=1, shape_zyx=(3, 6, 6))
    store = convert(src, tmp_path / "ds.zarr", progress=False)
    with pytest.raises(CaseNotFoundError, match="nope"):
        export_store(store, tmp_path / "out", case_ids=["nope"], progress=False)


def test_info_lists_incomplete_cases_and_sizes(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", kind="mr", n_cases=2, shape_zyx=(4, 6, 8))
    convert(src, tmp_path / "ds.zarr", progress=False)
    Store.open(tmp_path / "ds.zarr", mode="r+").update_case_attrs("synmr_001", complete=False)
    info = store_info(tmp_path / "ds.zarr")
    assert info["n_cases"] == 1
    assert info["incomplete_cases"] == ["synmr_001"]
    assert info["channel_names"] == ["T1", "T2"]
    assert info["labels"]["tumor"] == 2
    assert info["size_on_disk_bytes"] > 0
    assert info["cases"][0]["shape_zyx"] == [4, 6, 8]
    assert info["cases"][0]["spacing_zyx"] == [1.0, 1.0, 1.0]
    text = format_info(info)
    assert "1 complete, 1 incomplete" in text
    assert "INCOMPLETE" in text
    assert "T1, T2" in text


def test_cli_convert_info_export(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", n_cases=2, shape_zyx=(4, 8, 8))
    runner = CliRunner()
    res = runner.invoke(
        main, ["convert", str(src), str(tmp_path / "ds.zarr"), "--chunks", "2,4,4", "--max-memory", "1GB"]
    )
    assert res.exit_code == 0, res.output
    assert "2 complete case(s)" in res.output
    res = runner.invoke(main, ["info", str(tmp_path / "ds.zarr"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["n_cases"] == 2
    res = runner.invoke(
        main,
        ["export", str(tmp_path / "ds.zarr"), str(tmp_path / "out"), "--case", "synct_001", "--file-ending", ".mha"],
    )
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["synct_001.mha"]
    res = runner.invoke(main, ["convert", str(src), str(tmp_path / "bad.zarr"), "--chunks", "2,4"])
    assert res.exit_code != 0
    assert "Z,Y,X" in res.output
    (src / "labelsTr/synct_000.nii.gz").write_bytes(b"garbage")
    res = runner.invoke(main, ["convert", str(src), str(tmp_path / "ds2.zarr")])
    assert res.exit_code == 1
    assert "synct_000" in res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a clean error, not a crash


def _uncompressed(path: Path) -> bytes:
    """A NIfTI file gunzipped, or an NRRD file with its gzip-encoded voxels decoded."""
    import gzip
    import zlib

    raw = path.read_bytes()
    if path.name.endswith(".nii.gz"):
        return gzip.decompress(raw)
    if path.suffix == ".nrrd":
        end = raw.index(b"\n\n") + 2
        return raw[:end] + zlib.decompress(raw[end:], 31)
    return raw


@pytest.mark.parametrize(
    ("ending", "dtype"),
    [(".nii", np.uint8), (".nii.gz", np.int16), (".nii", np.float32), (".nrrd", np.int16), (".nrrd", np.float32)],
)
def test_export_streams_slabs_with_sitk_bytes(
    tmp_path: Path,
    oblique_xyz,
    monkeypatch,
    ending: str,  # noqa: ANN001
    dtype: type,
) -> None:
    """Streamed NIfTI/NRRD == SimpleITK's whole-image write, byte for byte (uncompressed), while the
    volume is read one slab at a time; a failed write leaves no file under the final name."""
    import voxflow.io._export as E
    from voxflow.geometry import Geometry

    rng = np.random.default_rng(5)
    vol = (rng.normal(size=(23, 9, 11)) * 50).astype(dtype)
    geom = Geometry.from_sitk(sitk_image_of(vol, oblique_xyz))
    meta_store = Store.create(tmp_path / "s.zarr", _meta())
    meta_store.begin_case("c", geometry=geom)
    z = meta_store.create_array("c", "label", shape=vol.shape, dtype=vol.dtype, chunks=(4, 9, 11))
    z[...] = vol
    meta_store.mark_complete("c")

    reads: list[int] = []

    class Recording:
        def __init__(self, arr):  # noqa: ANN001
            self._arr = arr
            self.shape, self.chunks, self.dtype, self.ndim = arr.shape, arr.chunks, arr.dtype, arr.ndim

        def __getitem__(self, key):  # noqa: ANN001, ANN204
            data = np.asarray(self._arr[key])
            reads.append(data.nbytes)
            return data

    monkeypatch.setattr(E, "_SLAB_BYTES", 2 * 9 * 11 * vol.itemsize)  # two slices per slab
    arr = Recording(meta_store.zarr_array("c", "label"))
    path = tmp_path / f"c{ending}"
    assert E._write_streaming(arr, None, geom, path, ending)
    assert max(reads) <= 2 * 9 * 11 * vol.itemsize
    assert sum(reads) == vol.nbytes
    ref = tmp_path / f"ref{ending}"
    sitk.WriteImage(E._sitk_image(vol, geom), str(ref), True)
    assert _uncompressed(path) == _uncompressed(ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), vol)

    class Broken(Recording):
        def __getitem__(self, key):  # noqa: ANN001, ANN204
            raise OSError("disk went away")

    bad = tmp_path / f"bad{ending}"
    with pytest.raises(OSError, match="disk went away"):
        E._write_streaming(Broken(meta_store.zarr_array("c", "label")), None, geom, bad, ending)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("bad")) == []


def sitk_image_of(vol: np.ndarray, direction_xyz: tuple[float, ...]) -> sitk.Image:
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.712345, 0.8, 2.53))
    img.SetOrigin((-101.25, 33.125, 7.0625))
    img.SetDirection(direction_xyz)
    return img


def _meta():  # noqa: ANN202
    from voxflow.store import DatasetMeta

    return DatasetMeta(channel_names=("CT",), labels={"background": 0, "a": 1})

"""Issue 19, "nothing silently wrong": truncated inputs, changed sources, damaged stores."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import ConversionError, StoreDamagedError
from voxflow.io import convert, store_info
from voxflow.io._volume import check_gzip_stream
from voxflow.store import DatasetMeta, Store, is_checksummed
from voxflow.synthetic import make_dataset

CASE = "synct_000"


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "raw", kind="ct", n_cases=2, shape_zyx=(8, 16, 16))


def _image_file(raw: Path, case: str = CASE) -> Path:
    return raw / "imagesTr" / f"{case}_0000.nii.gz"


def test_truncated_gzip_fails_the_case_naming_the_file(raw: Path, tmp_path: Path) -> None:
    f = _image_file(raw)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cut short|truncated") as e:
        convert(raw, tmp_path / "ds.zarr", progress=False)
    assert str(f) in str(e.value)
    assert CASE in str(e.value)
    st = Store.open(tmp_path / "ds.zarr")
    assert st.case_ids() == ["synct_001"]
    assert st.incomplete_case_ids() == [CASE]
    f.write_bytes(data)  # restored: the rerun converts it
    assert convert(raw, tmp_path / "ds.zarr", progress=False).case_ids() == [CASE, "synct_001"]


def test_gzip_check_needs_the_bytes_the_nifti_header_promises(raw: Path, tmp_path: Path) -> None:
    f = _image_file(raw)
    plain = gzip.decompress(f.read_bytes())
    assert check_gzip_stream(f) == len(plain)
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(plain[: len(plain) - 100]))  # a valid gzip stream of a cut NIfTI
    with pytest.raises(ConversionError, match="promises"):
        check_gzip_stream(short)
    bad_crc = bytearray(f.read_bytes())
    bad_crc[-8] ^= 0xFF
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad_crc))
    with pytest.raises(ConversionError, match="crc.nii.gz"):
        check_gzip_stream(tmp_path / "crc.nii.gz")


def test_resume_redoes_a_case_whose_source_changed(raw: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    dst = tmp_path / "ds.zarr"
    st = convert(raw, dst, progress=False)
    files = {r["path"]: r for r in st.case_attrs(CASE)["provenance"]["files"]}
    assert files[str(_image_file(raw).resolve())]["size"] == _image_file(raw).stat().st_size
    before = st.image(CASE).compute()
    img = sitk.ReadImage(str(_image_file(raw)))
    sitk.WriteImage(img * 2, str(_image_file(raw)), True)  # same geometry, new voxels
    os.utime(_image_file(raw), ns=(1, 1))  # a different mtime even on coarse clocks
    st = convert(raw, dst, progress=False)
    np.testing.assert_array_equal(st.image(CASE).compute(), before * 2)


def _converted(raw: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds.zarr"
    convert(raw, dst, progress=False, chunks_zyx=(4, 8, 8))
    return dst


def test_arrays_are_checksummed_and_every_chunk_is_written(raw: Path, tmp_path: Path) -> None:
    st = Store.open(_converted(raw, tmp_path))
    for name in ("image", "label"):
        arr = st.zarr_array(CASE, name)
        assert is_checksummed(arr)
        assert arr.nchunks_initialized == arr.nchunks  # all-zero label chunks too
    assert store_info(st, verify=True)["damaged_cases"] == []


def test_missing_chunk_is_damage_not_zeros(raw: Path, tmp_path: Path) -> None:
    dst = _converted(raw, tmp_path)
    (dst / "cases" / CASE / "label" / "c" / "0" / "0" / "0").unlink()
    res = CliRunner().invoke(main, ["info", str(dst)])
    assert res.exit_code != 0
    assert "DAMAGED" in res.output
    assert CASE in res.output
    assert "'label'" in res.output
    with pytest.raises(StoreDamagedError, match=f"'label' of case '{CASE}'"):
        Store.open(dst).label(CASE)


def test_verify_reads_every_chunk_and_reports_a_bad_checksum(raw: Path, tmp_path: Path) -> None:
    dst = _converted(raw, tmp_path)
    chunk = dst / "cases" / CASE / "image" / "c" / "0" / "1" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert CliRunner().invoke(main, ["info", str(dst)]).exit_code == 0  # files all present: cheap check passes
    res = CliRunner().invoke(main, ["info", "--verify", str(dst)])
    assert res.exit_code != 0
    assert f"case '{CASE}' array 'image'" in res.output
    assert "does not decode" in res.output
    with pytest.raises(StoreDamagedError, match=f"'image' of case '{CASE}'"):
        Store.open(dst).image(CASE).compute()


@pytest.mark.parametrize("damaged", ["case", "array"])
def test_truncated_zarr_json_is_a_clear_error_and_convert_redoes_the_case(
    raw: Path, tmp_path: Path, damaged: str
) -> None:
    dst = _converted(raw, tmp_path)
    meta = dst / "cases" / CASE / ("zarr.json" if damaged == "case" else "image/zarr.json")
    meta.write_bytes(meta.read_bytes()[:40])
    res = CliRunner().invoke(main, ["info", str(dst)])
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a clean error, not a crash
    assert CASE in res.output
    with pytest.raises(StoreDamagedError, match=CASE):
        Store.open(dst).image(CASE)
    st = convert(raw, dst, progress=False, chunks_zyx=(4, 8, 8))  # resume redoes the damaged case
    assert st.case_ids() == [CASE, "synct_001"]
    assert store_info(st, verify=True)["damaged_cases"] == []


def test_truncated_root_zarr_json(raw: Path, tmp_path: Path) -> None:
    dst = _converted(raw, tmp_path)
    (dst / "zarr.json").write_text('{"zarr_format": 3, "node_')
    res = CliRunner().invoke(main, ["info", str(dst)])
    assert res.exit_code != 0
    assert "damaged" in res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a clean error, not a crash
    st = convert(raw, dst, progress=False, chunks_zyx=(4, 8, 8))  # rewrites the root, keeps the cases
    assert st.case_ids() == [CASE, "synct_001"]


def test_store_without_checksums_still_opens(tmp_path: Path) -> None:
    from voxflow.geometry import Geometry
    from voxflow.store import default_compressor

    st = Store.create(tmp_path / "old.zarr", DatasetMeta(channel_names=("ct",), labels={"background": 0}))
    st.begin_case("a", geometry=Geometry(shape_zyx=(4, 4, 4), spacing_zyx=(1.0, 1.0, 1.0)))
    old = st.case_group("a").create_array(
        "image",
        shape=(1, 4, 4, 4),
        chunks=(1, 2, 4, 4),
        dtype="f4",
        compressors=default_compressor(),
        fill_value=0,
        dimension_names=("c", "z", "y", "x"),
    )
    old[:, :2] = 1.0  # the second chunk is all fill value: not written, as older voxflow did
    st.mark_complete("a")
    st = Store.open(tmp_path / "old.zarr")
    assert not is_checksummed(st.zarr_array("a", "image"))
    assert st.image("a").compute().sum() == 32
    info = store_info(st, verify=True)
    assert info["damaged_cases"] == []
    assert info["cases"][0]["status"] == "ok"
    assert json.loads((tmp_path / "old.zarr" / "cases" / "a" / "image" / "zarr.json").read_text())
    assert zarr.open_array(str(tmp_path / "old.zarr/cases/a/image")).nchunks_initialized == 1

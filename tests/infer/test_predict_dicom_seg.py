"""``voxflow predict --output-format dicom-seg`` on the real oblique TCIA MR series (../shared/data; skipped
when absent): one DICOM SEG per case that dciodvfy accepts (skipped without dicom3tools) and whose voxels,
read back with highdicom onto the NIfTI export's grid, equal the NIfTI prediction; a non-DICOM input is
refused before anything is predicted, naming the case."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import ConversionError
from voxflow.infer import predict
from voxflow.store import DatasetMeta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
from test_dicom_seg_real import SHARED, assert_valid, seg_on_nifti_grid  # noqa: E402

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
SERIES = "PGBM-001"
META = DatasetMeta(channel_names=("MR",), labels={"background": 0, "tumour": 1, "rim": 2})


def _series(tmp_path: Path) -> Path:
    """The first T1post series of PGBM-001 alone (its mask series would become a label)."""
    (series,) = [p for p in (SHARED / "dicom-mr-tcia" / SERIES).glob("*/*T1post*")][:1]
    return series


def test_predict_writes_a_valid_dicom_seg_equal_to_the_nifti(tmp_path: Path, make_config, conv_net) -> None:  # noqa: ANN001
    series = _series(tmp_path)
    net = conv_net(seed=2)
    common = {
        "models": [(net, make_config(patch=(8, 64, 64), spacing=(6.5, 0.86, 0.86)), META)],
        "tta": False,
        "progress": False,
    }
    seg_out = predict(series, tmp_path / "seg", output_format="dicom-seg", **common)
    nii_out = predict(series, tmp_path / "nii", output_format="nifti", **common)
    (cid,) = seg_out.case_ids()
    seg, nii = tmp_path / "seg" / f"{cid}.dcm", tmp_path / "nii" / f"{cid}.nii.gz"
    assert seg.is_file()
    assert nii.is_file()
    np.testing.assert_array_equal(seg_out.zarr_array(cid, "label")[...], nii_out.zarr_array(cid, "label")[...])
    assert_valid(seg)
    from_seg, from_nii = seg_on_nifti_grid(seg, nii)
    assert (from_nii > 0).any()  # the random network does predict something
    np.testing.assert_array_equal(from_seg, from_nii)


def test_dicom_seg_output_of_a_nifti_input_is_refused_naming_the_case(
    tmp_path: Path,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
) -> None:  # noqa: ANN001
    src = write_store(tmp_path / "ds.zarr", META, [(8, 16, 16)])
    with pytest.raises(ConversionError, match="needs inputs converted from DICOM") as e:
        predict(
            src, tmp_path / "out", models=[(conv_net(), make_config(), META)], output_format="dicom-seg", progress=False
        )
    assert src.case_ids()[0] in str(e.value)
    assert not (tmp_path / "out" / "prediction.zarr" / "cases").exists() or not list(
        (tmp_path / "out" / "prediction.zarr" / "cases").iterdir()
    )
    res = CliRunner().invoke(main, ["predict", "--help"])
    assert "--output-format" in res.output
    assert "dicom-seg" in res.output

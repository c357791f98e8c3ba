"""Inputs of `voxflow predict` are keyed by file, not by name (issue 19): a different or changed
file is read again, two files that would be one case are refused, stale inputs do not linger, and
errors name the user's files rather than the internal ``OUT/.input`` store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from torch import nn

from voxflow.cli import main
from voxflow.errors import ConversionError, LayoutError
from voxflow.infer import predict
from voxflow.store import Store

SHAPE = (6, 12, 10)


def _write(path: Path, value: float, *, ending_ns: int | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(int(value * 10)).normal(value, 1.0, size=SHAPE).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    if ending_ns is not None:  # a distinct mtime even on coarse clocks
        os.utime(path, ns=(ending_ns, ending_ns))
    return arr


def _input_image(out: Path, cid: str) -> np.ndarray:
    return Store.open(out / ".input/input.zarr").image(cid).compute()[0]


class _Exploding(nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        raise AssertionError("an unchanged, complete case must not be predicted again")


@pytest.fixture
def model(meta, make_config, conv_net):  # noqa: ANN001, ANN201
    return [(conv_net(seed=3), make_config(), meta)]


def test_same_named_file_from_another_folder_is_read_and_predicted(tmp_path: Path, model) -> None:  # noqa: ANN001
    _write(tmp_path / "a/scan.nii.gz", 0.0)
    b = _write(tmp_path / "b/scan.nii.gz", 5.0)
    out = tmp_path / "out"
    predict([tmp_path / "a/scan.nii.gz"], out, models=model, tta=False, progress=False)
    second = predict([tmp_path / "b/scan.nii.gz"], out, models=model, tta=False, progress=False)
    np.testing.assert_array_equal(_input_image(out, "scan"), b)  # b was read, not a's old link
    fresh = predict([tmp_path / "b/scan.nii.gz"], tmp_path / "fresh", models=model, tta=False, progress=False)
    np.testing.assert_array_equal(second.array("scan", "label").compute(), fresh.array("scan", "label").compute())
    assert second.case_attrs("scan")["input"]["image"] == [str((tmp_path / "b/scan.nii.gz").resolve())]


def test_changed_file_is_read_again_and_unchanged_one_is_not(
    tmp_path: Path,
    model,
    meta,  # noqa: ANN001
    make_config,
) -> None:  # noqa: ANN001
    path, out = tmp_path / "in/scan.nii.gz", tmp_path / "out"
    _write(path, 0.0, ending_ns=1_000_000_000)
    predict([path], out, models=model, tta=False, progress=False)
    store_mtime = (out / ".input/input.zarr/zarr.json").stat().st_mtime_ns
    predict([path], out, models=[(_Exploding(), make_config(), meta)], tta=False, progress=False)  # resumes
    assert (out / ".input/input.zarr/zarr.json").stat().st_mtime_ns == store_mtime  # not converted again
    new = _write(path, 3.0, ending_ns=2_000_000_000)
    with pytest.raises(AssertionError, match="must not be predicted again"):  # the changed case is redone
        predict([path], out, models=[(_Exploding(), make_config(), meta)], tta=False, progress=False)
    np.testing.assert_array_equal(_input_image(out, "scan"), new)


def test_two_inputs_for_one_case_are_refused_naming_both(tmp_path: Path, model) -> None:  # noqa: ANN001
    _write(tmp_path / "a/scan.nii.gz", 0.0)
    _write(tmp_path / "b/scan.nii.gz", 1.0)
    with pytest.raises(ConversionError, match=r"distinct cases.*a/scan\.nii\.gz.*b/scan\.nii\.gz"):
        predict(
            [tmp_path / "a/scan.nii.gz", tmp_path / "b/scan.nii.gz"], tmp_path / "out", models=model, progress=False
        )
    _write(tmp_path / "a/scan.nrrd", 1.0)  # another ending, the same case id
    with pytest.raises(ConversionError, match=r"unique.*a/scan\.nii\.gz.*a/scan\.nrrd|unique.*scan\.nrrd"):
        predict([tmp_path / "a/scan.nii.gz", tmp_path / "a/scan.nrrd"], tmp_path / "out", models=model, progress=False)


def test_cli_refuses_same_named_inputs(tmp_path: Path, meta, make_config) -> None:  # noqa: ANN001
    import dataclasses

    import torch

    from voxflow.nets import build_network
    from voxflow.train.checkpoint import save_checkpoint

    cfg = make_config()
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "runs" / cfg.name / "fold_0" / "checkpoint_final.pt",
        {
            "network": build_network(cfg.network, 1, 3).state_dict(),
            "configuration": dataclasses.asdict(cfg),
            "dataset": meta.to_dict(),
            "in_channels": 1,
            "num_outputs": 3,
            "epoch": 1,
        },
    )
    _write(tmp_path / "a/scan.nii.gz", 0.0)
    _write(tmp_path / "b/scan.nii.gz", 1.0)
    res = CliRunner().invoke(
        main,
        [
            "predict",
            "-i",
            str(tmp_path / "a/scan.nii.gz"),
            "-i",
            str(tmp_path / "b/scan.nii.gz"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(tmp_path / "runs" / cfg.name),
        ],
    )
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a clean error, not a traceback
    flat = "".join(res.output.split())
    for path in (tmp_path / "a/scan.nii.gz", tmp_path / "b/scan.nii.gz"):
        assert str(path) in flat, res.output


def test_inputs_of_a_previous_call_are_not_kept(tmp_path: Path, model) -> None:  # noqa: ANN001
    x, y = tmp_path / "in/x.nii.gz", tmp_path / "in/y.nii.gz"
    _write(x, 0.0)
    _write(y, 1.0)
    out = tmp_path / "out"
    (out / ".input/input_files").mkdir(parents=True)  # staging folder of older versions
    predict([x, y], out, models=model, tta=False, progress=False, export=False)
    assert Store.open(out / ".input/input.zarr").case_ids() == ["x", "y"]
    predict([x], out, models=model, tta=False, progress=False)
    assert Store.open(out / ".input/input.zarr").case_ids() == ["x"]
    assert not (out / ".input/input_files").exists()
    assert (out / "x.nii.gz").exists()
    assert not (out / "y.nii.gz").exists()


def test_predict_errors_name_the_users_file(tmp_path: Path, model, meta, make_config, conv_net) -> None:  # noqa: ANN001
    bad = tmp_path / "in/broken.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image" * 20)
    with pytest.raises(ConversionError) as info:
        predict([bad], tmp_path / "out", models=model, progress=False)
    assert str(bad) in str(info.value)
    assert ".input" not in str(info.value)
    good = tmp_path / "in/scan.nii.gz"
    _write(good, 0.0)
    two_channels = [(conv_net(in_ch=2), make_config(), meta)]
    from dataclasses import replace

    cfg = make_config()
    two = replace(cfg, normalization=cfg.normalization * 2)
    with pytest.raises(LayoutError) as info:
        predict([good], tmp_path / "out2", models=[(two_channels[0][0], two, meta)], progress=False)
    assert str(good) in str(info.value)
    assert "input.zarr" not in str(info.value)
    assert "_0001" in str(info.value)

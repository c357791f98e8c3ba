"""The table of bad inputs: what a user gets for each kind of broken dataset (issue 19).

Each row of ``BAD`` builds a small broken source in ``tmp_path`` and names what must come of it:
the error class (or a :class:`VoxflowWarning` where voxflow goes on without the named file) and
fragments the message must hold. Every row names the file or the case at fault, so the table
documents behaviour as well as testing it; rows that already worked before issue 19 stay in it.

Each row runs twice, as a user meets it:

* through the API (``voxflow.io.convert``, or ``files_source`` for files given one by one, as
  ``voxflow predict -i A -i B`` does), checking the error class and message;
* through the CLI (``voxflow convert SRC DST`` with click's ``CliRunner``): exit status 1 and the
  message printed, never a traceback.

To add a case: write a ``make`` function that breaks a fresh synthetic dataset (``_ct``/``_mr``
give nnU-Net raw datasets of two tiny cases) and returns the path to convert, and add a row.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import ConversionError, VoxflowError, VoxflowWarning
from voxflow.io import convert, files_source
from voxflow.synthetic import make_dataset

SHAPE = (4, 8, 8)
CASE = "synct_001"  # the case each row breaks (the other one, synct_000, stays good)


# ---------------------------------------------------------------------- builders
def _ct(root: Path) -> Path:
    return make_dataset(root / "raw", kind="ct", n_cases=2, shape_zyx=SHAPE)


def _mr(root: Path, ending: str = ".nii.gz") -> Path:
    return make_dataset(root / "raw", kind="mr", n_cases=2, shape_zyx=SHAPE, file_ending=ending)


def _json_edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        raw = _ct(root)
        meta = json.loads((raw / "dataset.json").read_text())
        fn(meta)
        (raw / "dataset.json").write_text(json.dumps(meta))
        return raw

    return make


def _json_text(text: str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        raw = _ct(root)
        (raw / "dataset.json").write_text(text)
        return raw

    return make


def _rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], *, spacing: tuple[float, ...] | None = None) -> None:
    img = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img)))
    if new.GetSize() == img.GetSize():
        new.CopyInformation(img)
    if spacing is not None:
        new.SetSpacing(spacing)
    sitk.WriteImage(new, str(path))


def _label(fn: Callable[[np.ndarray], np.ndarray], **kw: Any) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        raw = _ct(root)
        _rewrite(raw / f"labelsTr/{CASE}.nii.gz", fn, **kw)
        return raw

    return make


def _float_label(a: np.ndarray) -> np.ndarray:
    out = a.astype(np.float32)
    out[0, 0, 0] = 1.5
    return out


def _undeclared_value(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[1, 2, 3] = 7
    return out


def _nan_image(root: Path) -> Path:
    raw = _mr(root, ".nrrd")  # SimpleITK reads NaN in NIfTI as 0: only other formats can show it
    _rewrite(
        raw / "imagesTr/synmr_001_0000.nrrd",
        lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a).astype(np.float32),
    )
    return raw


def _missing_channel(root: Path) -> Path:
    raw = _mr(root)
    (raw / "imagesTr/synmr_001_0001.nii.gz").unlink()
    return raw


def _missing_channel_in_folder(root: Path) -> Path:
    raw = _mr(root)
    (raw / "imagesTr/synmr_001_0001.nii.gz").unlink()
    (raw / "dataset.json").unlink()
    return raw / "imagesTr"  # a plain folder of nnU-Net-named files: the channel count comes from the names


def _unreadable(root: Path) -> Path:
    raw = _ct(root)
    (raw / f"imagesTr/{CASE}_0000.nii.gz").write_bytes(b"not an image" * 20)
    return raw


def _missing_label(root: Path) -> Path:
    raw = _ct(root)
    (raw / f"labelsTr/{CASE}.nii.gz").unlink()
    return raw


def _empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    (root / "empty/notes.txt").write_text("no images here")
    return root / "empty"


def _empty_images_tr(root: Path) -> Path:
    raw = _ct(root)
    for p in [*raw.glob("imagesTr/*"), *raw.glob("labelsTr/*")]:
        p.unlink()
    return raw


def _png_among_nifti(root: Path) -> Path:
    raw = _ct(root)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(raw / "imagesTr/synct_009_0000.png"))
    return raw


def _two_d_in_three_d(root: Path) -> Path:
    raw = _ct(root)
    for path in (raw / f"imagesTr/{CASE}_0000.nii.gz", raw / f"labelsTr/{CASE}.nii.gz"):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        sitk.WriteImage(sitk.GetImageFromArray(arr[0]), str(path))  # a 2D file: read as 1 x Y x X
    return raw


def _png_among_nifti_folders(root: Path) -> Path:
    for d in ("images", "labels"):
        (root / "src" / d).mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SHAPE, np.uint8)), str(root / "src" / d / "a.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(root / "src" / d / "b.png"))
    return root / "src"


def _space_in_name(root: Path) -> Path:
    raw = _ct(root)
    for p in raw.glob(f"*/{CASE}*"):
        p.rename(p.with_name(p.name.replace(CASE, "synct 001")))
    return raw


def _duplicate_stems(root: Path) -> Path:
    (root / "src/images").mkdir(parents=True)
    (root / "src/labels").mkdir()
    vol = np.zeros(SHAPE, np.uint8)
    for name in ("images/a.nii.gz", "images/a.nrrd", "labels/a.nii.gz"):
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(root / "src" / name))
    return root / "src"


def _orphan_label(root: Path) -> Path:
    src = _duplicate_stems(root)
    (src / "images/a.nrrd").unlink()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SHAPE, np.uint8)), str(src / "labels/zz.nii.gz"))
    return src


def _too_many_channels(root: Path) -> Path:
    raw = _ct(root)
    path = raw / f"imagesTr/{CASE}_0000.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr], -1), isVector=True), str(path))
    return raw


def _same_named_inputs(root: Path) -> list[Path]:
    files = []
    for d in ("a", "b"):
        (root / d).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SHAPE, np.float32)), str(root / d / "scan.nii.gz"))
        files.append(root / d / "scan.nii.gz")
    return files


def _msd_entry_without_label(root: Path) -> Path:
    raw = _ct(root)
    meta = {
        "name": "t",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "training": [{"image": f"./imagesTr/{CASE}_0000.nii.gz"}],
        "test": [],
    }
    (raw / "dataset.json").write_text(json.dumps(meta))
    return raw


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Bad:
    id: str
    make: Callable[[Path], Any]
    error: type[Exception] | type[Warning]
    fragments: tuple[str, ...]
    files: bool = False  # make returns files given one by one (predict -i A -i B), not a folder


BAD = [
    # dataset.json
    Bad(
        "label-value-not-an-integer",
        _json_edit(lambda m: m["labels"].update(organ="one")),
        ConversionError,
        ("dataset.json", "labels['organ']", "non-negative integer", "'one'"),
    ),
    Bad(
        "channel-key-not-a-number",
        _json_edit(lambda m: m.update(channel_names={"a": "CT"})),
        ConversionError,
        ("dataset.json", "channel_names", '"0"', "'a'"),
    ),
    Bad(
        "labels-as-a-list",
        _json_edit(lambda m: m.update(labels=["background", "organ"])),
        ConversionError,
        ("dataset.json", "labels", "mapping label names to integer values", "list"),
    ),
    Bad(
        "channel-names-missing",
        _json_edit(lambda m: m.pop("channel_names")),
        ConversionError,
        ("dataset.json", "channel_names is required"),
    ),
    Bad(
        "channel-names-as-a-list",
        _json_edit(lambda m: m.update(channel_names=["CT"])),
        ConversionError,
        ("dataset.json", "channel_names", "['CT']"),
    ),
    Bad(
        "channel-numbers-with-a-gap",
        _json_edit(lambda m: m.update(channel_names={"0": "CT", "2": "PET"})),
        ConversionError,
        ("dataset.json", "channel_names", "without gaps", "[0, 2]"),
    ),
    Bad(
        "file-ending-not-a-string",
        _json_edit(lambda m: m.update(file_ending=5)),
        ConversionError,
        ("dataset.json", "file_ending", '".nii.gz"', "got 5"),
    ),
    Bad(
        "no-background-label",
        _json_edit(lambda m: m.update(labels={"organ": 1, "lesion": 2})),
        ConversionError,
        ("dataset.json", "labels", "background as 0"),
    ),
    Bad(
        "two-labels-one-value",
        _json_edit(lambda m: m["labels"].update(lesion=1)),
        ConversionError,
        ("dataset.json", "labels", "[1]", "'organ', 'lesion'"),
    ),
    Bad(
        "num-training-not-a-number",
        _json_edit(lambda m: m.update(numTraining="two")),
        ConversionError,
        ("dataset.json", "numTraining", "'two'"),
    ),
    Bad(
        "msd-without-training-list",
        _json_edit(lambda m: m.update(modality=m.pop("channel_names"))),
        ConversionError,
        ("dataset.json", "training is required", "MSD"),
    ),
    Bad("dataset-json-not-json", _json_text("{'labels': }"), ConversionError, ("dataset.json", "valid JSON")),
    Bad("dataset-json-not-an-object", _json_text("[1, 2]"), ConversionError, ("dataset.json", "JSON object")),
    Bad(
        "msd-training-entry-without-label",
        _msd_entry_without_label,
        ConversionError,
        ("dataset.json", "training", "label", f"{CASE}_0000.nii.gz"),
    ),
    # image and label contents
    Bad("nan-in-image", _nan_image, ConversionError, ("NaN/Inf", "synmr_001_0000.nrrd", "case 'synmr_001'")),
    Bad(
        "label-shape-differs-from-image",
        _label(lambda a: a[:, :-1]),
        ConversionError,
        ("shape", f"{CASE}.nii.gz", f"case '{CASE}'"),
    ),
    Bad(
        "label-spacing-differs-from-image",
        _label(lambda a: a, spacing=(0.8, 0.8, 3.0)),
        ConversionError,
        ("spacing", f"{CASE}.nii.gz", f"case '{CASE}'"),
    ),
    Bad(
        "undeclared-label-value",
        _label(_undeclared_value),
        ConversionError,
        ("undeclared value(s) [7]", f"{CASE}.nii.gz", f"case '{CASE}'"),
    ),
    Bad(
        "float-label",
        _label(_float_label),
        ConversionError,
        ("must be integers", "[1.5]", f"{CASE}.nii.gz", f"case '{CASE}'"),
    ),
    Bad(
        "more-channels-than-declared",
        _too_many_channels,
        ConversionError,
        ("1 channel(s)", "got 2", f"{CASE}_0000.nii.gz", f"case '{CASE}'"),
    ),
    # files
    Bad(
        "missing-channel-file",
        _missing_channel,
        ConversionError,
        ("channel 1 ('T2')", "case 'synmr_001'", "'synmr_001_0001.nii.gz'", "channel_names"),
    ),
    Bad(
        "missing-channel-in-a-plain-folder",
        _missing_channel_in_folder,
        ConversionError,
        ("channel 1", "'synmr_001_0001.nii.gz'", "case 'synmr_001'"),
    ),
    Bad("unreadable-file", _unreadable, ConversionError, ("could not read", f"{CASE}_0000.nii.gz")),
    Bad(
        "training-case-without-label",
        _missing_label,
        ConversionError,
        ("needs a label file", f"{CASE}.nii.gz", f"case '{CASE}'"),
    ),
    Bad("folder-without-images", _empty_folder, ConversionError, ("could not recognise", "empty")),
    Bad("dataset-without-cases", _empty_images_tr, ConversionError, ("at least one case", "raw")),
    Bad("png-among-nifti", _png_among_nifti, VoxflowWarning, ("synct_009_0000.png", "file_ending '.nii.gz'")),
    Bad(
        "2d-file-in-3d-dataset",
        _two_d_in_three_d,
        ConversionError,
        ("2D image", f"{CASE}_0000.nii.gz", f"case '{CASE}'", "3D"),
    ),
    Bad("png-among-nifti-in-folders", _png_among_nifti_folders, ConversionError, ("2D image", "b.png", "case 'b'")),
    Bad("space-in-file-name", _space_in_name, ConversionError, ("synct 001_0000.nii.gz", "Rename the file")),
    Bad("two-files-one-case", _duplicate_stems, ConversionError, ("unique", "'a.nii.gz'", "'a.nrrd'")),
    Bad("label-without-image", _orphan_label, ConversionError, ("needs an image", "zz.nii.gz")),
    Bad(
        "same-named-files-from-two-folders",
        _same_named_inputs,
        ConversionError,
        ("distinct cases", "a/scan.nii.gz", "b/scan.nii.gz"),
        files=True,
    ),
]


def _convert(bad: Bad, src: Any, dst: Path) -> None:
    convert(files_source(src) if bad.files else src, dst, progress=False)


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_input_api(bad: Bad, tmp_path: Path) -> None:
    src = bad.make(tmp_path)
    if issubclass(bad.error, Warning):
        with pytest.warns(bad.error) as record:
            _convert(bad, src, tmp_path / "ds.zarr")
        msg = " ".join(str(w.message) for w in record)
    else:
        with pytest.raises(bad.error) as info:  # type: ignore[arg-type]
            _convert(bad, src, tmp_path / "ds.zarr")
        assert isinstance(info.value, VoxflowError)
        msg = str(info.value)
    for fragment in bad.fragments:
        assert fragment in msg, f"{fragment!r} not in: {msg}"


@pytest.mark.parametrize(
    "bad",
    [b for b in BAD if not b.files and not issubclass(b.error, Warning)],
    ids=[b.id for b in BAD if not b.files and not issubclass(b.error, Warning)],
)
def test_bad_input_cli(bad: Bad, tmp_path: Path) -> None:
    src = bad.make(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VoxflowWarning)
        res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "ds.zarr")])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a clean error, not a traceback
    assert "Error:" in res.output
    flat = " ".join(res.output.split())
    for fragment in bad.fragments:
        assert " ".join(fragment.split()) in flat, f"{fragment!r} not in: {res.output}"

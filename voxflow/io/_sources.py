"""Source formats: detect what a path holds and list its cases (reader registry).

A *source format* is a name, a ``detect(path) -> bool`` and a ``load(path, split) -> DatasetSource``.
Built-in formats are tried in this order; the first whose ``detect`` accepts the path wins:

``nnunet-v2``   dataset.json with ``channel_names`` + imagesTr/ (CASE_XXXX.ext per channel), labelsTr/
``msd``         Medical Segmentation Decathlon: dataset.json with ``modality`` and a ``training`` list (4D images)
``image-label-folders``  images/ + labels/ (or imagesTr/ + labelsTr/, ...) with matching file names
``dicom``       a folder tree of DICOM series (mask series and DICOM SEGs become labels, Modality the
                channel name; see ``_dicom``)
``file``        one image file (NIfTI, NRRD, MHA, ...), or a multi-page TIFF stack as one volume
``image-folder`` a folder of image files: nnU-Net names (``CASE_0000.ext``, ``CASE_0001.ext`` = channels
                of one case; 2D or 3D) are cases; otherwise 2D slices (PNG/TIFF/...) form one volume
                (natural sort order) and 3D files are one case each

More formats register with :func:`register_format` or the ``voxflow.readers`` entry-point group.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxflow.errors import ConversionError, VoxflowWarning
from voxflow.io._dataset_json import is_msd_meta, parse_msd, parse_nnunet, read_json
from voxflow.io._dicom import find_dicom_files, pair_masks, pair_segs, scan_dicom, seg_label, series_case_ids
from voxflow.io._dicom_seg_in import SegHeader
from voxflow.io._volume import SitkFile, SliceStack, VolumeSource
from voxflow.store import is_valid_case_id

__all__ = [
    "IMAGE_SUFFIXES",
    "CaseSpec",
    "DatasetSource",
    "SourceFormat",
    "check_source",
    "detect_source",
    "files_source",
    "load_source",
    "register_format",
    "split_suffix",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".tif",
    ".tiff",
    ".png",
    ".bmp",
    ".jpg",
    ".jpeg",
    ".gipl",
    ".gipl.gz",
    ".hdr",
    ".vtk",
)
_SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
_IMAGE_DIRS = ("imagesTr", "images", "image", "imgs", "img")
_LABEL_DIRS = ("labelsTr", "labels", "label", "masks", "mask", "segmentations", "gt")


def split_suffix(name: str) -> tuple[str, str]:
    """``("case_0000", ".nii.gz")`` for ``"case_0000.nii.gz"``; ``(name, "")`` if not an image name."""
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: -len(suf)], name[len(name) - len(suf) :]
    return name, ""


@dataclass(frozen=True)
class VolumeRef:
    """How to open one volume of a case (opening reads headers, so errors belong to the case)."""

    paths: tuple[Path, ...]
    opener: Callable[[str], VolumeSource]

    def open(self, case_id: str) -> VolumeSource:
        return self.opener(case_id)


def file_ref(path: Path) -> VolumeRef:
    return VolumeRef((path,), lambda cid: SitkFile(path, case=cid))


def stack_ref(paths: tuple[Path, ...]) -> VolumeRef:
    return VolumeRef(paths, lambda cid: SliceStack(paths, case=cid))


def ready_ref(source: VolumeSource) -> VolumeRef:
    def _open(cid: str) -> VolumeSource:
        source.case = cid  # type: ignore[attr-defined]
        return source

    return VolumeRef(tuple(Path(f) for f in source.files), _open)


@dataclass(frozen=True)
class CaseSpec:
    """One case of a source: channel volumes (in channel order) and an optional label."""

    case_id: str
    images: tuple[VolumeRef, ...]
    label: VolumeRef | None = None
    binary_label: bool = False  # DICOM masks: non-zero -> 1


@dataclass
class DatasetSource:
    """A detected source: its format, dataset metadata and cases."""

    format: str
    root: Path
    channel_names: tuple[str, ...]
    labels: dict[str, Any] | None  # None: not declared, found by scanning the label files
    cases: list[CaseSpec]
    regions_class_order: tuple[int, ...] | None = None
    file_ending: str = ".nii.gz"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceFormat:
    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, str], DatasetSource]


_FORMATS: dict[str, SourceFormat] = {}


def register_format(
    name: str, detect: Callable[[Path], bool]
) -> Callable[[Callable[[Path, str], DatasetSource]], Callable[[Path, str], DatasetSource]]:
    """Decorator registering ``load(path, split)`` under ``name`` (tried in registration order)."""

    def deco(load: Callable[[Path, str], DatasetSource]) -> Callable[[Path, str], DatasetSource]:
        _FORMATS[name] = SourceFormat(name, detect, load)
        return load

    return deco


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="voxflow.readers"):
        if ep.name not in _FORMATS:
            ep.load()  # the module registers itself with register_format


def detect_source(path: Path) -> str:
    """Name of the first source format that accepts ``path``."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"the source must exist; {str(path)!r} does not.")
    _load_entry_points()
    for fmt in _FORMATS.values():
        if fmt.detect(path):
            return fmt.name
    raise ConversionError(
        f"the source must be one of {list(_FORMATS)}; could not recognise {str(path)!r}. See `voxflow convert "
        f"--help` for the layouts voxflow reads."
    )


def load_source(path: Path, *, split: str = "train", format: str | None = None) -> DatasetSource:
    """Detect (or use ``format``) and list the cases of ``path``; checks duplicate case ids."""
    name = format or detect_source(path)
    if name not in _FORMATS:
        raise ConversionError(f"format must be one of {list(_FORMATS)}; got {name!r}.")
    if split not in ("train", "test"):
        raise ConversionError(f"split must be 'train' or 'test'; got {split!r}.")
    return check_source(_FORMATS[name].load(Path(path), split), where=str(path))


def check_source(src: DatasetSource, *, where: str) -> DatasetSource:
    """Refuse a source without cases, with a case id twice, or with case ids a store cannot hold."""
    seen: dict[str, CaseSpec] = {}
    for case in src.cases:
        first = case.images[0].paths[0]
        if case.case_id in seen:
            a = seen[case.case_id].images[0].paths[0]
            raise ConversionError(
                f"case ids must be unique; {case.case_id!r} comes from both {str(a)!r} and "
                f"{str(first)!r}. Rename or remove one of them."
            )
        if not is_valid_case_id(case.case_id):
            fixed = re.sub(r"[^A-Za-z0-9._-]+", "_", first.name).lstrip("._-")
            raise ConversionError(
                f"case ids (from file names) must start with a letter or digit and use only letters, digits, "
                f"'.', '_' and '-'; got {case.case_id!r} from {str(first)!r}. Rename the file (e.g. to "
                f"{fixed!r})."
            )
        seen[case.case_id] = case
    if not src.cases:
        raise ConversionError(f"a source must hold at least one case; found none in {where!r} ({src.format}).")
    return src


# ---------------------------------------------------------------------- helpers
def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and split_suffix(p.name)[1])


def _shown(p: Path, where: Path | None) -> str:
    """A file's name if it lies in ``where``, else its whole path (files from several folders)."""
    return p.name if where is not None and p.parent == where else str(p)


def _group_channels(files: list[Path], n_channels: int | None, where: Path | None) -> dict[str, list[Path | None]]:
    """``CASE_XXXX.ext`` files -> {case: [channel 0 path, channel 1 path, ...]} (None where missing)."""
    cases: dict[str, dict[int, Path]] = {}
    in_where = f" in {str(where)!r}" if where is not None else ""
    for p in files:
        stem, _ = split_suffix(p.name)
        m = _CHANNEL.match(stem)
        if not m:
            raise ConversionError(
                f"image files must be named CASE_XXXX<ending> (XXXX = channel); got {_shown(p, where)!r}{in_where}."
            )
        chans = cases.setdefault(m["case"], {})
        ch = int(m["ch"])
        if ch in chans:
            raise ConversionError(
                f"case ids must be unique; channel {ch} of case {m['case']!r} is both "
                f"{_shown(chans[ch], where)!r} and {_shown(p, where)!r}{in_where}. "
                f"Rename or remove one of them."
            )
        chans[ch] = p
    n = n_channels or max((max(c) + 1 for c in cases.values()), default=1)
    return {cid: [chans.get(i) for i in range(n)] for cid, chans in sorted(cases.items())}


def _files_by_stem(folder: Path | None, files: Sequence[Path] | None = None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    in_where = f" in {str(folder)!r}" if folder is not None else ""
    if files is None:
        files = _image_files(folder) if folder is not None else []
    for p in files:
        stem = split_suffix(p.name)[0]
        if stem in out:
            raise ConversionError(
                f"case ids must be unique; {_shown(out[stem], folder)!r} and "
                f"{_shown(p, folder)!r}{in_where} name the same case. Remove one of them."
            )
        out[stem] = p
    return out


def _missing_ref(path: Path, channel: int, names: Sequence[str] | None = None) -> VolumeRef:
    """A channel file that is not there: opening it raises an error saying what to add."""

    def _open(cid: str) -> VolumeSource:
        name = f" ({names[channel]!r})" if names and channel < len(names) else ""
        fix = (
            "remove it from 'channel_names' in dataset.json"
            if names
            else "rename the files so that channels are numbered from _0000 without gaps"
        )
        raise ConversionError(
            f"every case needs one file per channel; channel {channel}{name} of case {cid!r} must be "
            f"{path.name!r}, and {str(path)!r} is missing for case {cid!r}. Add the file, move the case out, "
            f"or, if the dataset has no channel {channel}, {fix}."
        )

    return VolumeRef((path,), _open)


def _channel_refs(
    cid: str, paths: Sequence[Path | None], folder: Path, names: Sequence[str] | None = None
) -> tuple[VolumeRef, ...]:
    """File refs of a case's channels; missing channels get a ref that explains what is expected."""
    ending = next((split_suffix(p.name)[1] for p in paths if p is not None), "")
    return tuple(
        file_ref(p) if p is not None else _missing_ref(folder / f"{cid}_{i:04d}{ending}", i, names)
        for i, p in enumerate(paths)
    )


# ---------------------------------------------------------------------- nnU-Net v2
def _is_nnunet(p: Path) -> bool:
    """A folder with a dataset.json that is not MSD's (a missing ``channel_names`` is then an error)."""
    return p.is_dir() and (p / "dataset.json").is_file() and not is_msd_meta(read_json(p / "dataset.json"))


def _warn_other_endings(folder: Path, ending: str) -> None:
    others = [p.name for p in _image_files(folder) if not p.name.endswith(ending)]
    if others:
        warnings.warn(
            VoxflowWarning(
                f"image files in {str(folder)!r} must end with the dataset's file_ending {ending!r}; skipped "
                f"{len(others)} that do not: {others[:5]}. Convert them to {ending} or move them out of the folder."
            ),
            stacklevel=4,
        )


@register_format("nnunet-v2", _is_nnunet)
def _load_nnunet(root: Path, split: str) -> DatasetSource:
    info = parse_nnunet(root / "dataset.json", read_json(root / "dataset.json"))
    channel_names, ending = info.channel_names, info.file_ending
    img_dir, lab_dir = (
        (root / "imagesTr", root / "labelsTr") if split == "train" else (root / "imagesTs", root / "labelsTs")
    )
    _warn_other_endings(img_dir, ending)
    _warn_other_endings(lab_dir, ending)
    files = [p for p in _image_files(img_dir) if p.name.endswith(ending)]
    groups = _group_channels(files, len(channel_names), img_dir)
    cases = []
    for cid, paths in groups.items():
        refs = _channel_refs(cid, paths, img_dir, channel_names)
        lab = lab_dir / f"{cid}{ending}"
        if split == "train" and not lab.is_file():
            raise ConversionError(
                f"every training case needs a label file; {str(lab)!r} is missing for case "
                f"{cid!r}. Add it or move the case to imagesTs/."
            )
        cases.append(CaseSpec(cid, refs, file_ref(lab) if lab.is_file() else None))
    if split == "train" and info.num_training not in (None, len(cases)):
        log.warning("dataset.json says numTraining=%s but %s holds %d cases", info.num_training, img_dir, len(cases))
    return DatasetSource(
        "nnunet-v2",
        root,
        channel_names,
        dict(info.labels),
        cases,
        regions_class_order=info.regions_class_order,
        file_ending=ending,
        name=info.name,
    )


# ---------------------------------------------------------------------- MSD
def _is_msd(p: Path) -> bool:
    if not (p.is_dir() and (p / "dataset.json").is_file()):
        return False
    return is_msd_meta(read_json(p / "dataset.json"))


@register_format("msd", _is_msd)
def _load_msd(root: Path, split: str) -> DatasetSource:
    info = parse_msd(root / "dataset.json", read_json(root / "dataset.json"))
    entries = info.training if split == "train" else tuple((t, None) for t in info.test)
    cases = []
    for img_rel, lab_rel in entries:
        img = (root / img_rel).resolve()
        cid = split_suffix(img.name)[0]
        lab = (root / lab_rel).resolve() if lab_rel else None
        cases.append(CaseSpec(cid, (file_ref(img),), file_ref(lab) if lab else None))
    return DatasetSource(
        "msd", root, info.channel_names, dict(info.labels), cases, file_ending=".nii.gz", name=info.name
    )


# ---------------------------------------------------------------------- images/ + labels/
def _pair_dirs(p: Path) -> tuple[Path, Path] | None:
    if not p.is_dir():
        return None
    imgs = next((p / d for d in _IMAGE_DIRS if (p / d).is_dir()), None)
    labs = next((p / d for d in _LABEL_DIRS if (p / d).is_dir()), None)
    return (imgs, labs) if imgs and labs else None


@register_format("image-label-folders", lambda p: _pair_dirs(p) is not None)
def _load_pairs(root: Path, split: str) -> DatasetSource:
    img_dir, lab_dir = _pair_dirs(root)  # type: ignore[misc]
    files = _image_files(img_dir)
    labels = _files_by_stem(lab_dir)
    stems = [split_suffix(p.name)[0] for p in files]
    nnunet_named = bool(stems) and all(_CHANNEL.match(s) for s in stems) and not any(s in labels for s in stems)
    if nnunet_named:
        groups = _group_channels(files, None, img_dir)
    else:
        groups = {s: [p] for s, p in _files_by_stem(img_dir).items()}
    orphans = sorted(set(labels) - set(groups))
    if orphans:
        raise ConversionError(
            f"every label file needs an image of the same name; no image for "
            f"{labels[orphans[0]].name!r} in {str(img_dir)!r} ({len(orphans)} such labels)."
        )
    n_ch = max(len(v) for v in groups.values()) if groups else 1
    cases = []
    for cid, paths in groups.items():
        refs = _channel_refs(cid, paths, img_dir)
        cases.append(CaseSpec(cid, refs, file_ref(labels[cid]) if cid in labels else None))
    names = ("image",) if n_ch == 1 else tuple(f"channel_{i}" for i in range(n_ch))
    ending = split_suffix(files[0].name)[1] if files else ".nii.gz"
    return DatasetSource("image-label-folders", root, names, None, cases, file_ending=ending, name=root.name)


# ---------------------------------------------------------------------- DICOM
@register_format("dicom", lambda p: p.is_dir() and bool(find_dicom_files(p, limit=1)))
def _load_dicom(root: Path, split: str) -> DatasetSource:
    series, segs = scan_dicom(root)
    pairs = pair_segs(pair_masks(series), segs)
    ids = series_case_ids(root, pairs)
    names: dict[int, str] = {0: "background"}
    for _, lab in pairs:
        if isinstance(lab, SegHeader):
            for n, name in sorted(lab.segments.items()):
                names.setdefault(n, name or f"label_{n}")
        elif lab is not None:
            names.setdefault(1, "foreground")
    labels: dict[str, Any] = {}
    for v, name in sorted(names.items()):
        labels[name if name not in labels else f"{name}_{v}"] = v
    src = DatasetSource(
        "dicom",
        root,
        _modality_names([img for img, _ in pairs], root),
        labels,
        [],
        file_ending=".nii.gz",
        name=root.name,
    )
    for cid, (img, lab) in zip(ids, pairs, strict=True):
        if isinstance(lab, SegHeader):
            src.cases.append(CaseSpec(cid, (ready_ref(img),), _seg_ref(lab, img, src)))
        else:
            src.cases.append(CaseSpec(cid, (ready_ref(img),), ready_ref(lab) if lab else None, binary_label=True))
    return src


def _modality_names(images: Sequence[Any], root: Path) -> tuple[str, ...]:
    """The channel name of a DICOM dataset: its series' Modality (CT, MR, PT, ...), else ``image``."""
    found = sorted({s.modality for s in images if s.modality})
    if len(found) == 1:
        return (found[0],)
    if len(found) > 1:
        warnings.warn(
            VoxflowWarning(
                f"the image series of a DICOM dataset should share one Modality (the channel name); {str(root)!r} "
                f"holds {found}. The channel is named 'image', so no modality-specific normalisation is planned; "
                f"convert each modality separately, or pass channel_names."
            ),
            stacklevel=4,
        )
    return ("image",)


def _seg_ref(seg: SegHeader, image: Any, src: DatasetSource) -> VolumeRef:
    """A SEG label, opened with the dataset's regions as they stand when the case is converted (the
    caller may override the labels): overlapping segments are allowed only for a region dataset."""

    def _open(cid: str) -> VolumeSource:
        regions = any(isinstance(v, (tuple, list)) for v in (src.labels or {}).values())
        order = tuple(src.regions_class_order or ()) if regions else None
        label = seg_label(seg, image, order)
        label.case = cid
        return label

    return VolumeRef((seg.path,), _open)


# ---------------------------------------------------------------------- single files and plain folders
def _is_tiff(p: Path) -> bool:
    return p.suffix.lower() in (".tif", ".tiff")


@register_format("file", lambda p: p.is_file())
def _load_file(path: Path, split: str) -> DatasetSource:
    stem, ending = split_suffix(path.name)
    ref = stack_ref((path,)) if _is_tiff(path) else file_ref(path)
    cid = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "case"
    return DatasetSource(
        "file", path.parent, ("image",), None, [CaseSpec(cid, (ref,))], file_ending=ending or ".nii.gz", name=cid
    )


def _is_2d_file(p: Path) -> bool:
    import SimpleITK as sitk

    if p.suffix.lower() not in _SLICE_SUFFIXES:
        return False
    r = sitk.ImageFileReader()
    r.SetFileName(str(p))
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return False
    return r.GetDimension() == 2 or r.GetSize()[2] == 1


def _nnunet_named(stems: list[str]) -> bool:
    """Names look like nnU-Net cases (``CASE_XXXX``): several cases, or one case with few channels.

    One prefix with more than 8 numbered files (``slice_0000`` .. ``slice_0099``) is a slice stack.
    """
    matches = [_CHANNEL.match(s) for s in stems]
    if not stems or not all(matches):
        return False
    cases = {m["case"] for m in matches if m}
    return len(cases) > 1 or len(stems) <= 8


@register_format("image-folder", lambda p: p.is_dir() and bool(_image_files(p)))
def _load_folder(root: Path, split: str) -> DatasetSource:
    return _folder_source(root, _image_files(root), root)


def _folder_source(root: Path, files: list[Path], where: Path | None) -> DatasetSource:
    """Cases of image files (one folder, ``where``, or several: ``None``), read as ``image-folder``."""
    cid = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name).strip("._-") or "case"
    stems = [split_suffix(p.name)[0] for p in files]
    nnunet = _nnunet_named(stems)
    if not nnunet and all(_is_2d_file(p) for p in files[:3]) and len({p.suffix.lower() for p in files}) == 1:
        files = sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
        return DatasetSource(
            "image-folder",
            root,
            ("image",),
            None,
            [CaseSpec(cid, (stack_ref(tuple(files)),))],
            file_ending=".nii.gz",
            name=cid,
        )
    if nnunet:
        groups = _group_channels(files, None, where)
    else:
        groups = {s: [p] for s, p in _files_by_stem(where, files).items()}
    n_ch = max(len(v) for v in groups.values())
    cases = [CaseSpec(c, _channel_refs(c, paths, paths[0].parent if paths[0] else root)) for c, paths in groups.items()]
    names = ("image",) if n_ch == 1 else tuple(f"channel_{i}" for i in range(n_ch))
    return DatasetSource(
        "image-folder", root, names, None, cases, file_ending=split_suffix(files[0].name)[1], name=root.name
    )


def files_source(files: Sequence[Path]) -> DatasetSource:
    """The cases of image files given one by one (e.g. ``voxflow predict -i A -i B``), read in place.

    Files are grouped as in a folder (``CASE_XXXX`` names are channels of one case). The same file
    given twice counts once; two different files that map to one case id are refused, naming both.
    """
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(Path(f).resolve(), Path(f))
    paths = list(unique.values())
    if not paths:
        raise ConversionError("predict needs at least one image file; got none.")
    by_name: dict[str, Path] = {}
    for p in paths:
        if p.name in by_name:
            raise ConversionError(
                f"input files must map to distinct cases; {str(by_name[p.name])!r} and {str(p)!r} have the same "
                f"name, so both would be case {split_suffix(p.name)[0]!r}. Rename one, or predict them separately."
            )
        by_name[p.name] = p
    folders = {p.parent for p in paths}
    where = next(iter(folders)) if len(folders) == 1 else None
    src = _folder_source(paths[0].parent, paths, where)
    src.name = "input_files"  # stable whatever folders the files are in (the name of the staging folder before)
    return check_source(src, where=str(paths[0]))

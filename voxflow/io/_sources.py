"""Source formats: detect what a path holds and list its cases (reader registry).

A *source format* is a name, a ``detect(path) -> bool`` and a ``load(path, split) -> DatasetSource``.
Built-in formats are tried in this order; the first whose ``detect`` accepts the path wins:

``nnunet-v2``   dataset.json with ``channel_names`` + imagesTr/ (CASE_XXXX.ext per channel), labelsTr/
``msd``         Medical Segmentation Decathlon: dataset.json with ``modality`` and a ``training`` list (4D images)
``image-label-folders``  images/ + labels/ (or imagesTr/ + labelsTr/, ...) with matching file names
``dicom``       a folder tree of DICOM series (mask series become labels, see ``_dicom``)
``file``        one image file (NIfTI, NRRD, MHA, ...), or a multi-page TIFF stack as one volume
``image-folder`` a folder of image files: nnU-Net names (``CASE_0000.ext``, ``CASE_0001.ext`` = channels
                of one case; 2D or 3D) are cases; otherwise 2D slices (PNG/TIFF/...) form one volume
                (natural sort order) and 3D files are one case each

More formats register with :func:`register_format` or the ``voxflow.readers`` entry-point group.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxflow.errors import ConversionError
from voxflow.io._dicom import find_dicom_files, pair_masks, scan_dicom_series, series_case_ids
from voxflow.io._volume import SitkFile, SliceStack, VolumeSource

__all__ = ["CaseSpec", "DatasetSource", "SourceFormat", "detect_source", "load_source", "register_format"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff", ".png", ".bmp",
                  ".jpg", ".jpeg", ".gipl", ".gipl.gz", ".hdr", ".vtk")
_SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
_IMAGE_DIRS = ("imagesTr", "images", "image", "imgs", "img")
_LABEL_DIRS = ("labelsTr", "labels", "label", "masks", "mask", "segmentations", "gt")


def split_suffix(name: str) -> tuple[str, str]:
    """``("case_0000", ".nii.gz")`` for ``"case_0000.nii.gz"``; ``(name, "")`` if not an image name."""
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: -len(suf)], name[len(name) - len(suf):]
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


def register_format(name: str, detect: Callable[[Path], bool]) -> Callable[[Callable[[Path, str], DatasetSource]],
                                                                          Callable[[Path, str], DatasetSource]]:
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
        f"--help` for the layouts voxflow reads.")


def load_source(path: Path, *, split: str = "train", format: str | None = None) -> DatasetSource:
    """Detect (or use ``format``) and list the cases of ``path``; checks duplicate case ids."""
    name = format or detect_source(path)
    if name not in _FORMATS:
        raise ConversionError(f"format must be one of {list(_FORMATS)}; got {name!r}.")
    if split not in ("train", "test"):
        raise ConversionError(f"split must be 'train' or 'test'; got {split!r}.")
    src = _FORMATS[name].load(Path(path), split)
    seen: dict[str, CaseSpec] = {}
    for case in src.cases:
        if case.case_id in seen:
            a, b = seen[case.case_id].images[0].paths[0], case.images[0].paths[0]
            raise ConversionError(f"case ids must be unique; {case.case_id!r} comes from both {str(a)!r} and "
                                  f"{str(b)!r}. Rename or remove one of them.")
        seen[case.case_id] = case
    if not src.cases:
        raise ConversionError(f"a source must hold at least one case; found none in {str(path)!r} ({name}).")
    return src


# ---------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{str(path)!r} must be valid JSON; {e}. Fix the file.") from None


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and split_suffix(p.name)[1])


def _group_channels(files: list[Path], n_channels: int | None, where: Path) -> dict[str, list[Path | None]]:
    """``CASE_XXXX.ext`` files -> {case: [channel 0 path, channel 1 path, ...]} (None where missing)."""
    cases: dict[str, dict[int, Path]] = {}
    for p in files:
        stem, _ = split_suffix(p.name)
        m = _CHANNEL.match(stem)
        if not m:
            raise ConversionError(f"image files must be named CASE_XXXX<ending> (XXXX = channel); got "
                                  f"{p.name!r} in {str(where)!r}.")
        chans = cases.setdefault(m["case"], {})
        ch = int(m["ch"])
        if ch in chans:
            raise ConversionError(f"case ids must be unique; channel {ch} of case {m['case']!r} is both "
                                  f"{chans[ch].name!r} and {p.name!r} in {str(where)!r}.")
        chans[ch] = p
    n = n_channels or max((max(c) + 1 for c in cases.values()), default=1)
    return {cid: [chans.get(i) for i in range(n)] for cid, chans in sorted(cases.items())}


def _files_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in _image_files(folder):
        stem = split_suffix(p.name)[0]
        if stem in out:
            raise ConversionError(f"case ids must be unique; {out[stem].name!r} and {p.name!r} in "
                                  f"{str(folder)!r} name the same case. Remove one of them.")
        out[stem] = p
    return out


def _missing_ref(path: Path) -> VolumeRef:
    return VolumeRef((path,), lambda cid: SitkFile(path, case=cid))  # SitkFile raises "missing"


# ---------------------------------------------------------------------- nnU-Net v2
def _is_nnunet(p: Path) -> bool:
    return p.is_dir() and (p / "dataset.json").is_file() and "channel_names" in _read_json(p / "dataset.json")


@register_format("nnunet-v2", _is_nnunet)
def _load_nnunet(root: Path, split: str) -> DatasetSource:
    meta = _read_json(root / "dataset.json")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise ConversionError(f"an nnU-Net dataset.json must have {key!r}; it is missing in "
                                  f"{str(root / 'dataset.json')!r}.")
    chans = meta["channel_names"]
    channel_names = tuple(str(chans[k]) for k in sorted(chans, key=int))
    ending = str(meta["file_ending"])
    img_dir, lab_dir = (root / "imagesTr", root / "labelsTr") if split == "train" else \
        (root / "imagesTs", root / "labelsTs")
    files = [p for p in _image_files(img_dir) if p.name.endswith(ending)]
    groups = _group_channels(files, len(channel_names), img_dir)
    cases = []
    for cid, paths in groups.items():
        refs = tuple(file_ref(p) if p is not None else
                     _missing_ref(img_dir / f"{cid}_{i:04d}{ending}") for i, p in enumerate(paths))
        lab = lab_dir / f"{cid}{ending}"
        if split == "train" and not lab.is_file():
            raise ConversionError(f"every training case needs a label file; {str(lab)!r} is missing for case "
                                  f"{cid!r}. Add it or move the case to imagesTs/.")
        cases.append(CaseSpec(cid, refs, file_ref(lab) if lab.is_file() else None))
    if split == "train" and meta.get("numTraining") not in (None, len(cases)):
        log.warning("dataset.json says numTraining=%s but %s holds %d cases", meta["numTraining"], img_dir, len(cases))
    rco = meta.get("regions_class_order")
    return DatasetSource("nnunet-v2", root, channel_names, dict(meta["labels"]), cases,
                         regions_class_order=tuple(rco) if rco else None, file_ending=ending,
                         name=str(meta.get("name", root.name)))


# ---------------------------------------------------------------------- MSD
def _is_msd(p: Path) -> bool:
    if not (p.is_dir() and (p / "dataset.json").is_file()):
        return False
    meta = _read_json(p / "dataset.json")
    return "modality" in meta and "training" in meta


@register_format("msd", _is_msd)
def _load_msd(root: Path, split: str) -> DatasetSource:
    meta = _read_json(root / "dataset.json")
    mod = meta["modality"]
    channel_names = tuple(str(mod[k]) for k in sorted(mod, key=int))
    labels = {str(name): int(v) for v, name in meta.get("labels", {"0": "background"}).items()}
    entries = meta["training"] if split == "train" else meta.get("test", [])
    cases = []
    for e in entries:
        img_rel = e["image"] if isinstance(e, dict) else e
        img = (root / img_rel).resolve()
        cid = split_suffix(img.name)[0]
        lab = (root / e["label"]).resolve() if isinstance(e, dict) and e.get("label") else None
        cases.append(CaseSpec(cid, (file_ref(img),), file_ref(lab) if lab else None))
    return DatasetSource("msd", root, channel_names, labels, cases, file_ending=".nii.gz",
                         name=str(meta.get("name", root.name)))


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
        raise ConversionError(f"every label file needs an image of the same name; no image for "
                              f"{labels[orphans[0]].name!r} in {str(img_dir)!r} ({len(orphans)} such labels).")
    n_ch = max(len(v) for v in groups.values()) if groups else 1
    cases = []
    for cid, paths in groups.items():
        refs = tuple(file_ref(p) if p is not None else _missing_ref(img_dir / f"{cid}_{i:04d}")
                     for i, p in enumerate(paths))
        cases.append(CaseSpec(cid, refs, file_ref(labels[cid]) if cid in labels else None))
    names = ("image",) if n_ch == 1 else tuple(f"channel_{i}" for i in range(n_ch))
    ending = split_suffix(files[0].name)[1] if files else ".nii.gz"
    return DatasetSource("image-label-folders", root, names, None, cases, file_ending=ending, name=root.name)


# ---------------------------------------------------------------------- DICOM
@register_format("dicom", lambda p: p.is_dir() and bool(find_dicom_files(p, limit=1)))
def _load_dicom(root: Path, split: str) -> DatasetSource:
    pairs = pair_masks(scan_dicom_series(root))
    ids = series_case_ids(root, pairs)
    cases = [CaseSpec(cid, (ready_ref(img),), ready_ref(mask) if mask else None, binary_label=True)
             for cid, (img, mask) in zip(ids, pairs)]
    labels = {"background": 0, "foreground": 1} if any(m for _, m in pairs) else {"background": 0}
    return DatasetSource("dicom", root, ("image",), labels, cases, file_ending=".nii.gz", name=root.name)


# ---------------------------------------------------------------------- single files and plain folders
def _is_tiff(p: Path) -> bool:
    return p.suffix.lower() in (".tif", ".tiff")


@register_format("file", lambda p: p.is_file())
def _load_file(path: Path, split: str) -> DatasetSource:
    stem, ending = split_suffix(path.name)
    ref = stack_ref((path,)) if _is_tiff(path) else file_ref(path)
    cid = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "case"
    return DatasetSource("file", path.parent, ("image",), None, [CaseSpec(cid, (ref,))],
                         file_ending=ending or ".nii.gz", name=cid)


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
    files = _image_files(root)
    cid = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name).strip("._-") or "case"
    stems = [split_suffix(p.name)[0] for p in files]
    nnunet = _nnunet_named(stems)
    if not nnunet and all(_is_2d_file(p) for p in files[:3]) and len({p.suffix.lower() for p in files}) == 1:
        files = sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
        return DatasetSource("image-folder", root, ("image",), None, [CaseSpec(cid, (stack_ref(tuple(files)),))],
                             file_ending=".nii.gz", name=cid)
    if nnunet:
        groups = _group_channels(files, None, root)
    else:
        groups = {s: [p] for s, p in _files_by_stem(root).items()}
    n_ch = max(len(v) for v in groups.values())
    cases = [CaseSpec(c, tuple(file_ref(p) if p is not None else _missing_ref(root / f"{c}_{i:04d}")
                               for i, p in enumerate(paths))) for c, paths in groups.items()]
    names = ("image",) if n_ch == 1 else tuple(f"channel_{i}" for i in range(n_ch))
    return DatasetSource("image-folder", root, names, None, cases, file_ending=split_suffix(files[0].name)[1],
                         name=root.name)

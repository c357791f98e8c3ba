"""The one on-disk layout of voxflow: a Zarr v3 group of cases.

Converted datasets, preprocessed data and predictions all use it::

    STORE.zarr/                      root attrs: {"voxflow": DatasetMeta.to_dict()}
      cases/<case_id>/               attrs: {"voxflow": {"complete": bool, "geometry": {...},
                                             "provenance": {...}, ...stage extras},
                                             "ome": OME-NGFF 0.5 (written at completion)}
        image   (C, Z, Y, X)  source dtype (float32 after preprocessing)
        label   (Z, Y, X)     smallest unsigned dtype that fits the label values (optional)
        probs   (K, Z, Y, X)  prediction stores only (float16)
        levels/, labels/      the OME-NGFF pyramid and label images (see voxflow._ngff); readers
                              never need them

Every array carries ``dimension_names`` so ``xarray.open_zarr(path, group="cases/<id>")`` opens a
case. A case is written as: :meth:`Store.begin_case` (drops any old copy, writes
``complete: false``), arrays, then :meth:`Store.mark_complete`. Readers only list complete cases,
so an interrupted writer never leaves a case that looks finished; a rerun redoes incomplete cases.

Integrity: arrays are written with every chunk present (zarr's ``write_empty_chunks``, so a
missing chunk file is damage, not zeros) and a CRC32C checksum after the compressor in each chunk
(``Crc32cCodec``), so :meth:`Store.verify_case` (``voxflow info --verify``) can tell a damaged
store from a good one. Stores written before this (no checksum) still open and read.
A case whose metadata cannot be parsed counts as incomplete for writers resuming (they redo it);
readers get a :class:`StoreDamagedError` naming the case and array.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from zarr.codecs import BloscCodec, Crc32cCodec

from voxflow import _serial
from voxflow._types import PathLikeStr
from voxflow.errors import CaseNotFoundError, IncompleteStoreError, LayoutError, StoreDamagedError
from voxflow.geometry import Geometry

__all__ = [
    "DEFAULT_CHUNKS_ZYX",
    "FORMAT_VERSION",
    "DatasetMeta",
    "Store",
    "default_compressor",
    "is_valid_case_id",
    "is_checksummed",
    "label_dtype_for",
    "ngff_multiscales",
    "open_array_for_write",
    "open_case",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_CHUNKS_ZYX: tuple[int, int, int] = (64, 128, 128)
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_WRITE_CONFIG: Any = {"write_empty_chunks": True}  # every chunk on disk: a missing chunk file is damage
_EXPECTED = "voxflow_expected_cases"  # root attribute: cases a writer was asked for (see expect_cases)
# what a damaged or unreadable zarr.json / chunk raises inside zarr (JSONDecodeError is a ValueError)
_READ_ERRORS = (ValueError, RuntimeError, OSError, KeyError, TypeError)
_DIMS = {"image": ("c", "z", "y", "x"), "probs": ("c", "z", "y", "x"), "label": ("z", "y", "x")}


def is_valid_case_id(case_id: str) -> bool:
    """Whether a store can hold a case of this id (a letter or digit, then letters, digits, ``._-``)."""
    return bool(_CASE_ID.match(case_id))


def default_compressor() -> BloscCodec:
    """Blosc/zstd level 3 with byte shuffle: fast, and ~2-4x on CT/MR volumes."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


#: the zarr access modes :meth:`Store.open` passes on
_Mode = Literal["r", "r+", "a", "w", "w-"]


def _voxflow_block(node: zarr.Group | zarr.Array[Any]) -> Mapping[str, Any]:
    """The ``voxflow`` attribute block of a group or array (``{}`` when it has none)."""
    return cast("Mapping[str, Any]", node.attrs.get("voxflow", {}))


def open_array_for_write(path: PathLikeStr) -> zarr.Array[Any]:
    """Reopen an existing array to write into it, with every chunk written (even all-fill ones)."""
    return zarr.open_array(str(path), mode="r+", zarr_format=3).with_config(_WRITE_CONFIG)


def is_checksummed(arr: zarr.Array[Any]) -> bool:
    """Whether ``arr`` was written by a voxflow that checksums chunks (and writes every chunk)."""
    return any(isinstance(c, Crc32cCodec) for c in arr.compressors)


def _damaged(what: str, exc: BaseException, fix: str) -> StoreDamagedError:
    detail = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
    return StoreDamagedError(
        f"stored data must be readable; {what} is damaged ({type(exc).__name__}: {detail[0]}). {fix}"
    )


class _CheckedArray:
    """A zarr array whose failed reads (checksum, codec, metadata) raise StoreDamagedError naming it."""

    def __init__(self, arr: zarr.Array[Any], where: str, fix: str):
        self.arr, self.where, self.fix = arr, where, fix
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.arr[key])
        except _READ_ERRORS as e:
            raise _damaged(self.where, e, self.fix) from e


def label_dtype_for(max_value: int) -> np.dtype:
    """Smallest unsigned integer dtype holding ``0..max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


@dataclass(frozen=True, kw_only=True)
class DatasetMeta:
    """Dataset-level metadata at the store root.

    ``labels`` maps a class name to its integer value, or, for region-based datasets (nnU-Net
    style, e.g. BraTS), to the tuple of label values forming the region; ``regions_class_order``
    then gives the value each region is written back as.
    """

    channel_names: tuple[str, ...]
    labels: dict[str, Any]
    regions_class_order: tuple[int, ...] | None = None
    file_ending: str = ".nii.gz"
    name: str = ""
    kind: str = "dataset"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_names", tuple(str(c) for c in self.channel_names))
        labels = {}
        for k, v in dict(self.labels).items():
            labels[str(k)] = tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)
        object.__setattr__(self, "labels", labels)
        if self.regions_class_order is not None:
            object.__setattr__(self, "regions_class_order", tuple(int(x) for x in self.regions_class_order))
        if not self.channel_names:
            raise LayoutError("a dataset needs at least one channel name")
        if self.kind not in ("dataset", "preprocessed", "prediction"):
            raise LayoutError(f"kind must be dataset, preprocessed or prediction; got {self.kind!r}")

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, tuple) for v in self.labels.values())

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every integer label value declared (background included), sorted."""
        vals: set[int] = set()
        for v in self.labels.values():
            vals.update(v if isinstance(v, tuple) else (v,))
        return tuple(sorted(vals))

    def to_dict(self) -> dict[str, Any]:
        return {**_serial.to_jsonable(self), "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetMeta:
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise LayoutError(f"store format_version {version} is newer than this voxflow ({FORMAT_VERSION})")
        return _serial.from_dict(cls, d, error=LayoutError)


def ngff_multiscales(geometry: Geometry, *, name: str, path: str = "image") -> dict[str, Any]:
    """OME-NGFF 0.5 ``ome`` attributes describing one (C, Z, Y, X) array at one scale level
    (complete cases carry the full view, pyramid and labels included: :mod:`voxflow._ngff`)."""
    from voxflow._ngff import NGFF_VERSION, multiscales_metadata

    return {
        "version": NGFF_VERSION,
        "multiscales": [
            multiscales_metadata(
                name=name,
                paths=[path],
                spacing_zyx=geometry.spacing_zyx,
                origin_zyx=geometry.origin_zyx,
                factors=[(1, 1, 1)],
                channel=True,
                mean=True,
            )
        ],
    }


class Store:
    """A voxflow Zarr store (dataset, preprocessed or prediction); see the module docstring."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        try:
            self.meta = DatasetMeta.from_dict(cast("Mapping[str, Any]", group.attrs["voxflow"]))
        except KeyError:
            raise LayoutError(
                f"{path} is not a voxflow store (no 'voxflow' root attributes). Create it with `voxflow convert`."
            ) from None

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: PathLikeStr, meta: DatasetMeta, *, overwrite: bool = False) -> Store:
        """Create a store, or reopen an existing one with the same metadata (resume)."""
        path = Path(path)
        if path.exists() and overwrite:
            shutil.rmtree(path)
        if path.exists() and (path / "zarr.json").exists():
            if not _json_ok(path / "zarr.json"):
                log.warning("%s: the root zarr.json is damaged; writing it again (cases are checked one by one)", path)
                (path / "zarr.json").unlink()
                group = zarr.open_group(str(path), mode="a", zarr_format=3)
                group.attrs["voxflow"] = meta.to_dict()
            store = cls.open(path, mode="r+")
            if store.meta.to_dict() != meta.to_dict():
                old, new = store.meta.to_dict(), meta.to_dict()
                diff = sorted(k for k in new if old.get(k) != new.get(k))
                raise LayoutError(
                    f"{path} already holds a store with different metadata (fields {diff}); "
                    f"pass --overwrite to replace it or choose another output path."
                )
            return store
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        group.attrs["voxflow"] = meta.to_dict()
        group.require_group("cases")
        return cls(group, path)

    @classmethod
    def open(cls, path: PathLikeStr, mode: _Mode = "r") -> Store:
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise IncompleteStoreError(f"{path} is not a Zarr v3 store (no zarr.json); create it first.")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except _READ_ERRORS as e:
            raise _damaged(
                f"the store metadata {path / 'zarr.json'}",
                e,
                "Rerun the command that wrote the store (its cases are kept and checked), or "
                "pass --overwrite to write it afresh.",
            ) from e
        return cls(group, path)

    # ------------------------------------------------------------------ listing
    def all_case_ids(self) -> list[str]:
        """Every case folder present, complete, incomplete or damaged, sorted (no metadata parsed)."""
        cases = self.path / "cases"
        if not cases.is_dir():
            return []
        return sorted(p.name for p in cases.iterdir() if p.is_dir() and _CASE_ID.match(p.name))

    def case_ids(self) -> list[str]:
        """Complete cases, sorted. Incomplete ones are invisible to readers."""
        return [c for c in self.all_case_ids() if self.is_complete(c)]

    def incomplete_case_ids(self) -> list[str]:
        return [c for c in self.all_case_ids() if not self.is_complete(c)]

    def is_complete(self, case_id: str) -> bool:
        """Whether the case's completion marker is set (``False`` if its metadata is unreadable)."""
        try:
            return bool(_voxflow_block(self.group[f"cases/{case_id}"]).get("complete", False))
        except _READ_ERRORS:
            return False

    def metadata_intact(self, case_id: str) -> bool:
        """Whether the case's and each of its arrays' ``zarr.json`` parse (cheap: no chunk read)."""
        folder = self.path / "cases" / case_id
        if not _json_ok(folder / "zarr.json"):
            return False
        return all(_json_ok(p / "zarr.json") for p in folder.iterdir() if p.is_dir())

    def resumable_case_ids(self) -> list[str]:
        """Complete cases with intact metadata: what a resuming writer may skip (it redoes the rest)."""
        out = []
        for cid in self.case_ids():
            if self.metadata_intact(cid):
                out.append(cid)
            else:
                log.warning("%s: case %r has damaged metadata (zarr.json); it is redone", self.path, cid)
        return out

    def expect_cases(self, case_ids: Iterable[str], *, source: PathLikeStr | None = None) -> None:
        """Record that a writer was asked for ``case_ids`` (with any recorded before), so readers can
        tell a finished store from one whose writer stopped before starting some cases. ``source``:
        this store is meant to hold every complete case of that store, also ones added to it later."""
        block: dict[str, Any] = dict(self._expected_block())
        block["cases"] = sorted(set(block.get("cases", [])) | set(case_ids))
        if source is not None:
            block["every_case_of"] = str(Path(source).absolute())
        self.group.attrs[_EXPECTED] = block

    def expected_case_ids(self) -> list[str]:
        """Cases recorded by :meth:`expect_cases`, and every complete case of its ``source`` store."""
        block = self._expected_block()
        ids = {str(c) for c in block.get("cases", [])}
        source = block.get("every_case_of")
        if source and Path(source, "zarr.json").is_file():
            try:
                ids |= set(Store.open(source).case_ids())
            except LayoutError:
                pass  # a damaged source is reported by the commands that read it
        return sorted(ids)

    def _expected_block(self) -> dict[str, Any]:
        block: Any = self.group.attrs.get(_EXPECTED, {})
        return block if isinstance(block, dict) else {}

    def unfinished_case_ids(self) -> list[str]:
        """Cases present but incomplete, or expected (:meth:`expect_cases`) but not complete; sorted."""
        return sorted(set(self.incomplete_case_ids()) | (set(self.expected_case_ids()) - set(self.case_ids())))

    # ------------------------------------------------------------------ reading
    def case_group(self, case_id: str) -> zarr.Group:
        try:
            return cast(zarr.Group, self.group[f"cases/{case_id}"])
        except KeyError:
            raise CaseNotFoundError(
                f"case {case_id!r} is not in {self.path}; it has {len(self.all_case_ids())} cases "
                f"(`voxflow info {self.path}` lists them)."
            ) from None
        except _READ_ERRORS as e:
            raise _damaged(f"the metadata of case {case_id!r} in {self.path}", e, self._fix()) from e

    def _fix(self) -> str:
        return (
            f"Rerun the command that wrote {self.path} (it redoes damaged cases); "
            f"`voxflow info --verify {self.path}` checks every case."
        )

    def _require_complete(self, case_id: str) -> zarr.Group:
        g = self.case_group(case_id)
        if not _voxflow_block(g).get("complete", False):
            raise IncompleteStoreError(
                f"case {case_id!r} in {self.path} is incomplete (an interrupted write); rerun the "
                f"command that writes it."
            )
        return g

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        """The case's ``voxflow`` attribute block (geometry, provenance, stage extras)."""
        return dict(_voxflow_block(self.case_group(case_id)))

    def geometry(self, case_id: str) -> Geometry:
        return Geometry.from_dict(self.case_attrs(case_id)["geometry"])

    def has_array(self, case_id: str, name: str) -> bool:
        return name in self.case_group(case_id)

    def zarr_array(self, case_id: str, name: str) -> zarr.Array[Any]:
        """One array of a complete case; :class:`StoreDamagedError` if its metadata is unreadable or
        (checksummed arrays) a chunk file is missing."""
        g = self._require_complete(case_id)
        try:
            if name not in g:
                raise CaseNotFoundError(f"case {case_id!r} in {self.path} has no {name!r} array")
            arr: Any = g[name]
        except _READ_ERRORS as e:
            raise _damaged(f"the metadata of array {name!r} of case {case_id!r} in {self.path}", e, self._fix()) from e
        if is_checksummed(arr) and arr.nchunks_initialized != arr.nchunks:
            raise StoreDamagedError(
                f"every chunk of array {name!r} of case {case_id!r} in {self.path} must be on disk; "
                f"{arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunk files are missing. "
                f"{self._fix()}"
            )
        return cast("zarr.Array[Any]", arr)

    def array(self, case_id: str, name: str, *, chunks: tuple[int, ...] | None = None) -> da.Array:
        """A lazy dask view of one array of a complete case, chunked like the store (or ``chunks``:
        whole multiples of the store's chunks give one read task per dask chunk). A chunk that fails
        to decode (checksum, codec) raises :class:`StoreDamagedError` naming the case and array."""
        arr = self.zarr_array(case_id, name)
        chunks = arr.chunks if chunks is None else chunks
        checked = _CheckedArray(arr, f"array {name!r} of case {case_id!r} in {self.path}", self._fix())
        token = tokenize(str(self.path), case_id, name, arr.shape, str(arr.dtype), chunks)
        lazy: da.Array = da.from_array(
            checked,
            chunks=chunks,
            name=f"from-zarr-{token}",
            asarray=False,
            fancy=False,
            meta=np.empty((0,) * arr.ndim, dtype=arr.dtype),
        )
        return lazy

    def image(self, case_id: str, *, chunks: tuple[int, ...] | None = None) -> da.Array:
        """(C, Z, Y, X) image of a case, lazy (chunked like the store, or ``chunks``)."""
        return self.array(case_id, "image", chunks=chunks)

    def label(self, case_id: str) -> da.Array | None:
        """(Z, Y, X) label of a case, lazy; ``None`` for unlabelled cases."""
        g = self._require_complete(case_id)
        return self.array(case_id, "label") if "label" in g else None

    # ------------------------------------------------------------------ writing
    def begin_case(self, case_id: str, *, geometry: Geometry, attrs: Mapping[str, Any] | None = None) -> zarr.Group:
        """Start (or restart) writing a case: drops any old copy, marks it incomplete."""
        if not _CASE_ID.match(case_id):
            raise LayoutError(
                f"case id {case_id!r} must start with a letter or digit and use only letters, digits, '.', '_' and '-'."
            )
        cases = self.group.require_group("cases")
        self.delete_case(case_id)
        block = {"complete": False, "geometry": geometry.to_dict(), **dict(attrs or {})}
        return cases.create_group(case_id, attributes={"voxflow": block})  # one metadata write

    def create_array(
        self,
        case_id: str,
        name: str,
        *,
        shape: Sequence[int],
        dtype: Any,
        chunks: Sequence[int],
        fill_value: Any = 0,
        dimension_names: Sequence[str] | None = None,
    ) -> zarr.Array[Any]:
        """Create a compressed array in a case being written (chunks clipped to the shape)."""
        g = self.case_group(case_id)
        chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape, strict=True))
        dims = dimension_names or _DIMS.get(name)
        if dims is not None and len(dims) != len(shape):
            dims = None
        return g.create_array(
            name,
            shape=tuple(int(s) for s in shape),
            dtype=dtype,
            chunks=chunks,
            compressors=(default_compressor(), Crc32cCodec()),
            fill_value=fill_value,
            dimension_names=dims,
            overwrite=True,
            config=_WRITE_CONFIG,
        )

    def update_case_attrs(self, case_id: str, **values: Any) -> None:
        g = self.case_group(case_id)
        block = dict(_voxflow_block(g))
        block.update(values)
        g.attrs["voxflow"] = block

    def mark_complete(self, case_id: str) -> None:
        """Write the case's OME-NGFF metadata and pyramid levels (:mod:`voxflow._ngff`), then the
        completion marker (with the NGFF metadata, in the case's last metadata write); call only
        after every array of the case is written."""
        self.write_ngff(case_id, complete=True)

    def write_ngff(self, case_id: str, *, complete: bool | None = None) -> None:
        """(Re)write the OME-NGFF view of a case from its arrays: metadata and pyramid levels;
        ``complete`` also sets the completion marker in the same last write."""
        from voxflow._ngff import write_case_ngff

        group = self.case_group(case_id)
        block: dict[str, Any] = dict(group.attrs.get("voxflow", {}))  # type: ignore[arg-type]
        extra = None if complete is None else {"voxflow": {**block, "complete": bool(complete)}}
        write_case_ngff(
            group,
            case_id=case_id,
            geometry=Geometry.from_dict(block["geometry"]),
            labels=self.meta.labels,
            regions_class_order=self.meta.regions_class_order,
            kind=self.meta.kind,
            attrs=extra,
        )

    def delete_case(self, case_id: str) -> None:
        """Remove a case (also one whose metadata is damaged)."""
        folder = self.path / "cases" / case_id
        if folder.exists():
            shutil.rmtree(folder)

    # ------------------------------------------------------------------ integrity
    def verify_case(self, case_id: str) -> dict[str, str]:
        """Read every chunk of every array of a case: ``{array: problem}``, empty when intact.

        Checks that the metadata parses, that every chunk file exists (checksummed arrays; older
        arrays may legitimately lack all-fill chunks) and that every chunk decodes (CRC32C where
        present). Memory: one chunk at a time."""
        folder = self.path / "cases" / case_id
        if not _json_ok(folder / "zarr.json"):
            return {"(case)": "zarr.json is unreadable"}
        problems: dict[str, str] = {}
        _verify_group(folder, folder, problems)
        return problems

    # ------------------------------------------------------------------ misc
    def nbytes_on_disk(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, kind={self.meta.kind!r}, cases={len(self.case_ids())})"


def _json_ok(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def _verify_group(folder: Path, case_folder: Path, problems: dict[str, str]) -> None:
    """Verify every array below ``folder``, descending into subgroups (the OME-NGFF ``labels/`` and
    ``levels/`` groups); problems are keyed by the path relative to the case."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = sub.relative_to(case_folder).as_posix()
        try:
            node_type = json.loads((sub / "zarr.json").read_bytes()).get("node_type")
        except (OSError, ValueError, AttributeError) as e:
            problems[name] = f"zarr.json is unreadable ({type(e).__name__})"
            continue
        if node_type == "group":
            _verify_group(sub, case_folder, problems)
            continue
        try:
            arr = zarr.open_array(str(sub), mode="r", zarr_format=3)
        except _READ_ERRORS as e:
            problems[name] = f"zarr.json is unreadable ({type(e).__name__})"
            continue
        problem = _verify_array(arr, sub)
        if problem:
            problems[name] = problem


def _verify_array(arr: zarr.Array[Any], folder: Path) -> str | None:
    """The first problem of one array (missing chunk files, a chunk that fails to decode), or None."""
    grid = [range(n) for n in arr.cdata_shape]
    checksummed = is_checksummed(arr)
    missing = []
    for coords in itertools.product(*grid):
        key = arr.metadata.encode_chunk_key(coords)
        if not (folder / key).is_file():
            missing.append(coords)
            continue
        region = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, arr.chunks, arr.shape, strict=True))
        try:
            arr[region]
        except _READ_ERRORS as e:
            return f"chunk {key} does not decode ({type(e).__name__}: {str(e)[:120]})"
    if missing and checksummed:
        return (
            f"{len(missing)} of {arr.nchunks} chunk files missing (first: {arr.metadata.encode_chunk_key(missing[0])})"
        )
    return None


def open_case(store: Store | PathLikeStr, case_id: str, *, name: str = "image") -> Any:
    """A lazy, dask-backed ``xarray.DataArray`` of one case for notebooks and plotting.

    Dims are (c, z, y, x) for images (``z, y, x`` for labels), coordinates are physical positions
    in mm along each axis (exact for axis-aligned images; the full direction matrix is in
    ``attrs["geometry"]``), and ``c`` holds the channel names.
    """
    import xarray as xr

    st = store if isinstance(store, Store) else Store.open(store)
    arr = st.array(case_id, name)
    geom = st.geometry(case_id)
    coords: dict[str, Any] = dict(geom.axis_coords_mm()) if tuple(arr.shape[-3:]) == geom.shape_zyx else {}
    dims: tuple[str, ...] = _DIMS.get(name, ("c", "z", "y", "x")[-arr.ndim :])
    if dims[0] == "c" and name == "image":
        coords["c"] = list(st.meta.channel_names)
    attrs = {"geometry": geom.to_dict(), "case_id": case_id, "store": str(st.path), "units": "mm"}
    return xr.DataArray(arr, dims=dims, coords=coords, name=name, attrs=attrs)

"""Read and validate ``dataset.json`` (nnU-Net v2 and MSD), as ``plans.json`` is validated.

A wrong field is a :class:`ConversionError` naming the file, the field, the expected form and
what was found, instead of a ``ValueError`` from deep inside the reader:

>>> parse_nnunet(Path("dataset.json"), {"channel_names": {"a": "CT"}})  # doctest: +SKIP
ConversionError: channel_names in 'dataset.json' must map channel numbers "0", "1", ... to names,
e.g. {"0": "CT"}; got key 'a'. Fix dataset.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxflow.errors import ConversionError

__all__ = ["MsdJson", "NnunetJson", "is_msd_meta", "parse_msd", "parse_nnunet", "read_json"]


@dataclass(frozen=True)
class NnunetJson:
    """The fields of an nnU-Net v2 dataset.json that voxflow uses, validated."""

    channel_names: tuple[str, ...]
    labels: dict[str, int | tuple[int, ...]]
    file_ending: str
    regions_class_order: tuple[int, ...] | None
    name: str
    num_training: int | None


@dataclass(frozen=True)
class MsdJson:
    """The fields of an MSD dataset.json that voxflow uses, validated (paths relative to the root)."""

    channel_names: tuple[str, ...]
    labels: dict[str, int]
    training: tuple[tuple[str, str | None], ...]  # (image, label)
    test: tuple[str, ...]
    name: str


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a ConversionError naming the file if it is not one)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{str(path)!r} must be valid JSON; {e}. Fix the file.") from None
    if not isinstance(data, dict):
        raise ConversionError(
            f"{str(path)!r} must hold a JSON object ({{...}}); got a {type(data).__name__}. Fix the file."
        )
    return data


def is_msd_meta(meta: dict[str, Any]) -> bool:
    """An MSD dataset.json: ``modality`` and a ``training`` list."""
    return "modality" in meta and "training" in meta


def _fail(path: Path, field: str, expected: str, got: str) -> ConversionError:
    return ConversionError(f"{field} in {str(path)!r} must be {expected}; got {got}. Fix dataset.json.")


def _require(meta: dict[str, Any], key: str, path: Path, expected: str) -> Any:
    if key not in meta:
        raise ConversionError(f"{key} is required in {str(path)!r}: it must be {expected}. Add it to dataset.json.")
    return meta[key]


def _index(key: Any) -> int | None:
    """``"3"`` or ``3`` -> 3 (a non-negative integer); anything else -> None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return None


def _channels(value: Any, path: Path, field: str) -> tuple[str, ...]:
    expected = 'an object mapping channel numbers "0", "1", ... to names, e.g. {"0": "CT"}'
    if not isinstance(value, dict) or not value:
        raise _fail(path, field, expected, f"{value!r}")
    by_index: dict[int, str] = {}
    for k, v in value.items():
        i = _index(k)
        if i is None:
            raise _fail(path, field, expected, f"key {k!r}")
        if not isinstance(v, str) or not v:
            raise _fail(path, f"{field}[{k!r}]", "a channel name (a non-empty string)", f"{v!r}")
        by_index[i] = v
    if sorted(by_index) != list(range(len(by_index))):
        raise _fail(path, field, f"{expected}, numbered from 0 without gaps", f"channels {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _nnunet_labels(value: Any, path: Path) -> dict[str, int | tuple[int, ...]]:
    expected = (
        'an object mapping label names to integer values, e.g. {"background": 0, "tumor": 1} '
        "(or to lists of values for regions)"
    )
    if not isinstance(value, dict) or not value:
        raise _fail(path, "labels", expected, f"a {type(value).__name__}: {value!r}"[:200])
    labels: dict[str, int | tuple[int, ...]] = {}
    for name, v in value.items():
        if isinstance(v, list) and v and all(_index(x) is not None for x in v):
            labels[str(name)] = tuple(int(_index(x)) for x in v)  # type: ignore[arg-type]
        elif _index(v) is not None:
            labels[str(name)] = int(_index(v))  # type: ignore[arg-type]
        else:
            raise _fail(path, f"labels[{name!r}]", "a non-negative integer (or a list of them for a region)", f"{v!r}")
    plain = [v for v in labels.values() if isinstance(v, int)]
    if 0 not in plain:
        raise _fail(path, "labels", f"{expected}, with the background as 0", f"no label with value 0: {value!r}")
    dup = sorted({v for v in plain if plain.count(v) > 1})
    if dup:
        names = [k for k, v in labels.items() if v in dup]
        raise _fail(path, "labels", "one name per value", f"value(s) {dup} for {names}")
    return labels


def parse_nnunet(path: Path, meta: dict[str, Any]) -> NnunetJson:
    """Validate an nnU-Net v2 dataset.json (already read from ``path``)."""
    if "modality" in meta and "channel_names" not in meta:
        raise ConversionError(
            f"training is required in {str(path)!r}: an MSD dataset.json (it has 'modality') "
            f'must list its cases as [{{"image": ..., "label": ...}}, ...]; an nnU-Net one '
            f"needs 'channel_names' instead. Fix dataset.json."
        )
    chans = _channels(_require(meta, "channel_names", path, 'an object such as {"0": "CT"}'), path, "channel_names")
    labels = _nnunet_labels(_require(meta, "labels", path, 'an object such as {"background": 0, "tumor": 1}'), path)
    ending = _require(meta, "file_ending", path, 'the image file ending, e.g. ".nii.gz"')
    if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
        raise _fail(path, "file_ending", 'a file ending starting with ".", e.g. ".nii.gz"', f"{ending!r}")
    rco = meta.get("regions_class_order")
    if rco is not None and not (isinstance(rco, list) and all(_index(x) is not None for x in rco)):
        raise _fail(path, "regions_class_order", "a list of label values, one per region", f"{rco!r}")
    n_train = meta.get("numTraining")
    if n_train is not None and _index(n_train) is None:
        raise _fail(path, "numTraining", "the number of training cases (an integer)", f"{n_train!r}")
    return NnunetJson(
        chans,
        labels,
        ending,
        tuple(int(x) for x in rco) if rco else None,
        str(meta.get("name", path.parent.name)),
        _index(n_train) if n_train is not None else None,
    )


def _msd_labels(value: Any, path: Path) -> dict[str, int]:
    expected = 'an object mapping label values "0", "1", ... to names, e.g. {"0": "background", "1": "tumour"}'
    if not isinstance(value, dict) or not value:
        raise _fail(path, "labels", expected, f"{value!r}"[:200])
    out: dict[str, int] = {}
    for k, name in value.items():
        i = _index(k)
        if i is None:
            raise _fail(path, "labels", expected, f"key {k!r}")
        if not isinstance(name, str) or not name:
            raise _fail(path, f"labels[{k!r}]", "a label name (a non-empty string)", f"{name!r}")
        out[name] = i
    if 0 not in out.values():
        raise _fail(path, "labels", f'{expected}, with the background as "0"', f"no value 0: {value!r}")
    return out


def _msd_entry(e: Any, path: Path, field: str, *, need_label: bool) -> tuple[str, str | None]:
    if isinstance(e, str) and not need_label:
        return e, None
    form = (
        '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}'
        if need_label
        else 'an image path, or {"image": "./imagesTs/x.nii.gz"}'
    )
    if (
        not isinstance(e, dict)
        or not isinstance(e.get("image"), str)
        or (need_label and not isinstance(e.get("label"), str))
    ):
        raise _fail(path, field, f"a list of entries like {form}", f"entry {e!r}"[:200])
    return e["image"], e.get("label") if isinstance(e.get("label"), str) else None


def parse_msd(path: Path, meta: dict[str, Any]) -> MsdJson:
    """Validate a Medical Segmentation Decathlon dataset.json (already read from ``path``)."""
    chans = _channels(meta["modality"], path, "modality")
    labels = _msd_labels(meta.get("labels", {"0": "background"}), path)
    training, test = meta["training"], meta.get("test", [])
    for field, entries in (("training", training), ("test", test)):
        if not isinstance(entries, list):
            raise _fail(path, field, "a list of cases", f"{entries!r}"[:200])
    return MsdJson(
        chans,
        labels,
        tuple(_msd_entry(e, path, "training", need_label=True) for e in training),
        tuple(_msd_entry(e, path, "test", need_label=False)[0] for e in test),
        str(meta.get("name", path.parent.name)),
    )

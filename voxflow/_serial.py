"""Validated frozen dataclasses ⇄ JSON, and atomic file writes: the one place for both.

Used by :class:`~voxflow.fingerprint.Fingerprint`, :class:`~voxflow.plan.Plan`,
:class:`~voxflow.postprocess.PostprocessingSpec`, :class:`~voxflow.store.DatasetMeta` and the
checkpoints. The rules:

* :func:`from_dict` builds a dataclass from a mapping: unknown keys (with a close-match hint) and
  missing keys are refused, and an error raised while building is prefixed with the field path
  (``configurations.3d_fullres.train.lr must be > 0``), so nested ``from_dict`` calls spell out the
  whole path. Errors are of the caller's class (``error=``, default :class:`PlanError`).
* Closed sets of options are ``Literal`` types on the dataclass fields; :func:`check_choices`
  validates every such field of an instance (one call in ``__post_init__``), suggesting the closest
  option. :func:`check_choice` does the same for one value and an explicit set of options.
* :func:`number_tuple` coerces JSON lists to tuples of ints or floats with length and range checks.
* :func:`to_jsonable` turns a dataclass tree into JSON types (tuples to lists, keys to strings).
* :func:`atomic_write` writes through a temporary file in the same folder, fsyncs it, replaces the
  target with ``os.replace`` and fsyncs the folder: after a crash the path holds the old or the new
  content, never half a file. :func:`atomic_write_json` and :func:`load_json_file` wrap it for JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import tempfile
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from voxflow._types import PathLikeStr
from voxflow.errors import PlanError

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "check_choice",
    "check_choices",
    "choices",
    "coerce",
    "from_dict",
    "load_json_file",
    "number_tuple",
    "set_field",
    "to_jsonable",
]

T = TypeVar("T")
ErrorType = type[Exception]


# ------------------------------------------------------------------------------------ choices
def choices(literal: Any) -> tuple[Any, ...]:
    """The options of a ``Literal[...]`` type, in declaration order."""
    return typing.get_args(literal)


def check_choice(value: Any, options: Iterable[Any], name: str, *, error: ErrorType = PlanError) -> Any:
    """``value`` if it is one of ``options``; else ``error`` naming the field and the closest option."""
    opts = list(options)
    if value not in opts:
        close = difflib.get_close_matches(str(value), [str(o) for o in opts], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise error(f"{name} must be one of {opts}; got {value!r}.{hint}")
    return value


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, typing.get_args(hints[f.name]))
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    )


def check_choices(obj: Any, *, error: ErrorType = PlanError) -> None:
    """Check every ``Literal``-typed field of the dataclass instance ``obj`` (:func:`check_choice`)."""
    for name, options in _literal_fields(type(obj)):  # type: ignore[arg-type]
        check_choice(getattr(obj, name), options, name, error=error)


# ------------------------------------------------------------------------------------ coercion
def set_field(obj: Any, name: str, value: Any) -> None:
    """Assign a normalised value to a field of a frozen dataclass (from its ``__post_init__``)."""
    object.__setattr__(obj, name, value)


def number_tuple(
    value: Any,
    name: str,
    *,
    cast: type = int,
    length: int | None = None,
    minimum: int | None = None,
    positive: bool = False,
    axes: str = "",
    error: ErrorType = PlanError,
) -> tuple[Any, ...]:
    """``value`` (a JSON list) as a tuple of ``cast`` (``int`` or ``float``).

    ``length`` fixes the number of entries (``axes`` names them, e.g. ``"(z, y, x)"``); integers
    must be integral (``2.5`` is refused, not truncated) and at least ``minimum``; floats, with
    ``positive``, finite and > 0.
    """
    kind = "integers" if cast is int else "numbers"
    where = f" {axes}" if axes else ""
    count = f"{length} " if length is not None else ""
    try:
        items = list(value)
        out = tuple(cast(v) for v in items)
    except (TypeError, ValueError):
        raise error(f"{name} must be a list of {count}{kind}{where}; got {value!r}") from None
    if length is not None and len(out) != length:
        raise error(f"{name} must have {length} entries{where}; got {value!r}")
    if cast is int:
        if any(float(v) != float(w) for v, w in zip(out, items, strict=True)):
            raise error(f"{name} must hold integers; got {value!r}")
        if minimum is not None and any(v < minimum for v in out):
            raise error(f"{name} must hold integers >= {minimum}; got {value!r}")
    elif positive and any(not math.isfinite(v) or v <= 0 for v in out):
        raise error(f"{name} must hold positive finite numbers; got {value!r}")
    return out


# ------------------------------------------------------------------------------------ dataclass <-> dict
def _required(cls: type) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def from_dict(cls: type[T], data: Any, where: str = "", *, error: ErrorType = PlanError) -> T:
    """Build dataclass ``cls`` from a mapping (see the module docstring for the error rules).

    ``where`` is the field path of ``data`` in the document (``"configurations.2d"``; ``""`` at the
    top): it prefixes every message.
    """
    label = where or cls.__name__
    if not isinstance(data, Mapping):
        raise error(f"{label} must be an object; got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        hints = [difflib.get_close_matches(str(u), names, n=1) for u in unknown]
        hint = "".join(f" ({u!r}: did you mean {h[0]!r}?)" for u, h in zip(unknown, hints, strict=True) if h)
        raise error(f"{label}: unknown field(s) {unknown}{hint}; expected a subset of {sorted(names)}")
    missing = sorted(_required(cls) - set(data))
    if missing:
        raise error(f"{label}: missing field(s) {missing}")
    try:
        return cls(**data)
    except error as e:
        msg = str(e)
        raise type(e)(f"{where}.{msg}" if where and not msg.startswith(where) else msg) from None
    except (TypeError, ValueError, KeyError) as e:  # a bare builtin from a field's own coercion
        raise error(f"{label}: {e}") from None


def coerce(cls: type[T], value: Any, where: str, *, error: ErrorType = PlanError) -> T:
    """``value`` if it already is a ``cls``, else :func:`from_dict` of it."""
    return value if isinstance(value, cls) else from_dict(cls, value, where, error=error)


def to_jsonable(obj: Any) -> Any:
    """A dataclass tree as JSON types: dataclasses to dicts (field order), tuples to lists, keys to str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------ files
def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLikeStr, write: Callable[[IO[Any]], object], *, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, ``os.replace`` it onto
    ``path`` and fsync the folder: readers and crashes see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: PathLikeStr, data: Any) -> None:
    """Write ``data`` as indented JSON with :func:`atomic_write`."""

    def write(f: IO[Any]) -> None:
        json.dump(data, f, indent=2)
        f.write("\n")

    atomic_write(path, write)


def load_json_file(
    path: PathLikeStr, build: Callable[[Any], T], *, what: str, command: str, error: ErrorType = PlanError
) -> T:
    """Read a JSON file and ``build(data)``; every failure is an ``error`` naming the file
    (a missing file also says which ``command`` writes it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist; run `{command}` first.") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} file {path}: {e}") from None
    try:
        return build(data)
    except error as e:
        raise type(e)(f"{path}: {e}") from None

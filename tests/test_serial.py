"""voxflow._serial: dataclass <-> JSON with field-path errors, Literal choices, atomic writes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from voxflow import _serial
from voxflow.errors import LayoutError, PlanError


@dataclass(frozen=True, kw_only=True)
class Inner:
    mode: Literal["fast", "exact"] = "fast"
    size_zyx: tuple[int, int, int]

    def __post_init__(self) -> None:
        _serial.check_choices(self)
        _serial.set_field(
            self, "size_zyx", _serial.number_tuple(self.size_zyx, "size_zyx", length=3, minimum=1, axes="(z, y, x)")
        )


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    parts: dict[str, Inner] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _serial.set_field(self, "parts", {k: _serial.coerce(Inner, v, f"parts.{k}") for k, v in self.parts.items()})


def test_round_trip_and_tuples() -> None:
    obj = Outer(name="a", parts={"x": Inner(size_zyx=[1, 2, 3])})
    data = _serial.to_jsonable(obj)
    assert data == {"name": "a", "parts": {"x": {"mode": "fast", "size_zyx": [1, 2, 3]}}}
    assert _serial.from_dict(Outer, json.loads(json.dumps(data))) == obj


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a", "parts": {"x": {"size_zyx": [1, 2]}}}, r"^parts\.x\.size_zyx must have 3 entries \(z, y, x\)"),
        ({"name": "a", "parts": {"x": {"size_zyx": [1, 2.5, 3]}}}, r"^parts\.x\.size_zyx must hold integers"),
        ({"name": "a", "parts": {"x": {"size_zyx": [1, 0, 3]}}}, r"^parts\.x\.size_zyx must hold integers >= 1"),
        ({"name": "a", "parts": {"x": {"size_zyx": "abc"}}}, r"^parts\.x\.size_zyx must be a list of 3 integers"),
        (
            {"name": "a", "parts": {"x": {"size_zyx": [1, 1, 1], "mode": "exakt"}}},
            r"^parts\.x\.mode must be one of \['fast', 'exact'\]; got 'exakt'\. Did you mean 'exact'\?",
        ),
        (
            {"name": "a", "parts": {"x": {"sise_zyx": [1, 1, 1]}}},
            r"^parts\.x: unknown field\(s\) \['sise_zyx'\] \('sise_zyx': did you mean 'size_zyx'\?\)",
        ),
        ({"name": "a", "parts": {"x": {}}}, r"^parts\.x: missing field\(s\) \['size_zyx'\]"),
        ({"name": "a", "parts": {"x": [1]}}, r"^parts\.x must be an object; got list"),
        ({"parts": {}}, r"^Outer: missing field\(s\) \['name'\]"),
    ],
)
def test_errors_name_the_field_path(data: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        _serial.from_dict(Outer, data)


def test_error_class_is_the_callers() -> None:
    with pytest.raises(LayoutError, match="unknown field"):
        _serial.from_dict(Inner, {"size_zyx": [1, 1, 1], "x": 1}, error=LayoutError)


def test_float_tuples() -> None:
    assert _serial.number_tuple([1, "2.5", 3], "s", cast=float, length=3, positive=True) == (1.0, 2.5, 3.0)
    with pytest.raises(PlanError, match="s must hold positive finite numbers"):
        _serial.number_tuple([1, float("nan"), 3], "s", cast=float, positive=True)


def test_atomic_write_json_and_load(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(_serial.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "sub" / "x.json"
    _serial.atomic_write_json(path, {"a": [1, 2]})
    assert len(synced) == 2  # the file and its folder
    assert _serial.load_json_file(path, lambda d: d["a"], what="x", command="make x") == [1, 2]
    with pytest.raises(PlanError, match=r"x file .*missing\.json does not exist; run `make x` first"):
        _serial.load_json_file(tmp_path / "missing.json", dict, what="x", command="make x")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="bad.json is not valid JSON"):
        _serial.load_json_file(tmp_path / "bad.json", dict, what="x", command="make x")
    with pytest.raises(PlanError, match=r"x\.json: .*missing field"):
        _serial.load_json_file(path, lambda d: _serial.from_dict(Inner, {}), what="x", command="make x")


def test_atomic_write_failure_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "x.bin"
    _serial.atomic_write(path, lambda f: f.write(b"old"), binary=True)

    def broken(f) -> None:
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _serial.atomic_write(path, broken, binary=True)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # no temporary file left

"""The error tree: every user-facing error is a VoxflowError that also is the builtin it refines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import voxflow.errors as E
from voxflow.data.augment import AugmentConfig
from voxflow.geometry import Geometry
from voxflow.train._steps import resolve_precision

ROOT = Path(__file__).resolve().parents[1] / "voxflow"

#: builtin raises that stay builtin: programming errors and protocols, not input a user can fix.
#: (file, exception) -> how many; a new bare raise elsewhere fails the test below.
INTERNAL = {
    ("data/loader.py", "RuntimeError"): 1,  # a loader thread died without reporting an error (a bug)
    ("data/loader.py", "TypeError"): 1,  # len() of an infinite loader: the Python protocol's error
    ("io/_volume.py", "NotImplementedError"): 1,  # abstract method
    ("testing.py", "RuntimeError"): 1,  # test helper: a benchmark/test subprocess failed
    ("train/losses.py", "ValueError"): 4,  # the trainer builds network, loader and loss from one spec
    ("infer/_options.py", "TypeError"): 1,  # an unknown keyword of predict(): Python's error for a wrong keyword
    # prediction engine, being refactored in parallel; converted after that merge
    ("infer/_accumulator.py", "OSError"): 1,
    ("infer/_accumulator.py", "ValueError"): 1,
    ("infer/_gaussian.py", "ValueError"): 1,
    ("infer/_sliding.py", "ValueError"): 1,
}
_BUILTIN = re.compile(
    r"raise (ValueError|TypeError|RuntimeError|KeyError|IndexError|OSError|IOError|"
    r"FileNotFoundError|FileExistsError|NotImplementedError|FloatingPointError|LookupError|"
    r"AssertionError|Exception)\("
)


def test_no_new_bare_builtin_raises() -> None:
    found: dict[tuple[str, str], int] = {}
    for path in ROOT.rglob("*.py"):
        for m in _BUILTIN.finditer(path.read_text(encoding="utf-8")):
            key = (path.relative_to(ROOT).as_posix(), m.group(1))
            found[key] = found.get(key, 0) + 1
    extra = {k: n for k, n in found.items() if n > INTERNAL.get(k, 0)}
    assert not extra, f"raise a VoxflowError subclass (voxflow/errors.py) for user-facing errors: {extra}"


@pytest.mark.parametrize("name", E.__all__)
def test_every_error_is_a_voxflow_error(name: str) -> None:
    cls = getattr(E, name)
    assert issubclass(cls, (E.VoxflowError, E.VoxflowWarning))
    if issubclass(cls, E.VoxflowError) and cls not in (E.VoxflowError, E.TrainingInterrupted):
        assert any(b.__module__ == "builtins" and b is not Exception for b in cls.__mro__), cls.__mro__


def test_converted_errors_keep_their_builtin() -> None:
    with pytest.raises(E.GeometryError, match="spacing_zyx must be positive") as info:
        Geometry(shape_zyx=(1, 2, 3), spacing_zyx=(0.0, 1.0, 1.0))
    assert isinstance(info.value, ValueError)
    with pytest.raises(E.GeometryError, match="3 entries"):
        Geometry(shape_zyx=(2, 3), spacing_zyx=(1.0, 1.0, 1.0))  # type: ignore[arg-type]
    with pytest.raises(E.PlanError, match="--precision bf16 or fp32"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(E.ConfigError, match="AugmentConfig.p_noise") as cfg:
        AugmentConfig(p_noise=1.5)
    assert isinstance(cfg.value, ValueError)
    assert issubclass(E.GeometryMismatchError, E.GeometryError)
    assert issubclass(E.TrainingDivergedError, FloatingPointError)

"""The shared CLI helpers: one list of presets, one fold parser."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from voxflow._cliutil import FOLD, parse_folds
from voxflow.cli import main
from voxflow.plan import PRESETS


@pytest.mark.parametrize("command", ["plan", "plan-and-preprocess"])
def test_preset_choices_are_the_planners(command: str) -> None:
    cmd = main.get_command(click.Context(main), command)
    assert cmd is not None
    (opt,) = [p for p in cmd.params if p.name == "preset"]
    assert isinstance(opt.type, click.Choice)
    assert list(opt.type.choices) == list(PRESETS)


def test_fold_parsing() -> None:
    assert FOLD.convert("3", None, None) == 3
    assert FOLD.convert(" all ", None, None) == "all"
    assert FOLD.convert(2, None, None) == 2
    with pytest.raises(click.BadParameter, match="fold number"):
        FOLD.convert("x", None, None)
    with pytest.raises(click.BadParameter, match="fold number"):
        FOLD.convert("-1", None, None)
    assert parse_folds(["0", "1,2", "all"]) == [0, 1, 2, "all"]
    with pytest.raises(click.BadParameter, match=r"\['one'\]"):
        parse_folds(["0,one"])


def test_train_rejects_a_bad_fold_before_it_starts(tmp_path) -> None:
    res = CliRunner().invoke(main, ["train", str(tmp_path), "-f", "first"])
    assert res.exit_code == 2, res.output  # a usage error, not a crash in int()
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "fold number" in res.output

"""Shared click options and error handling for the per-stage command modules."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from voxflow.errors import VoxflowError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "FOLD",
    "FoldType",
    "handle_errors",
    "parse_folds",
    "parse_set_options",
    "preset_option",
    "scheduler_option",
    "set_option",
    "workspace_option",
]


def scheduler_option(f: F) -> F:
    f = click.option(
        "--memory-limit",
        default=None,
        help="Memory limit per worker for --scheduler local:N (e.g. 2GB). Default: dask's automatic share.",
    )(f)
    return click.option(
        "--scheduler",
        default="threads",
        show_default=True,
        help="Dask scheduler: threads, processes, sync, local:N (LocalCluster with N workers) or "
        "tcp://host:port of a running `dask scheduler`.",
    )(f)  # type: ignore[return-value]


def workspace_option(f: F) -> F:
    return click.option(
        "--work",
        "--workspace",
        "work",
        type=click.Path(file_okay=False),
        envvar="VOXFLOW_WORKSPACE",
        default="voxflow_work",
        show_default=True,
        help="Work directory holding the dataset store, plans, preprocessed data and runs "
        "(default from $VOXFLOW_WORKSPACE if set).",
    )(f)  # type: ignore[return-value]


def set_option(f: F) -> F:
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a plan or training field, e.g. --set train.epochs=50 (repeatable).",
    )(f)  # type: ignore[return-value]


def preset_option(help_text: str) -> Callable[[F], F]:
    """``--preset``: one of the planner's presets (``voxflow.plan.PRESETS``, the one list of them)."""
    from voxflow.plan.planner import PRESETS  # at decoration time: `voxflow --help` itself stays light

    def decorate(f: F) -> F:
        return click.option(
            "--preset", type=click.Choice(list(PRESETS)), default="default", show_default=True, help=help_text
        )(f)  # type: ignore[return-value]

    return decorate


class FoldType(click.ParamType):
    """A cross-validation fold: a non-negative integer (``int``) or ``"all"`` (every case, no hold-out)."""

    name = "fold"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        text = str(value).strip()
        if text == "all":
            return "all"
        if not text.isdigit():
            self.fail(f"a fold must be a fold number (0, 1, ...) or 'all'; got {value!r}.", param, ctx)
        return int(text)


FOLD = FoldType()


def parse_set_options(overrides: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise click.BadParameter(f"--set expects KEY=VALUE; got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_folds(folds: Iterable[str], more: Iterable[str] = (), *, param_hint: str = "-f") -> list[int | str]:
    """Folds given as ``-f 0 1 2`` (the rest arrive as ``more``), ``-f 0,1`` or ``-f 0 -f 1`` ->
    ``[0, 1, 2]`` (``"all"`` kept as is)."""
    folds, more = list(folds), list(more)
    if more and not folds:
        raise click.BadParameter(
            f"unexpected arguments {more}; only fold numbers may follow -f.", param_hint=param_hint
        )
    items = [f.strip() for item in (*folds, *more) for f in str(item).split(",") if f.strip()]
    bad = [f for f in items if not (f.isdigit() or f == "all")]
    if bad:
        raise click.BadParameter(
            f"fold numbers must be integers (0, 1, ...) or 'all'; got {bad}.", param_hint=param_hint
        )
    return [int(f) if f.isdigit() else f for f in items]


def handle_errors(f: F) -> F:
    """Turn :class:`VoxflowError` into a clean ``click.ClickException`` (traceback with --debug)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context(silent=True)
        debug = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("debug"))
        try:
            return f(*args, **kwargs)
        except VoxflowError as e:
            if debug:
                raise
            raise click.ClickException(str(e)) from e

    return wrapper  # type: ignore[return-value]


def configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # default: warnings, progress bars and each command's own summary; -v adds INFO lines per case
    logging.getLogger("voxflow").setLevel(level)

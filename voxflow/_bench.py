"""``voxflow bench``: every stage's benchmark, from a source checkout or an installed wheel.

The scripts live in ``benchmarks/`` of the repository; the wheel ships them as the data package
``voxflow._benchmarks`` (``setup.py`` maps the folder), so the command finds one or the other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

__all__ = ["bench", "benchmarks_dir"]


def benchmarks_dir() -> Path | None:
    """The folder holding ``run_all.py``: the wheel's ``voxflow/_benchmarks``, else a checkout's
    ``benchmarks/`` next to the package (also an editable install); ``None`` when neither exists."""
    package = Path(__file__).resolve().parent
    for folder in (package / "_benchmarks", package.parent / "benchmarks"):
        if (folder / "run_all.py").is_file():
            return folder
    return None


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes (about a minute).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the JSON here too.")
def bench(quick: bool, output: str | None) -> None:
    """Run every stage's benchmark (benchmarks/run_all.py) and print JSON plus a markdown table."""
    folder = benchmarks_dir()
    if folder is None:
        raise click.ClickException(
            f"the benchmark scripts must be installed with voxflow; found neither "
            f"{Path(__file__).parent / '_benchmarks'} nor a source checkout's benchmarks/. Reinstall voxflow "
            f"from a wheel or a checkout (pip install .)."
        )
    args = (
        [sys.executable, str(folder / "run_all.py")]
        + (["--quick"] if quick else [])
        + (["-o", output] if output else [])
    )
    raise SystemExit(subprocess.call(args))

"""``voxflow bench`` finds its scripts in a checkout and in an installed wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from voxflow._bench import benchmarks_dir

REPO = Path(__file__).resolve().parents[1]


def test_checkout_uses_the_benchmarks_folder() -> None:
    assert benchmarks_dir() == REPO / "benchmarks"


def test_wheel_ships_the_benchmarks_and_bench_finds_them(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")  # the `test` extra installs it
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("voxflow", "benchmarks"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("voxflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    scripts = {f"voxflow/_benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("*.py")}
    assert "voxflow/_benchmarks/run_all.py" in scripts
    assert scripts <= names
    assert not any(n.startswith("benchmarks/") for n in names)  # nothing outside the voxflow package
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from voxflow._bench import benchmarks_dir; print(benchmarks_dir())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert Path(out.stdout.strip()) == site / "voxflow" / "_benchmarks"

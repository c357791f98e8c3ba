"""Issue 19: one writer per store / output folder / workspace / run directory, across processes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from voxflow._lock import dir_lock_file, exclusive_lock, read_lock, store_lock_file
from voxflow.errors import LockedError

HOLD = """
import sys, time
from voxflow._lock import exclusive_lock
with exclusive_lock(sys.argv[1], command="holder-under-test"):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold_lock_in_subprocess(lock_file: Path, procs: list[subprocess.Popen]) -> subprocess.Popen:
    """Start a python process that holds ``lock_file`` until its stdin closes."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    procs.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.fixture
def holder() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """``holder(lock_file)``: a python subprocess holding that lock until the test ends."""
    procs: list[subprocess.Popen] = []

    yield lambda lock_file: hold_lock_in_subprocess(lock_file, procs)
    for p in procs:
        p.communicate(timeout=30)  # closing stdin ends the holder
        assert p.returncode == 0


def _voxflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voxflow", *args], capture_output=True, text=True, timeout=120)


def test_lock_is_exclusive_reentrant_and_removed(tmp_path: Path) -> None:
    f = dir_lock_file(tmp_path / "out")
    with exclusive_lock(f, command="a"):
        info = read_lock(f)
        assert info is not None
        assert (info["pid"], info["host"], info["command"]) == (os.getpid(), socket.gethostname(), "a")
        with exclusive_lock(f, command="b"):  # the same process may nest (voxflow run -> convert)
            pass
        assert f.exists()
    assert not f.exists()
    assert store_lock_file(tmp_path / "x.zarr") == tmp_path / "x.zarr.lock"


def test_second_predict_fails_at_once_naming_the_holder(tmp_path: Path, holder) -> None:
    out = tmp_path / "pred"
    p = holder(dir_lock_file(out))
    models = tmp_path / "models"
    models.mkdir()
    t0 = time.perf_counter()
    res = _voxflow("predict", "-i", str(tmp_path), "-o", str(out), "-m", str(models))
    assert res.returncode != 0
    assert f"pid {p.pid}" in res.stderr
    assert "holder-under-test" in res.stderr
    assert socket.gethostname() in res.stderr
    assert "Traceback" not in res.stderr
    assert time.perf_counter() - t0 < 60
    assert read_lock(dir_lock_file(out))["pid"] == p.pid  # the holder's lock is untouched


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    f = dir_lock_file(tmp_path)
    f.write_text(
        json.dumps(
            {
                "pid": int(dead.stdout),
                "host": socket.gethostname(),
                "command": "predict",
                "started": "2020-01-01T00:00:00+00:00",
                "started_unix": 1577836800.0,
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="voxflow"), exclusive_lock(f, command="mine"):
        assert read_lock(f)["pid"] == os.getpid()
    assert "stale" in caplog.text
    assert str(int(dead.stdout)) in caplog.text
    assert not f.exists()


def test_lock_of_a_live_process_on_another_host_is_not_taken(tmp_path: Path) -> None:
    f = dir_lock_file(tmp_path)
    f.write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "train", "started": "now"}))
    with pytest.raises(LockedError, match="host 'elsewhere'.*delete"), exclusive_lock(f, command="x"):
        pass
    assert read_lock(f)["host"] == "elsewhere"

"""One writer at a time: an exclusive lock file per store, output folder, workspace or run directory.

Every command that writes (convert, preprocess, predict, train, run) holds a lock while it
writes; readers never take it. The lock is a small JSON file (pid, host, start time, command)
created atomically with ``O_CREAT | O_EXCL``, which is atomic on local disks and on NFS v3+,
and removed on exit. A second writer fails at once with :class:`LockedError` naming the holder.
A lock left by a dead process on the same host (its pid is gone, or was reused by a process that
started later) is taken over with a logged warning; a lock from another host cannot be checked
and must be removed by hand once that run is known to be over.

Locks are re-entrant within one process (``voxflow run`` calls convert, preprocess, ... in turn),
and child processes (DDP ranks, dask workers) never take or release them.

Where the lock file lives: :func:`dir_lock_file` (``<dir>/.voxflow.lock``) for plain folders;
:func:`store_lock_file` (``<store>.lock`` beside a ``.zarr`` store) for Zarr stores, so that zarr
and NGFF tools listing the store see no foreign file, and ``--overwrite`` cannot delete it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from voxflow._types import PathLikeStr
from voxflow.errors import LockedError

__all__ = ["LOCK_NAME", "dir_lock_file", "exclusive_lock", "locked", "read_lock", "store_lock_file"]

log = logging.getLogger(__name__)
LOCK_NAME = ".voxflow.lock"
F = TypeVar("F", bound=Callable[..., Any])
_HELD: dict[str, int] = {}  # "<pid>:<lock file>" -> nesting depth (a forked child holds nothing)


def dir_lock_file(directory: PathLikeStr) -> Path:
    """The lock file of a folder voxflow writes into: ``<directory>/.voxflow.lock``."""
    return Path(directory) / LOCK_NAME


def store_lock_file(store: PathLikeStr) -> Path:
    """The lock file of a Zarr store: ``<store>.lock`` beside it (outside the Zarr hierarchy)."""
    p = Path(store)
    return p.with_name(p.name + ".lock")


def read_lock(lock_file: PathLikeStr) -> dict[str, Any] | None:
    """The holder recorded in ``lock_file`` (``None`` if there is none; ``{}`` if unreadable)."""
    try:
        text = Path(lock_file).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: Mapping[str, Any]) -> str:
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    return (
        f"pid {info.get('pid')} on host {info.get('host')!r}, running {info.get('command')!r} since "
        f"{info.get('started')}"
    )


def _pid_alive(pid: int, started_unix: float | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that took the lock (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    except OSError:
        return True
    if started_unix is None:
        return True
    try:
        import psutil

        return bool(psutil.Process(pid).create_time() <= started_unix + 1.0)
    except Exception:  # noqa: BLE001 - psutil missing or the process just ended: assume alive (safe side)
        return True


def _is_stale(info: Mapping[str, Any]) -> bool:
    if not info or info.get("host") != socket.gethostname():
        return False
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    started = info.get("started_unix")
    return not _pid_alive(pid, float(started) if isinstance(started, (int, float)) else None)


def _try_create(lock_file: Path, record: bytes) -> bool:
    try:
        fd = os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, record)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(lock_file: Path, stale: Mapping[str, Any]) -> None:
    """Move a stale lock aside (atomic rename); put it back if it changed under us (a live writer)."""
    aside = lock_file.with_name(f"{lock_file.name}.stale-{os.getpid()}")
    try:
        os.rename(lock_file, aside)
    except FileNotFoundError:
        return
    moved = read_lock(aside)
    if moved != stale:  # another process replaced the stale lock with its own meanwhile: restore it
        with contextlib.suppress(OSError):
            os.link(aside, lock_file)
    aside.unlink(missing_ok=True)
    if moved == stale:
        log.warning("took over the stale lock %s of %s (that process is gone)", lock_file, _describe(stale))


def acquire(lock_file: PathLikeStr, *, command: str) -> Path:
    """Create ``lock_file`` for this process, or raise :class:`LockedError` naming the holder."""
    lock_file = Path(lock_file).absolute()
    key = f"{os.getpid()}:{lock_file}"
    if _HELD.get(key):
        _HELD[key] += 1
        return lock_file
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": now.isoformat(timespec="seconds"),
        "started_unix": now.timestamp(),
        "command": command,
        "argv": sys.argv,
    }
    record = json.dumps(info).encode()
    for _ in range(3):
        if _try_create(lock_file, record):
            _HELD[key] = 1
            return lock_file
        holder = read_lock(lock_file)
        if holder is None:
            continue  # released meanwhile: try again
        if _is_stale(holder):
            _take_over(lock_file, holder)
            continue
        raise LockedError(
            f"only one voxflow command may write {lock_file.parent} at a time; it is locked by "
            f"{_describe(holder)}. Wait for it to finish (readers such as `voxflow info` need no lock). If that "
            f"process is known to be gone (e.g. on another host), delete {lock_file} and rerun."
        )
    raise LockedError(f"could not take the lock {lock_file}: it kept changing hands; rerun the command.")


def release(lock_file: PathLikeStr) -> None:
    """Drop one level of this process's hold on ``lock_file``; the last one deletes the file."""
    lock_file = Path(lock_file).absolute()
    key = f"{os.getpid()}:{lock_file}"
    depth = _HELD.get(key, 0)
    if depth > 1:
        _HELD[key] = depth - 1
        return
    _HELD.pop(key, None)
    holder = read_lock(lock_file)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock_file.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(lock_file: PathLikeStr, *, command: str) -> Iterator[Path]:
    """Hold ``lock_file`` for the ``with`` block (see the module docstring)."""
    path = acquire(lock_file, command=command)
    try:
        yield path
    finally:
        release(path)


def locked(lock_file_of: Callable[[Mapping[str, Any]], PathLikeStr | None], *, command: str) -> Callable[[F], F]:
    """Decorator: run the function holding the lock ``lock_file_of(arguments)`` (``None``: no lock).

    ``arguments`` maps every parameter name of the decorated function to its value (defaults
    applied), e.g. ``@locked(lambda a: store_lock_file(a["dst"]), command="convert")``.
    """

    def deco(f: F) -> F:
        sig = inspect.signature(f)

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            target = lock_file_of(bound.arguments)
            if target is None:
                return f(*args, **kwargs)
            with exclusive_lock(target, command=command):
                return f(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco

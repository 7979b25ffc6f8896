"""One writer per run folder: an advisory lock (`filelock`) taken by every entry point that writes one.

`run_lock(folder)` holds `<folder>/.tinyonn.lock` (an flock: the system drops it when the process
dies, so a killed run never leaves a stale lock) and writes the holder's pid, host, command and start
time to the side file `<folder>/.tinyonn.lock.pid` (the lock file itself is the flock's and is
left alone). A second process fails at once with `RunInUseError` ("run R is in use by pid N"), it
never waits. Nested `run_lock` calls for the same folder in one thread (`run_pipeline` → a stage
→ `probe`) share the first one's hold. A torchrun launch (WORLD_SIZE > 1) is one writer: its rank 0
holds the lock for every rank, the other ranks take none.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tinyonn.errors import TinyONNError

LOCK_FILE = ".tinyonn.lock"
OWNER_FILE = ".tinyonn.lock.pid"


class RunInUseError(TinyONNError, RuntimeError):
    """Another process holds the run folder's lock. `pid` is its process id (None if unknown). The
    command exits with 1: nothing is wrong with its input, the same command works once the run is free."""

    exit_code = 1

    def __init__(self, folder: Path, owner: dict | None):
        pid = owner.get("pid") if owner else None
        who = f"pid {pid}" if pid is not None else "another process (pid not recorded yet)"
        if owner and owner.get("host") and owner.get("host") != socket.gethostname():
            who += f" on {owner['host']}"
        since = ""
        if owner and owner.get("started"):
            since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['started']))}"
        command = f" ({owner['command']})" if owner and owner.get("command") else ""
        super().__init__(f"run {folder} is in use by {who}{since}{command}; wait for it to finish or stop it "
                         f"(lock {folder / LOCK_FILE})")
        self.folder, self.pid = folder, pid


_held = threading.local()  # per thread: resolved folder → [FileLock, depth]


@contextmanager
def run_lock(folder: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Hold the lock of run folder `folder` (created if missing) for the `with` block; raise
    `RunInUseError` at once if another process (or thread) holds it. `what` names the holder's work
    in the side file (default: its command line). A folder this call created and left holding
    nothing but the lock files is removed again on exit."""
    folder = Path(folder)
    if _other_rank():
        yield folder
        return
    held: dict = _held.__dict__.setdefault("locks", {})
    key = os.path.realpath(folder)
    if key in held:
        held[key][1] += 1
        try:
            yield folder
        finally:
            held[key][1] -= 1
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunInUseError(folder, read_owner(folder)) from None
    held[key] = [lock, 1]
    try:
        _write_owner(folder, what)
        yield folder
    finally:
        del held[key]
        try:
            (folder / OWNER_FILE).unlink(missing_ok=True)
        finally:
            lock.release()
            if created and {p.name for p in folder.iterdir()} <= {LOCK_FILE, OWNER_FILE}:
                (folder / LOCK_FILE).unlink(missing_ok=True)
                try:
                    folder.rmdir()
                except OSError:
                    pass


def holding_folder_of(parameter: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: call the function holding the lock of the folder that holds its path argument
    `parameter` (e.g. `probe`'s `out`, a store inside the run folder)."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with run_lock(Path(bound.arguments[parameter]).parent):
                return function(*args, **kwargs)

        return locked

    return decorate


def read_owner(folder: str | os.PathLike) -> dict | None:
    """What the side file says about the lock's holder ({"pid", "host", "command", "started"}), or None."""
    try:
        owner = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _other_rank() -> bool:
    """Whether this process is a rank other than 0 of a torchrun launch (its rank 0 holds the lock)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def _write_owner(folder: Path, what: str | None) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
             "command": what or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    temporary = folder / f"{OWNER_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(owner))
    os.replace(temporary, folder / OWNER_FILE)

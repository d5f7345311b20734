"""One writer per run folder: a lock file (`.fika.lock`, through `filelock`) that also says which process holds it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from fika.errors import FikaError
from fika.files import read_json

LOCK_FILE = ".fika.lock"  # held by the one process that writes into a run folder; says which process that is


@contextlib.contextmanager
def exclusive_folder(folder: Path, key: str, holder: str) -> Iterator[None]:
    """Creates `folder` and holds its lock file while the block runs, so that no second fika process writes into
    it meanwhile: that one is refused with one line, `key: folder is in use by holder (pid, host, start)`.

    The kernel drops the lock when its process ends, however it ends (kill -9 included), so a folder is never
    left locked. On a filesystem without locks (some FUSE mounts) the block runs unguarded. When the block added
    no file (a run refused before it wrote anything), the folder is left as it was: a new lock file and the
    folders this call made are removed, an earlier lock file gets its content back.
    """
    from filelock import FileLock, Timeout

    folder, prefix = Path(folder), f"{key}: " if key else ""
    path = folder / LOCK_FILE
    created = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
    try:
        before = set() if created else set(os.listdir(folder))
        previous = path.read_bytes() if LOCK_FILE in before else None
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FikaError(f"{prefix}cannot write into {folder}: {err.strerror}") from None
    record = json.dumps({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    failed: list[OSError] = []

    def write_record(fd: int) -> None:  # the lock file says who holds it (filelock never truncates it)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError as err:  # a full disk
            failed.append(err)

    lock = FileLock(path, blocking=False, on_acquired=write_record)  # on_acquired: flock only, no soft marker
    try:
        lock.acquire()
    except Timeout:
        raise FikaError(
            f"{prefix}{folder} is in use by {holder_text(read_json(path))}; wait for it to end, or stop it, then run "
            "this again"
        ) from None
    except OSError as err:
        if err.errno != errno.ENOSYS:  # not a filesystem without locks: it cannot be written
            raise FikaError(f"{prefix}cannot write into {folder}: {err.strerror}") from None
        with contextlib.suppress(OSError):  # no locks here: the block runs unguarded, the record says who runs it
            path.write_text(record)
    try:
        if failed:
            raise FikaError(f"{prefix}cannot write into {folder}: {failed[0].strerror}")
        yield
    finally:
        with contextlib.suppress(OSError):
            if set(os.listdir(folder)) == before | {LOCK_FILE}:  # the block added no file
                if previous is None:
                    path.unlink()
                    for empty in created:
                        empty.rmdir()
                else:  # the lock file says again who held it last
                    path.write_bytes(previous)
        if lock.is_locked:
            lock.release()


def holder_text(record: dict | None) -> str:
    """`holder (pid P on HOST, since TIME)` from a lock file's record, or `another fika process`."""
    if not isinstance(record, dict) or not record.get("pid"):
        return "another fika process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"{record.get('holder')} (pid {record.get('pid')} on {record.get('host')}, since {since})"


def folder_holder(folder: Path) -> dict | None:
    """The process that holds `folder` (its lock file's record: holder, pid, host, since), or None when none does:
    no lock file, or the process it names on this host has ended. One on another host counts as holding it (it
    cannot be checked from here). Reads the file only, so it never competes with a writer for the lock."""
    info = read_json(Path(folder) / LOCK_FILE)
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or info["pid"] <= 0:
        return None
    if info.get("host") != socket.gethostname():
        return info
    try:
        os.kill(info["pid"], 0)
    except (ProcessLookupError, OverflowError):
        return None
    except PermissionError:  # alive, under another user
        return info
    return info

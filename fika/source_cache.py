"""One source, tokenized once: its usable conversations in a seeded order, memory-mapped from fika's cache.

A source's cache (`$FIKA_CACHE/data/sources/<fingerprint>/`) holds its usable conversations in a seeded
order, standardized (fika.sources), repaired and tokenized with the model's chat template (fika.chat_tokens).
It is keyed by what changes those tokens: the source's content (a local file's size and mtime), tokenizer and
template, max length, overlong policy and seed. Processes that need the same cache wait for one builder (a
file lock); nobody deletes a cache another process reads.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fika.chat_tokens import assistant_turns, chat_tokens, fit_to_length, tokenizer_fingerprint
from fika.config import DataSource
from fika.console import log
from fika.files import write_atomic
from fika.paths import cache_dir, writing_cache
from fika.sources import (
    STANDARDIZERS,
    DataError,
    Dropped,
    conversation_key,
    detect_format,
    load_source,
    repair,
    source_identity,
)

READ_REASONS = ("malformed", "unknown_role", "empty", "no_assistant", "too_long")
PIPELINE_VERSION = 2  # bump whenever the tokens produced for the same inputs change
LOCK_TIMEOUT_S = 3600
TOKENIZE_BATCH = 256  # conversations per chat-template batch


@dataclass
class SourceCache:
    """A source's usable conversations in seeded order (memory-mapped), and how they were read."""

    rows: object  # datasets.Dataset: id, input_ids, labels, n_tokens, n_assistant, truncated, repaired, read_pos
    meta: dict
    path: Path
    built: bool


def source_fingerprint(source: DataSource, tokenizer_fp: str, max_length: int, overlong: str, seed: int) -> str:
    key = {
        "version": PIPELINE_VERSION,
        "source": source_identity(source),
        "tokenizer": tokenizer_fp,
        "max_length": max_length,
        "overlong": overlong,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_source(
    source: DataSource, tokenizer, max_length: int, overlong: str, seed: int, need: int | None
) -> tuple[list[dict], dict]:
    """Standardizes and tokenizes a source in its seeded order until `need` usable rows (None: all)."""
    rows, columns, note = load_source(source)
    fmt = source.format if source.format != "auto" else detect_format(columns, rows, source.path)
    column, standardize = STANDARDIZERS[fmt]
    if column not in columns:
        raise DataError(f"data source {source.path!r}: format {fmt!r} needs a {column!r} column, found {columns[:12]}")
    log(
        f"data: tokenizing {source.path} ({fmt}, {len(rows):,} rows; {'all' if need is None else f'{need:,} usable'} "
        f"wanted){'; ' + note if note else ''}"
    )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    kept: list[dict] = []
    drops: list[tuple[int, str]] = []  # (rows read so far, reason): counts up to any position
    read = 0
    from tqdm.auto import tqdm

    progress = tqdm(total=len(order), desc=source.path, unit="row", disable=None, leave=False)
    position = 0
    while position < len(order) and (need is None or len(kept) < need):
        # a batch a little larger than what is still needed: rows past `need` are tokenized but not read
        size = TOKENIZE_BATCH if need is None else min(TOKENIZE_BATCH, max(16, 2 * (need - len(kept))))
        batch = order[position : position + size]
        position += len(batch)
        standardized: list[tuple[list[dict], bool] | Dropped] = []
        for i in batch:
            try:
                standardized.append(repair(standardize(rows[i][column])))
            except Dropped as drop:
                standardized.append(drop)
            except UnicodeDecodeError:  # a local file's row whose bytes are not UTF-8 (Arrow keeps them as read)
                standardized.append(Dropped("malformed"))
        conversations = [item[0] for item in standardized if not isinstance(item, Dropped)]
        tokens = iter(chat_tokens(tokenizer, conversations, max_length + 1))  # one past the limit: tells a cut
        for item in standardized:
            if need is not None and len(kept) >= need:
                break
            read += 1
            progress.update()
            if isinstance(item, Dropped):
                drops.append((read, item.reason))
                continue
            messages, repaired = item
            try:
                example, truncated = fit_to_length(*next(tokens), max_length, overlong)
            except Dropped as drop:
                drops.append((read, drop.reason))
                continue
            kept.append(
                {
                    "id": conversation_key(messages),
                    **example,
                    "n_tokens": len(example["input_ids"]),
                    "n_assistant": assistant_turns(example["labels"]),
                    "truncated": truncated,
                    "repaired": repaired,
                    "read_pos": read,
                }
            )
    progress.close()
    meta = {
        "path": source.path,
        "format": fmt,
        "rows_total": len(rows),
        "rows_read": read,
        "usable": len(kept),
        "complete": read == len(rows),
        "drops": drops,
        "note": note,
    }
    return kept, meta


def source_cache(
    source: DataSource, tokenizer, max_length: int, overlong: str, seed: int, need: int | None, rebuild: bool = False
) -> SourceCache:
    """The source's cache with at least `need` usable rows (all when None), built once under a file lock.

    Concurrent processes (trials, nodes, searches) that ask for the same cache wait for the one builder and
    then load it. A cache that holds too few rows is rebuilt with more; the old folder is moved aside and
    removed, which leaves readers that memory-mapped it unharmed.
    """
    import datasets
    from filelock import FileLock

    datasets.disable_progress_bars()
    fingerprint = source_fingerprint(source, tokenizer_fingerprint(tokenizer), max_length, overlong, seed)
    root = cache_dir("data", "sources")
    path = root / fingerprint
    with FileLock(str(root / f"{fingerprint}.lock"), timeout=LOCK_TIMEOUT_S):
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else None
        enough = meta is not None and (meta["complete"] or (need is not None and meta["usable"] >= need))
        built = rebuild or not enough
        if built:
            rows, meta = read_source(source, tokenizer, max_length, overlong, seed, need)
            if not rows:  # a source that yields nothing is an error, never a silent loss
                counts = Counter(reason for _, reason in meta["drops"])
                reasons = ", ".join(f"{r} {n}" for r, n in counts.items())
                hint = ""
                if counts["too_long"]:
                    hint = f"; too_long: longer than model.max_seq_length {max_length} tokens, " + (
                        "and data.overlong is drop"
                        if overlong == "drop"
                        else f"with no answer in the first {max_length} tokens to train on"
                    )
                raise DataError(
                    f"data source {source.path!r}: no usable conversations ({meta['rows_read']:,} rows "
                    f"read; dropped: {reasons or 'none'}){hint}"
                )
            tmp = root / f".{fingerprint}.{random.getrandbits(32):08x}.tmp"
            try:
                with writing_cache():
                    datasets.Dataset.from_list(rows, features=row_features()).save_to_disk(str(tmp / "rows"))
                    write_atomic(tmp / "meta.json", json.dumps(meta))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if path.exists():
                old = root / f".{fingerprint}.{random.getrandbits(32):08x}.old"
                path.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(path)
            with open(root.parent / "builds.log", "a") as f:  # provenance: which source was tokenized when
                f.write(json.dumps({"fingerprint": fingerprint, "path": source.path, "usable": meta["usable"]}) + "\n")
        rows = datasets.load_from_disk(str(path / "rows"))
    return SourceCache(rows, meta, path, built)


def row_features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "n_tokens": Value("int32"),
            "n_assistant": Value("int32"),
            "truncated": Value("bool"),
            "repaired": Value("bool"),
            "read_pos": Value("int64"),
        }
    )

"""One source, tokenized once: its usable conversations in a seeded order, memory-mapped from fika's cache.

A source's cache (`$FIKA_CACHE/data/sources/<fingerprint>/`) holds its usable conversations in a seeded
order, standardized (fika.sources), repaired and tokenized with the model's chat template (fika.chat_tokens).
It is keyed by what changes those tokens: the source's content (a local file's size and mtime), tokenizer and
template, max length, overlong policy and seed. Processes that need the same cache wait for one builder (a
file lock); nobody deletes a cache another process reads.

The builder tokenizes the source a chunk at a time (fika.tokenize_chunks), with a pool of processes when it is
large, and writes each chunk to the cache's Arrow file as it comes: its memory does not grow with the source.
It writes into a temporary folder that becomes the cache only when complete, so a killed build leaves nothing
that a later one trusts (the next build of that cache removes the temporary folder)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from fika.chat_tokens import tokenizer_fingerprint
from fika.config import DataSource
from fika.console import RowsProgress, log
from fika.errors import FikaError
from fika.files import folder_written_whole, write_atomic
from fika.paths import cache_dir, writing_cache
from fika.source_rows import SourceRows, open_source
from fika.sources import DataError, source_identity
from fika.tokenize_chunks import tokenized_chunks

READ_REASONS = ("malformed", "unknown_role", "empty", "no_assistant", "too_long")
PIPELINE_VERSION = 2  # bump whenever the tokens produced for the same inputs change
LOCK_TIMEOUT_S = 3600
PARALLEL_FROM = 4096  # rows to read from which a pool of processes tokenizes them (its start costs a few seconds)
ROWS_FILE = "rows.arrow"


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
    rows: SourceRows, tokenizer, max_length: int, overlong: str, need: int | None, out: Path, workers: int = 1
) -> dict:
    """Standardizes and tokenizes an opened source in its seeded order until `need` usable rows (None: all),
    writing them to the Arrow file `out` a chunk at a time; returns how it was read (`meta`).

    `workers` processes tokenize when there are at least PARALLEL_FROM rows to read (below that, starting them
    costs more than it saves); the rows, drops and read positions are the same with any number of them.
    """
    import pyarrow as pa

    total = len(rows.order)
    workers = workers if min(total, total if need is None else need) >= PARALLEL_FROM else 1
    log(
        f"data: tokenizing {rows.path} ({rows.fmt}, {total:,} rows; {'all' if need is None else f'{need:,} usable'} "
        f"wanted{f'; {workers} processes' if workers > 1 else ''}){'; ' + rows.note if rows.note else ''}"
    )
    schema = row_features().arrow_schema
    kept, read, drops = 0, 0, []
    progress = RowsProgress(
        f"data: {rows.path}", total if need is None else need, "rows" if need is None else "usable rows"
    )
    chunks = tokenized_chunks(
        rows, tokenizer, max_length, overlong, schema, workers, lambda: None if need is None else need - kept
    )
    with (
        closing(chunks),
        closing(progress),
        pa.OSFile(str(out), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
    ):
        for chunk in chunks:  # a pool's processes end when this loop does
            batch, read, chunk_drops = chunk.rows, chunk.stop, chunk.drops
            if need is not None and kept + batch.num_rows >= need:  # the rows past the last one needed are not read
                batch = batch.slice(0, need - kept)
                read = batch["read_pos"][-1].as_py()
                chunk_drops = [(pos, reason) for pos, reason in chunk_drops if pos <= read]
            writer.write_batch(batch)
            kept += batch.num_rows
            drops += chunk_drops
            progress.update(read if need is None else kept)
            if need is not None and kept >= need:
                break
    return {
        "path": rows.path,
        "format": rows.fmt,
        "rows_total": total,
        "rows_read": read,
        "usable": kept,
        "complete": read == total,
        "drops": drops,
        "note": rows.note,
    }


def source_cache(
    source: DataSource,
    tokenizer,
    max_length: int,
    overlong: str,
    seed: int,
    need: int | None,
    rebuild: bool = False,
    workers: int | None = None,
) -> SourceCache:
    """The source's cache with at least `need` usable rows (all when None), built once under a file lock.

    Concurrent processes (trials, nodes, searches) that ask for the same cache wait for the one builder and
    then load it. A cache that holds too few rows is rebuilt with more; the new folder replaces the old one
    whole, which leaves readers that memory-mapped it unharmed. The builder tokenizes with `workers` processes
    (None: `data_workers()`). A build that was killed leaves only a temporary folder, which no one reads and the
    next build of the same cache removes.
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
            with writing_cache(), folder_written_whole(path) as tmp:
                tmp.mkdir()
                rows = open_source(source, seed)
                meta = read_source(
                    rows, tokenizer, max_length, overlong, need, tmp / ROWS_FILE, workers or data_workers()
                )
                if not meta["usable"]:  # a source that yields nothing is an error, never a silent loss
                    raise nothing_usable(meta, max_length, overlong)
                write_atomic(tmp / "meta.json", json.dumps(meta))
            with open(root.parent / "builds.log", "a") as f:  # provenance: which source was tokenized when
                f.write(json.dumps({"fingerprint": fingerprint, "path": source.path, "usable": meta["usable"]}) + "\n")
        rows = load_rows(path)
    return SourceCache(rows, meta, path, built)


def load_rows(path: Path):
    """A cache's rows, memory-mapped (a cache written before they were one Arrow file holds a `datasets` folder)."""
    import datasets

    if (path / ROWS_FILE).exists():
        return datasets.Dataset.from_file(str(path / ROWS_FILE))
    return datasets.load_from_disk(str(path / "rows"))


def nothing_usable(meta: dict, max_length: int, overlong: str) -> DataError:
    """The error for a source of which no conversation is usable: the reasons, and the key that decides a cut."""
    counts = Counter(reason for _, reason in meta["drops"])
    reasons = ", ".join(f"{r} {n}" for r, n in counts.items())
    hint = ""
    if counts["too_long"]:
        hint = f"; too_long: longer than model.max_seq_length {max_length} tokens, " + (
            "and data.overlong is drop"
            if overlong == "drop"
            else f"with no answer in the first {max_length} tokens to train on"
        )
    return DataError(
        f"data source {meta['path']!r}: no usable conversations ({meta['rows_read']:,} rows "
        f"read; dropped: {reasons or 'none'}){hint}"
    )


def data_workers() -> int:
    """How many processes tokenize a source: FIKA_DATA_WORKERS when set (a search's trial sets its CPU share),
    else every CPU this process may use."""
    value = os.environ.get("FIKA_DATA_WORKERS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise FikaError(f"FIKA_DATA_WORKERS: {value!r} is not allowed: give a number of processes, 1 or more")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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

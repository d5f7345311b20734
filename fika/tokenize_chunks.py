"""A source's rows tokenized a chunk at a time, in its seeded order: in this process, or by a pool of processes that
each tokenize one chunk at a time on one core.

A chunk is a run of consecutive positions of the order. Each row is standardized and repaired (fika.sources) and
tokenized with the chat template (fika.chat_tokens) on its own, so the rows a chunk keeps, and the rows it drops,
do not depend on how the order is cut into chunks or on which process tokenized them: a pool's build equals a
serial one. Chunks come back in their order; a pool works a few chunks ahead of the one being written, no more.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fika.chat_tokens import assistant_turns, chat_tokens, fit_to_length
from fika.source_rows import SourceRows
from fika.sources import STANDARDIZERS, DataError, Dropped, conversation_key, repair

TOKENIZE_BATCH = 256  # conversations per chat-template batch
CHUNK_ROWS = 512  # rows per chunk (fewer when a build needs only a few more usable rows)
AHEAD = 2  # chunks handed to each pool process beyond the one it works on


@dataclass
class Chunk:
    """The usable rows of positions start..stop-1 of a source's order (an Arrow record batch of the cache's
    columns) and the others' drops, as (position + 1, reason)."""

    start: int
    stop: int
    rows: object  # pyarrow.RecordBatch
    drops: list[tuple[int, str]]


def tokenize_chunk(values: list, start: int, fmt: str, tokenizer, max_length: int, overlong: str, schema) -> Chunk:
    """The rows of one chunk (`values`: their conversations column, from position `start` on), tokenized."""
    import pyarrow as pa

    standardize = STANDARDIZERS[fmt][1]
    # each row standardized and repaired, or the reason it is dropped (a reason, not the exception: an exception
    # kept here would hold this frame, and so the chunk's tokens, in a reference cycle)
    standardized: list[tuple[list[dict], bool] | str] = []
    for value in values:
        if isinstance(value, Dropped):  # a row that could not be read
            standardized.append(value.reason)
            continue
        try:
            standardized.append(repair(standardize(value)))
        except Dropped as drop:
            standardized.append(drop.reason)
    kept: dict[str, list] = {name: [] for name in schema.names}
    drops: list[tuple[int, str]] = []
    for first in range(0, len(standardized), TOKENIZE_BATCH):
        batch = standardized[first : first + TOKENIZE_BATCH]
        conversations = [item[0] for item in batch if not isinstance(item, str)]
        # one past the limit: tells a cut
        tokens = iter(chat_tokens(tokenizer, conversations, max_length + 1) if conversations else [])
        for offset, item in enumerate(batch):
            read_pos = start + first + offset + 1
            if isinstance(item, str):
                drops.append((read_pos, item))
                continue
            messages, repaired = item
            try:
                example, truncated = fit_to_length(*next(tokens), max_length, overlong)
            except Dropped as drop:
                drops.append((read_pos, drop.reason))
                continue
            row = {
                "id": conversation_key(messages),
                **example,
                "n_tokens": len(example["input_ids"]),
                "n_assistant": assistant_turns(example["labels"]),
                "truncated": truncated,
                "repaired": repaired,
                "read_pos": read_pos,
            }
            for name, column in kept.items():
                column.append(row[name])
    rows = pa.RecordBatch.from_arrays([pa.array(kept[f.name], f.type) for f in schema], schema=schema)
    return Chunk(start, start + len(values), rows, drops)


def tokenized_chunks(
    rows: SourceRows,
    tokenizer,
    max_length: int,
    overlong: str,
    schema,
    workers: int,
    wanted: Callable[[], int | None],
) -> Iterator[Chunk]:
    """The chunks of a source's order, tokenized, in order, until the order ends or `wanted()` (usable rows still
    needed; None: all) is 0. With `workers` > 1, a pool of that many processes tokenizes them."""

    def spans() -> Iterator[tuple[int, int]]:
        start = 0
        while start < len(rows.order):
            left = wanted()
            if left == 0:
                return
            # a chunk a little larger than what is still needed: rows past `need` are tokenized but not read
            size = CHUNK_ROWS if left is None else min(CHUNK_ROWS, max(16, 2 * left))
            yield start, min(start + size, len(rows.order))
            start += size

    if workers <= 1:
        for start, stop_at in spans():
            yield tokenize_chunk(rows.values(start, stop_at), start, rows.fmt, tokenizer, max_length, overlong, schema)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")  # never a fork: the caller may run Ray or other threads
    # 1 when the chunks are no longer wanted (the end, an error, Ctrl-C): a flag in shared memory, no lock (setting
    # a multiprocessing.Event waits for every process that waited on it, and one that has ended never answers)
    stop = context.RawValue("b", 0)
    pool = ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=start_worker,
        initargs=(pickle.dumps(tokenizer), schema, os.getpid(), stop),
    )
    pending: deque = deque()
    try:
        for start, stop_at in spans():
            pending.append(
                pool.submit(tokenize_in_worker, rows.values(start, stop_at), start, rows.fmt, max_length, overlong)
            )
            if len(pending) > workers * AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError(
            f"data source {rows.path!r}: a tokenizing process ended unexpectedly (out of memory?); "
            "FIKA_DATA_WORKERS=1 tokenizes in one process"
        ) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stop.value = 1  # a process in the middle of a chunk nobody will read ends now, not after it


WORKER: dict = {}  # a pool process's tokenizer and schema


def start_worker(tokenizer_pickle: bytes, schema, parent: int, stop) -> None:
    """Sets up a pool process: the tokenizer on one thread (the pool has a process per core), Ctrl-C left to the
    parent, and an end of its own as soon as `stop` is 1 or the parent is gone (a killed parent ends nothing)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    WORKER.update(tokenizer=pickle.loads(tokenizer_pickle), schema=schema)
    threading.Thread(target=end_when_stopped, args=(parent, stop), daemon=True).start()


def end_when_stopped(parent: int, stop) -> None:
    while os.getppid() == parent and not stop.value:
        time.sleep(0.2)
    os._exit(0)


def tokenize_in_worker(values: list, start: int, fmt: str, max_length: int, overlong: str) -> Chunk:
    return tokenize_chunk(values, start, fmt, WORKER["tokenizer"], max_length, overlong, WORKER["schema"])

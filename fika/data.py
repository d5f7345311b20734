"""The data mix: each source tokenized once into a cache, then a cheap, seeded selection of cached rows.

A source's cache (`$FIKA_CACHE/data/sources/<fingerprint>/`) holds its usable conversations in a seeded
order, standardized (fika.sources), repaired and tokenized with the model's chat template (labels on the
assistant replies and their end-of-turn token only). It is keyed by what changes those tokens: the source's
content (a local file's size and mtime), tokenizer and template, max length, overlong policy and seed.
Processes that need the same cache wait for one builder (a file lock); nobody deletes a cache another
process reads.

A mix is then chosen from the caches, in this order:
1. **eval**: `eval_size` conversations split evenly over the sources (or over `eval_sources`), the first ones
   of each source's order. Nothing below changes them, so every trial of a search is scored on the same
   conversations, whatever its weights, limits or filters.
2. **candidates**: per source, the next `limit` conversations (all when unset); weight 0 reads none.
3. **filters** (per source, else mix-wide): `dedupe` (exact repeats within the mix and of eval
   conversations), `min_tokens`, `max_tokens`, `min_assistant_turns`. Each drop is counted by reason.
4. **weights**: the largest mix with the given shares; what is left over is `unused`. Then shuffled.

Per source: rows in = dropped (by reason) + eval + train + unused.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fika.common import cache_dir, log, write_atomic, writing_cache
from fika.config import DataConfig, DataSource
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
FILTER_REASONS = ("duplicate", "under_min_tokens", "over_max_tokens", "few_assistant_turns")
DROP_REASONS = READ_REASONS + FILTER_REASONS
PIPELINE_VERSION = 2  # bump whenever the tokens produced for the same inputs change
LOCK_TIMEOUT_S = 3600
TOKENIZE_BATCH = 256  # conversations per chat-template batch


# --- tokenizing --------------------------------------------------------------------------------------


def chat_tokens(tokenizer, conversations: list[list[dict]], keep: int) -> list[tuple[list[int], list[int]]]:
    """The first `keep` token ids and assistant-token mask of each conversation, rendered with the chat template.

    One batch: the fast tokenizer encodes it in parallel (with the cut, 2-4x faster than one whole encoding
    per conversation), and only the kept tokens become Python lists and masks. A batch the template rejects
    is encoded one conversation at a time, so that the error names the one at fault.
    """

    def encode(batch):
        out = tokenizer.apply_chat_template(
            batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **cut_at(tokenizer, keep)
        )
        return list(zip(out["input_ids"], out["assistant_masks"], strict=True))

    try:
        encoded = encode(conversations)
    except Exception:  # noqa: BLE001 - raised again below, by the conversation at fault
        encoded = [pair for messages in conversations for pair in encode([messages])]
    return [(list(ids), list(mask)) for ids, mask in encoded]


def cut_at(tokenizer, keep: int) -> dict:
    """Tokenizer arguments that keep the first `keep` tokens (a right-side cut is a prefix of the full encoding;
    a tokenizer set to cut on the left is not cut)."""
    return {"truncation": True, "max_length": keep} if tokenizer.truncation_side == "right" else {}


def fit_to_length(ids: list[int], mask: list[int], max_length: int, overlong: str) -> tuple[dict, bool]:
    """Token ids and labels (-100 outside assistant replies) of a conversation's first tokens (all of them, or
    `max_length + 1` when it is longer); True if it was cut.

    A conversation longer than `max_length` is cut after the last assistant turn that fits; if none fits,
    inside the first assistant reply; with no assistant token in the window (or `overlong: drop`) it is
    dropped as `too_long`.
    """
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "drop":
            raise Dropped("too_long")
        turn_ends = [j + 1 for j in range(max_length) if mask[j] and not mask[j + 1]]
        cut = turn_ends[-1] if turn_ends else max_length
        ids, mask = ids[:cut], mask[:cut]
    if not any(mask):
        raise Dropped("too_long" if truncated else "no_assistant")
    labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels}, truncated


def assistant_turns(labels: list[int]) -> int:
    """How many assistant replies (runs of labelled tokens) a tokenized conversation holds."""
    return sum(1 for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100))


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes tokens: its vocab and rules, specials and template."""
    if hasattr(tokenizer, "backend_tokenizer"):
        rules = json.loads(tokenizer.backend_tokenizer.to_str())
        # not the truncation and padding it keeps from its last call: settings of that call, not of the tokenizer
        vocab = json.dumps({k: v for k, v in rules.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        vocab = str(tokenizer.get_vocab())
    parts = [vocab, str(tokenizer.chat_template), str(tokenizer.all_special_tokens)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- one source, tokenized once ------------------------------------------------------------------------


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
    log(f"data: tokenizing {source.path} ({fmt}, {len(rows):,} rows; {'all' if need is None else f'{need:,} usable'} "
        f"wanted){'; ' + note if note else ''}")  # fmt: skip
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
                    hint = (f"; too_long: longer than model.max_seq_length {max_length} tokens, "
                            + ("and data.overlong is drop" if overlong == "drop" else "with no answer in the first "
                               f"{max_length} tokens to train on"))  # fmt: skip
                raise DataError(f"data source {source.path!r}: no usable conversations ({meta['rows_read']:,} rows "
                                f"read; dropped: {reasons or 'none'}){hint}")  # fmt: skip
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


# --- the mix ---------------------------------------------------------------------------------------


@dataclass
class SourceStats:
    """What one source gave a mix: rows in = sum(dropped) + eval + train + unused."""

    name: str
    path: str
    format: str
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    eval: int = 0
    train: int = 0
    unused: int = 0
    train_tokens: int = 0
    repaired: int = 0  # of the training rows
    truncated: int = 0
    note: str = ""


@dataclass
class DataMix:
    """A trial's data: the training rows (shuffled selection of cached rows), the eval rows, provenance."""

    train: object
    eval: object
    sources: list[SourceStats]
    eval_counts: dict[str, int]
    fingerprint: str

    def summary(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "train_tokens": sum(s.train_tokens for s in self.sources),
            "eval_per_source": self.eval_counts,
            "sources": [asdict(s) for s in self.sources],
        }


def eval_shares(size: int, count: int) -> list[int]:
    """`size` eval conversations split as evenly as possible over `count` sources (the first get the rest)."""
    return [size // count + (1 if i < size % count else 0) for i in range(count)]


def weighted_take(available: list[int], weights: list[float] | None) -> list[int]:
    """How many training rows to take per source: all of them, or the largest mix with the given shares."""
    if weights is None:
        return list(available)
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    room = [n / s for n, s in zip(available, shares, strict=True) if s > 0]
    total = min(room) if room else 0
    return [min(n, int(total * s + 1e-9)) for n, s in zip(available, shares, strict=True)]


def source_filters(source: DataSource, config: DataConfig) -> dict:
    """A source's filters: its own where set, else the mix-wide ones."""
    return {
        key: getattr(config, key) if getattr(source, key) is None else getattr(source, key)
        for key in ("dedupe", "min_tokens", "max_tokens", "min_assistant_turns")
    }


def reads_needed(config: DataConfig) -> tuple[list[int | None], list[int | None]]:
    """Usable rows each training source and each eval source must have cached for this config."""
    shares = eval_shares(config.eval_size, len(config.eval_sources or config.sources))
    held = [0] * len(config.sources) if config.eval_sources else shares
    train = []
    for source, eval_rows in zip(config.sources, held, strict=True):
        if source.weight == 0:
            train.append(eval_rows)
        else:
            train.append(None if source.limit is None else eval_rows + source.limit)
    return train, (shares if config.eval_sources else [])


def prepare_data(
    config: DataConfig,
    tokenizer,
    max_length: int,
    rebuild: bool = False,
    need: tuple[list[int | None], list[int | None]] | None = None,
) -> DataMix:
    """Builds (or loads) the source caches a config needs and selects its mix from them.

    `need` overrides how many usable rows each source's cache must hold (a search asks for the most any of
    its trials will use, so that the caches are built once, before the first trial).
    """
    import datasets

    train_need, eval_need = need or reads_needed(config)
    caches = [
        source_cache(s, tokenizer, max_length, config.overlong, config.seed, n, rebuild)
        for s, n in zip(config.sources, train_need, strict=True)
    ]
    eval_caches = [
        source_cache(s, tokenizer, max_length, config.overlong, config.seed, n, rebuild)
        for s, n in zip(config.eval_sources or [], eval_need, strict=True)
    ]
    names = config.source_names()
    shares = eval_shares(config.eval_size, len(config.eval_sources or config.sources))

    # 1. eval: the first rows of each (eval) source, repeats skipped
    eval_parts, eval_ids, eval_counts = [], set(), {}
    held = [0] * len(caches)  # rows of each training source that went to eval (or were repeats of an eval row)
    repeats = [0] * len(caches)
    eval_from = eval_caches or caches
    eval_names = [s.label(i) for i, s in enumerate(config.eval_sources)] if eval_caches else names
    for i, (cache, share) in enumerate(zip(eval_from, shares, strict=True)):
        picked, pos = [], 0
        ids = cache.rows["id"]
        while len(picked) < share and pos < len(ids):
            if ids[pos] not in eval_ids:
                picked.append(pos)
                eval_ids.add(ids[pos])
            pos += 1
        if len(picked) < share:
            found = f"{len(ids):,} usable conversations"
            if len(picked) < len(ids):  # the others repeat a conversation already in the eval set
                found = f"{len(picked):,} distinct usable conversations ({len(ids):,} with repeats)"
            raise DataError(f"data.eval_size: {config.eval_size} is not allowed: source {eval_names[i]!r} has only "
                            f"{found} for its {share} eval rows")  # fmt: skip
        if not eval_caches:
            held[i], repeats[i] = pos, pos - len(picked)
        eval_counts[eval_names[i]] = len(picked)
        eval_parts.append(cache.rows.select(picked).add_column("source", [eval_names[i]] * len(picked)))

    # 2-3. candidates and filters, per source in order
    stats, passing, seen = [], [], set(eval_ids)
    for i, (source, cache) in enumerate(zip(config.sources, caches, strict=True)):
        stat = SourceStats(name=names[i], path=source.path, format=cache.meta["format"], note=cache.meta["note"])
        stat.eval = held[i] - repeats[i]
        stat.dropped["duplicate"] += repeats[i]
        filters = source_filters(source, config)
        start = held[i]
        stop = start if source.weight == 0 else len(cache.rows)
        if source.limit is not None:
            stop = min(stop, start + source.limit)
        if (
            source.limit is not None
            and source.weight != 0
            and stop - start < source.limit
            and not cache.meta["complete"]
        ):
            raise DataError(f"data source {source.path!r}: the cache holds too few rows; run again with --rebuild")
        columns = cache.rows.select_columns(["id", "n_tokens", "n_assistant"])[start:stop]
        good = []
        for j, (row_id, n_tokens, n_assistant) in enumerate(
            zip(columns["id"], columns["n_tokens"], columns["n_assistant"], strict=True)
        ):
            reason = None
            if filters["dedupe"] and row_id in seen:
                reason = "duplicate"
            elif n_tokens < filters["min_tokens"]:
                reason = "under_min_tokens"
            elif filters["max_tokens"] is not None and n_tokens > filters["max_tokens"]:
                reason = "over_max_tokens"
            elif n_assistant < filters["min_assistant_turns"]:
                reason = "few_assistant_turns"
            if reason:
                stat.dropped[reason] += 1
                continue
            if filters["dedupe"]:
                seen.add(row_id)
            good.append(start + j)
        last = stop - 1 if stop > 0 else -1
        read_pos = cache.rows[last]["read_pos"] if last >= 0 else 0
        for pos, reason in cache.meta["drops"]:
            if pos <= read_pos or (stop == len(cache.rows) and cache.meta["complete"]):
                stat.dropped[reason] += 1
        stat.rows_in = sum(stat.dropped.values()) + stat.eval + len(good)
        stats.append(stat)
        passing.append(good)

    # 4. weights, then one seeded shuffle
    weights = [s.weight for s in config.sources] if config.sources[0].weight is not None else None
    takes = weighted_take([len(g) for g in passing], weights)
    if not sum(takes):
        raise DataError("data.sources: no training rows are left after limits, weights and filters")
    train_parts = []
    for stat, cache, good, take in zip(stats, caches, passing, takes, strict=True):
        chosen = cache.rows.select(good[:take])
        stat.train, stat.unused = take, len(good) - take
        stat.train_tokens = sum(chosen["n_tokens"])
        stat.repaired = sum(chosen["repaired"])
        stat.truncated = sum(chosen["truncated"])
        train_parts.append(chosen.select_columns(["input_ids", "labels"]))
    train = datasets.concatenate_datasets(train_parts)
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    train = train.select(order)
    eval_rows = datasets.concatenate_datasets(eval_parts).select_columns(["id", "source", "input_ids", "labels"])
    key = {"caches": [c.path.name for c in caches + eval_caches], "data": config.model_dump(mode="json")}
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return DataMix(train, eval_rows, stats, eval_counts, fingerprint)


# --- describing a mix ----------------------------------------------------------------------------------


def format_sources_table(summary: dict) -> str:
    """Per source: rows in, dropped by reason (reasons that dropped nothing are left out), eval, train, unused."""
    reasons = [r for r in DROP_REASONS if any(s["dropped"][r] for s in summary["sources"])]
    headers = ["source", "format", "rows in", *reasons, "eval", "train", "unused", "train tokens"]
    rows = [
        [s["name"], s["format"], s["rows_in"], *(s["dropped"][r] for r in reasons)]
        + [s["eval"], s["train"], s["unused"], s["train_tokens"]]
        for s in summary["sources"]
    ]
    totals = ["total", ""] + [sum(r[i] for r in rows) for i in range(2, len(headers))]
    cells = [[f"{c:,}" if isinstance(c, int) else str(c) for c in row] for row in [*rows, totals]]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    rule = line(["-" * w for w in widths])
    return "\n".join([line(headers), rule, *(line(r) for r in cells[:-1]), rule, line(cells[-1])])


def render_masked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decodes an example with the trained-on tokens (labels != -100) wrapped in [[ ]]."""
    parts, span, trained = [], [], None
    for token, label in zip(input_ids, labels, strict=True):
        if (label != -100) != trained and span:
            text = tokenizer.decode(span)
            parts.append(f"[[{text}]]" if trained else text)
            span = []
        trained = label != -100
        span.append(token)
    if span:
        text = tokenizer.decode(span)
        parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)

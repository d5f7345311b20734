"""The data mix of a run: a cheap, seeded selection of rows from each source's tokenized cache (fika.source_cache).

A mix is chosen from the caches, in this order:
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
from dataclasses import asdict, dataclass, field

from fika.config import DataConfig, DataSource
from fika.source_cache import READ_REASONS, SourceCache, source_cache
from fika.sources import DataError

FILTER_REASONS = ("duplicate", "under_min_tokens", "over_max_tokens", "few_assistant_turns")
DROP_REASONS = READ_REASONS + FILTER_REASONS


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
    train_need, eval_need = need or reads_needed(config)
    caches = [
        source_cache(s, tokenizer, max_length, config.overlong, config.seed, n, rebuild)
        for s, n in zip(config.sources, train_need, strict=True)
    ]
    eval_caches = [
        source_cache(s, tokenizer, max_length, config.overlong, config.seed, n, rebuild)
        for s, n in zip(config.eval_sources or [], eval_need, strict=True)
    ]
    held = select_eval(config, caches, eval_caches)
    seen = set(held.ids)
    stats, passing = [], []
    for i, (source, cache) in enumerate(zip(config.sources, caches, strict=True)):
        stat, good = select_candidates(config, i, source, cache, held, seen)
        stats.append(stat)
        passing.append(good)
    train = take_by_weights(config, caches, stats, passing)
    key = {"caches": [c.path.name for c in caches + eval_caches], "data": config.model_dump(mode="json")}
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return DataMix(train, held.rows, stats, held.counts, fingerprint)


@dataclass
class HeldOut:
    """The eval set of a mix: its rows, ids and count per source, and how many of each training source's first
    rows it took (`taken`; repeats of an eval row among them: `repeats`)."""

    rows: object
    ids: list[str]
    counts: dict[str, int]
    taken: list[int]
    repeats: list[int]


def select_eval(config: DataConfig, caches: list[SourceCache], eval_caches: list[SourceCache]) -> HeldOut:
    """1. eval: the first rows of each (eval) source, repeats skipped."""
    import datasets

    names = config.source_names()
    shares = eval_shares(config.eval_size, len(config.eval_sources or config.sources))
    eval_parts, eval_ids, counts = [], {}, {}
    taken, repeats = [0] * len(caches), [0] * len(caches)
    eval_from = eval_caches or caches
    eval_names = [s.label(i) for i, s in enumerate(config.eval_sources)] if eval_caches else names
    for i, (cache, share) in enumerate(zip(eval_from, shares, strict=True)):
        picked, pos = [], 0
        ids = cache.rows["id"]
        while len(picked) < share and pos < len(ids):
            if ids[pos] not in eval_ids:
                picked.append(pos)
                eval_ids[ids[pos]] = True
            pos += 1
        if len(picked) < share:
            found = f"{len(ids):,} usable conversations"
            if len(picked) < len(ids):  # the others repeat a conversation already in the eval set
                found = f"{len(picked):,} distinct usable conversations ({len(ids):,} with repeats)"
            raise DataError(
                f"data.eval_size: {config.eval_size} is not allowed: source {eval_names[i]!r} has only {found} for "
                f"its {share} eval rows"
            )
        if not eval_caches:
            taken[i], repeats[i] = pos, pos - len(picked)
        counts[eval_names[i]] = len(picked)
        eval_parts.append(cache.rows.select(picked).add_column("source", [eval_names[i]] * len(picked)))
    rows = datasets.concatenate_datasets(eval_parts).select_columns(["id", "source", "input_ids", "labels"])
    return HeldOut(rows, list(eval_ids), counts, taken, repeats)


def select_candidates(
    config: DataConfig, i: int, source: DataSource, cache: SourceCache, held: HeldOut, seen: set[str]
) -> tuple[SourceStats, list[int]]:
    """2-3. A source's candidates (the rows after its eval rows, up to `limit`) and the ones its filters pass;
    `seen` (the ids already in the mix) grows by the rows kept."""
    stat = SourceStats(
        name=config.source_names()[i], path=source.path, format=cache.meta["format"], note=cache.meta["note"]
    )
    stat.eval = held.taken[i] - held.repeats[i]
    stat.dropped["duplicate"] += held.repeats[i]
    filters = source_filters(source, config)
    start = held.taken[i]
    stop = start if source.weight == 0 else len(cache.rows)
    if source.limit is not None:
        stop = min(stop, start + source.limit)
        if source.weight != 0 and stop - start < source.limit and not cache.meta["complete"]:
            raise DataError(f"data source {source.path!r}: the cache holds too few rows; run again with --rebuild")
    columns = cache.rows.select_columns(["id", "n_tokens", "n_assistant"])[start:stop]
    good = []
    rows = zip(columns["id"], columns["n_tokens"], columns["n_assistant"], strict=True)
    for j, (row_id, n_tokens, n_assistant) in enumerate(rows):
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
    read_pos = cache.rows[stop - 1]["read_pos"] if stop > 0 else 0
    for pos, reason in cache.meta["drops"]:
        if pos <= read_pos or (stop == len(cache.rows) and cache.meta["complete"]):
            stat.dropped[reason] += 1
    stat.rows_in = sum(stat.dropped.values()) + stat.eval + len(good)
    return stat, good


def take_by_weights(config: DataConfig, caches: list[SourceCache], stats: list[SourceStats], passing: list[list[int]]):
    """4. weights: the largest mix with the given shares, then one seeded shuffle; fills in each source's counts."""
    import datasets

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
    return train.select(order)


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

"""What a report claims, measured: paired bootstrap intervals on the shared eval set, rank correlations
(rung vs final, short vs long horizon, seed re-runs), and whether the best value sits on the edge of the space.

Every trial of a search is scored on the same held-out conversations, so two trials are compared *paired*:
the difference of their per-token losses, with a 95% interval from resampling conversations (token-weighted,
seeded). A difference whose interval excludes 0 is beyond the noise of the eval set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000


@dataclass
class Paired:
    """`a - b` in per-token loss on the same conversations, with a 95% bootstrap interval."""

    diff: float
    low: float
    high: float
    conversations: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_bootstrap(
    a_sums: list[float], b_sums: list[float], counts: list[int], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> Paired:
    """The paired difference of two trials' per-token eval losses, resampling conversations (token-weighted)."""
    a, b, c = np.asarray(a_sums, float), np.asarray(b_sums, float), np.asarray(counts, float)
    delta = a - b
    diff = delta.sum() / c.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), size=(samples, len(c)))
    boot = delta[idx].sum(axis=1) / np.maximum(c[idx].sum(axis=1), 1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Paired(float(diff), float(low), float(high), len(c))


def aligned(a: dict, b: dict) -> tuple[list[float], list[float], list[int]] | None:
    """Two evals' per-conversation sums on their shared conversations (None when they share none)."""
    index = {i: k for k, i in enumerate(b["ids"])}
    pairs = [(k, index[i]) for k, i in enumerate(a["ids"]) if i in index]
    if not pairs:
        return None
    return ([a["sums"][k] for k, _ in pairs], [b["sums"][j] for _, j in pairs], [a["counts"][k] for k, _ in pairs])


def compare(a: dict, b: dict) -> Paired | None:
    """Paired comparison of two `evals.jsonl` records (a - b)."""
    shared = aligned(a, b)
    return paired_bootstrap(*shared) if shared else None


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 pairs, or when one side is constant)."""
    if len(x) < 3:
        return None
    rx, ry = np.asarray(ranks(x)), np.asarray(ranks(y))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def verdict(rho: float | None) -> str:
    if rho is None:
        return "not enough configs to tell"
    if rho >= 0.8:
        return "the order holds"
    if rho >= 0.4:
        return "the order partly holds"
    return "the order does not hold"


def edge_values(space: dict, best_params: dict, hard_floor: dict[str, float]) -> list[str]:
    """Searched numeric keys whose best value is the smallest or largest choice, or within 5% of a range bound.

    A value at a hard limit of its key (dropout 0, weight 0) is not an edge the space could widen past.
    """
    notes = []
    for key, param in space.items():
        parts = [p.strip() for p in key.split(",")]
        best = best_params.get(key)
        values = best if isinstance(best, list) else [best]
        if param.choice is not None:
            columns = [[c[i] if isinstance(c, list) else c for c in param.choice] for i in range(len(parts))]
        else:
            columns = [list(param.uniform or param.loguniform)]
        for part, column, value in zip(parts, columns, values, strict=False):
            numbers = sorted({v for v in column if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if len(numbers) < 2 or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            low, high = numbers[0], numbers[-1]
            margin = 0.05 * (high - low) if param.choice is None else 0
            if param.loguniform is not None:
                margin = 0.05 * (math.log(high) - math.log(low))
                at_low = math.log(value) - math.log(low) <= margin
                at_high = math.log(high) - math.log(value) <= margin
            else:
                at_low, at_high = value - low <= margin, high - value <= margin
            if at_low and value > hard_floor.get(part.rsplit(".", 1)[-1], -math.inf):
                notes.append(f"{part} = {value:g} is the smallest value searched: widen the space below it")
            elif at_high:
                notes.append(f"{part} = {value:g} is the largest value searched: widen the space above it")
    return notes


def paired_over_seeds(a_evals: list[dict], b_evals: list[dict], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0):
    """`a - b` in per-token eval loss, paired by seed (a_evals[i] and b_evals[i] ran with the same seed and data
    order) and over the held-out conversations: the mean over seeds of each seed's paired difference, with a 95%
    interval from resampling both the seeds and the conversations (the two sources of noise in a ranking of
    re-run configs). None when a pair shares no conversation."""
    pairs = [aligned(a, b) for a, b in zip(a_evals, b_evals, strict=True)]
    if not pairs or any(p is None for p in pairs) or len({len(p[2]) for p in pairs}) != 1:
        return None
    a, b, c = (np.array([p[k] for p in pairs], float) for k in range(3))  # each: seeds x conversations
    diff = float(((a - b).sum(axis=1) / np.maximum(c.sum(axis=1), 1)).mean())
    rng = np.random.default_rng(seed)
    seeds, conversations = a.shape
    s = rng.integers(0, seeds, size=(samples, seeds))
    v = rng.integers(0, conversations, size=(samples, conversations))
    delta = (a - b)[s[:, :, None], v[:, None, :]].sum(axis=2) / np.maximum(
        c[s[:, :, None], v[:, None, :]].sum(axis=2), 1
    )
    low, high = np.percentile(delta.mean(axis=1), [2.5, 97.5])
    return Paired(diff, float(low), float(high), conversations)

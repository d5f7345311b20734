"""The `local` searcher's Optuna sampler: start-up draws at the top learning rate and the largest LoRA rank, then a
local search around the best trial, TPE when no neighbour is left.

Two priors about short LoRA runs hold before a search starts. The learning rate matters most, and the best one falls
as runs get longer (Bjorck et al., ICLR 2025), so at a search's horizon of tens of steps it sits at the top of the
usual range. LoRAs of every rank follow the same loss curve early in a run, a low rank falls behind once its capacity
runs out, and the best learning rate hardly moves with the rank (LoRA Without Regret, Schulman et al., 2025), so the
largest rank is never the worse start. The start-up draws therefore take the largest learning-rate and rank choices,
and spread over the choices of every other key (each takes one of its least-used choices so far; so do a paired
key's choices tied at the largest rank). A warm start from an earlier search that differs replaces both priors with
what that search measured: its best trial runs first, and the other start-up draws take its learning rate and rank.
After them, each trial is an untried configuration one choice away from the best completed trial (the local search
SMAC runs around its incumbents), so a search climbs from its best start without re-learning the space. A key of
numbers moves to its nearest untried value on either side (the next learning rate down from the top, not the bottom
one), and the learning rate moves first, while an untried one is next to the best's: it matters most, and where the
top of the choices is too high, the search walks down from it. When every neighbour of the best has run, TPE draws.
A local move changes choice keys only: TPE draws every key given as a range, for every trial (a learning rate or
rank given as a range too).
"""

from __future__ import annotations

import random

from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import TrialState

from fika.search.sampler import WrappedSampler, config_key
from fika.search.spec import top_first_key
from fika.search.trials import decode_choice

LEARNING_RATE = "train.learning_rate"


class LocalSearchSampler(WrappedSampler):
    """Wraps a TPE sampler: start-up draws with the learning rate and the LoRA rank at their largest choices (or a
    warm start's) and the other choice keys at their least-used choices, then untried neighbours (one choice key
    changed, the learning rate first) of the best completed trial, drawn at random among them; TPE's draw when none
    is left (and for ranges). `local_draws` holds the numbers of the trials it drew by local search."""

    def __init__(self, sampler: BaseSampler, startup: int, seed: int):
        super().__init__(sampler)
        self.startup, self.rng = startup, random.Random(seed)
        self.intersection = IntersectionSearchSpace(include_pruned=True)
        self.local_draws: set[int] = set()

    def finished(self, study) -> int:
        """Trials that ended, failed ones too: a top learning rate that diverges ends the start-up like any other."""
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))

    def infer_relative_search_space(self, study, trial):
        return {
            **self.intersection.calculate(study),
            **self.sampler.infer_relative_search_space(study, trial),
        }

    def sample_relative(self, study, trial, search_space):
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if self.finished(study) >= self.startup and done:
            near = self.neighbours(study, trial, search_space, min(done, key=lambda t: t.value).params)
            if near:
                self.local_draws.add(trial.number)
                return self.rng.choice(near)
        inner_space = self.sampler.infer_relative_search_space(study, trial)
        return self.sampler.sample_relative(study, trial, inner_space) if inner_space else {}

    def neighbours(self, study, trial, search_space: dict, best: dict) -> list[dict]:
        """The choice keys of the configurations one choice away from `best` whose choices no trial holds: a key of
        numbers moves to its nearest untried value on either side, another key to any untried value; while a
        learning-rate move is left, only those. Keys with a range are left out: TPE draws them for every trial."""
        choices = [key for key, dist in search_space.items() if isinstance(dist, CategoricalDistribution)]
        if not choices or set(choices) - set(best):
            return []
        trials = study.get_trials(deepcopy=False)
        tried = {config_key({key: t.params.get(key) for key in choices}) for t in trials if t.number != trial.number}
        center = {key: best[key] for key in choices}
        moves = [
            (key, value)
            for key in choices
            for value in nearest_untried(
                search_space[key], center[key], lambda v, k=key: config_key({**center, k: v}) in tried
            )
        ]
        first = [(key, value) for key, value in moves if LEARNING_RATE in key.split(",")]
        return [{**center, key: value} for key, value in first or moves]

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self.finished(study) < self.startup and isinstance(param_distribution, CategoricalDistribution):
            tops = warm_choices(study, trial, param_name) or top_choices(param_name, param_distribution)
            return self.least_used(study, trial, param_name, tops or param_distribution.choices)
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def least_used(self, study, trial, param_name: str, choices) -> object:
        """One of `choices` the study's other trials hold least often, at random among them: the start-up draws
        spread over each key's choices, as a Latin hypercube does."""
        earlier = [t.params.get(param_name) for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        used = {choice: earlier.count(choice) for choice in choices}
        return self.rng.choice([choice for choice, n in used.items() if n == min(used.values())])


def warm_choices(study, trial, param_name: str) -> list:
    """For a key of TOP_FIRST, the values that trials of a warm start (`fika_drawn` warm: an earlier search's best)
    hold: the start-up draws take the value an earlier search measured instead of the largest."""
    if top_first_key(param_name) is None:
        return []
    warm = [
        t.params[param_name]
        for t in study.get_trials(deepcopy=False)
        if t.number != trial.number and t.user_attrs.get("fika_drawn") == "warm" and param_name in t.params
    ]
    return list(dict.fromkeys(warm))


def numeric_choices(distribution: CategoricalDistribution) -> list | None:
    """The choices decoded, when all are numbers or all lists of numbers (paired keys); else None."""
    values = [decode_choice(c) for c in distribution.choices]

    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if all(number(v) for v in values) or all(isinstance(v, list) and all(number(x) for x in v) for v in values):
        return values
    return None


def top_choices(param_name: str, distribution) -> list | None:
    """The choices with the largest value of the first key of TOP_FIRST that `param_name` holds (a paired key such as
    `lora.r,lora.alpha` by its r: [16, 16] and [16, 32] tie); None for another key, a range, or choices that are not
    all numbers."""
    names, key = param_name.split(","), top_first_key(param_name)
    if (
        key is None
        or not isinstance(distribution, CategoricalDistribution)
        or (values := numeric_choices(distribution)) is None
    ):
        return None
    values = [v[names.index(key)] if isinstance(v, list) else v for v in values]
    return [c for c, v in zip(distribution.choices, values, strict=True) if v == max(values)]


def nearest_untried(distribution: CategoricalDistribution, value, tried) -> list:
    """The choices a local move from `value` tries: for numbers, the nearest untried choice below and above it; for
    other choices (pairs too: they have no one order), every untried one. `tried(choice)` says whether that move's
    configuration ran."""
    values = numeric_choices(distribution)
    if values is None or any(isinstance(v, list) for v in values):
        return [c for c in distribution.choices if c != value and not tried(c)]
    order = [c for _, c in sorted(zip(values, distribution.choices, strict=True), key=lambda pair: pair[0])]
    at = order.index(value)
    below = [c for c in reversed(order[:at]) if not tried(c)][:1]
    above = [c for c in order[at + 1 :] if not tried(c)][:1]
    return below + above

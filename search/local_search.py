"""The `local` searcher's Optuna sampler: start-up draws at the top learning rate, then a local search around the
best trial, TPE when no neighbour is left.

Two things are known about short LoRA runs before a search starts: the learning rate matters most, and the best
one falls as runs get longer (Bjorck et al., ICLR 2025), so at a search's horizon of tens of steps it sits at the top
of the usual range. The start-up draws therefore take the largest learning-rate choice, and spread over the choices
of every other key (each takes one of its least-used choices so far). After them, each trial is an untried
configuration one choice away from the best completed trial (the local search SMAC runs around its incumbents), so a
search climbs from its best start without re-learning the space; when every neighbour of the best has run, TPE
draws. A learning rate given as a range is drawn by TPE, and a local move changes choice keys only.
"""

from __future__ import annotations

import random

from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import TrialState

from fika.search.sampler import WrappedSampler, config_key

LEARNING_RATE = "train.learning_rate"


class LocalSearchSampler(WrappedSampler):
    """Wraps a TPE sampler: start-up draws with the learning rate at its largest choice and the other choice keys at
    their least-used choices, then untried neighbours (one choice key changed) of the best completed trial, drawn at
    random among them; TPE's draw when none is left (and for ranges). `local_draws` holds the numbers of the trials
    it drew by local search."""

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
        """The configurations one choice away from `best` that no trial of the study holds."""
        if not search_space or set(search_space) - set(best):
            return []
        tried = {config_key(t.params) for t in study.get_trials(deepcopy=False) if t.number != trial.number}
        center = {key: best[key] for key in search_space}
        return [
            near
            for key, dist in search_space.items()
            if isinstance(dist, CategoricalDistribution)
            for value in dist.choices
            if value != center[key] and config_key(near := {**center, key: value}) not in tried
        ]

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self.finished(study) < self.startup and isinstance(param_distribution, CategoricalDistribution):
            top = top_choice(param_distribution) if param_name == LEARNING_RATE else None
            return top if top is not None else self.least_used(study, trial, param_name, param_distribution)
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def least_used(self, study, trial, param_name: str, distribution: CategoricalDistribution):
        """One of the choices the study's other trials hold least often, at random among them: the start-up draws
        spread over each key's choices, as a Latin hypercube does."""
        earlier = [t.params.get(param_name) for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        used = {choice: earlier.count(choice) for choice in distribution.choices}
        return self.rng.choice([choice for choice, n in used.items() if n == min(used.values())])


def top_choice(distribution) -> float | None:
    """The largest of a choice list of numbers; None for a range or a list that is not all numbers."""
    if not isinstance(distribution, CategoricalDistribution):
        return None
    if not all(isinstance(c, int | float) and not isinstance(c, bool) for c in distribution.choices):
        return None
    return max(distribution.choices)

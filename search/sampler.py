"""The Optuna sampler of a search, wrapped so that it never proposes a configuration that has run: a search's
study then holds only the trials that run (no repeated draw is told FAIL), while the sampler's own choices are
kept whenever they are new."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from optuna.samplers import BaseSampler

MAX_DRAWS = 20  # proposals of the sampler before one of the configurations not yet run is taken instead


def config_key(params: dict[str, Any]) -> str:
    """How a configuration is compared with the ones that ran."""
    return json.dumps(params, sort_keys=True, default=str)


class NoRepeatSampler(BaseSampler):
    """An Optuna sampler (TPE, random, ...) that draws again while it proposes a configuration in `seen` (the keys
    of the configurations that ran or run), and after `MAX_DRAWS` such proposals takes one of the configurations not
    yet run (`untried()`, a choice space's) at random. The trials that got such a configuration are in `fallbacks`.

    A full proposal (relative sampling: TPE after its start-up trials, GP) is checked whole. A trial whose keys are
    drawn one by one (random start-up draws) is checked at its last key, which is then drawn again, or taken from
    the untried configurations that share the keys already drawn.
    """

    def __init__(self, sampler: BaseSampler, seen: dict[str, int], untried: Callable[[], list[dict] | None]):
        self.sampler, self.seen, self.untried = sampler, seen, untried
        self.space: dict = {}  # the searched keys and their distributions, in the order a trial draws them
        self.fallbacks: set[int] = set()

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        params = self.sampler.sample_relative(study, trial, search_space)
        if not self.space or set(params) != set(self.space):
            return params
        for _ in range(MAX_DRAWS - 1):
            if config_key(params) not in self.seen:
                return params
            params = self.sampler.sample_relative(study, trial, search_space)
        return self.new_configuration(trial, params, {})

    def sample_independent(self, study, trial, param_name, param_distribution):
        value = self.sampler.sample_independent(study, trial, param_name, param_distribution)
        names = list(self.space)
        if not names or param_name != names[-1] or set(trial.params) != set(names[:-1]):
            return value
        for _ in range(MAX_DRAWS - 1):
            if config_key({**trial.params, param_name: value}) not in self.seen:
                return value
            value = self.sampler.sample_independent(study, trial, param_name, param_distribution)
        return self.new_configuration(trial, {**trial.params, param_name: value}, trial.params)[param_name]

    def new_configuration(self, trial, proposed: dict, fixed: dict) -> dict:
        """The proposal when it is new, else an untried configuration that keeps the keys already `fixed` (the
        proposal again when there is none: the searcher then closes the trial)."""
        if config_key(proposed) not in self.seen:
            return proposed
        untried = [c for c in self.untried() or [] if all(c[k] == v for k, v in fixed.items())]
        if not untried:
            return proposed
        self.fallbacks.add(trial.number)
        return random.Random(len(self.seen)).choice(untried)

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()

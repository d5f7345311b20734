"""The Optuna sampler of a search, wrapped so that it never proposes a configuration that has run: a search's
study then holds only the trials that run (no repeated draw is told FAIL), while the sampler's own choices are
kept whenever they are new."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

from optuna.samplers import BaseSampler

MAX_DRAWS = 20  # proposals of the sampler before one of the configurations not yet run is taken instead


def config_key(params: dict[str, Any]) -> str:
    """How a configuration is compared with the ones that ran."""
    return json.dumps(params, sort_keys=True, default=str)


class WrappedSampler(BaseSampler):
    """An Optuna sampler that hands every call to `sampler`; a subclass changes the calls it needs to."""

    def __init__(self, sampler: BaseSampler):
        self.sampler = sampler

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


class NoRepeatSampler(WrappedSampler):
    """An Optuna sampler (TPE, random, ...) that draws again while it proposes a configuration in `seen` (the keys
    of the configurations that ran or run), and after `MAX_DRAWS` such proposals takes one of the configurations not
    yet run (`untried()`, a choice space's) at random. The trials that got such a configuration are in `fallbacks`.

    A full proposal (relative sampling: GP, a multivariate TPE) is checked whole. A trial whose keys are drawn one by
    one (random draws, TPE) is checked at each key: a value is drawn again while every configuration that starts
    with the keys drawn so far has run (in a choice space; at the last key, while the configuration has run), and
    then taken from an untried configuration that shares the keys already drawn. So the last key always has a value
    left that makes the configuration new.
    """

    def __init__(self, sampler: BaseSampler, seen: dict[str, int], untried: Callable[[], list[dict] | None]):
        super().__init__(sampler)
        self.seen, self.untried = seen, untried
        self.space: dict = {}  # the searched keys and their distributions, in the order a trial draws them
        self.fallbacks: set[int] = set()

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
        if param_name not in names or set(trial.params) != set(names[: names.index(param_name)]):
            return value
        for _ in range(MAX_DRAWS - 1):
            if self.open({**trial.params, param_name: value}):
                return value
            value = self.sampler.sample_independent(study, trial, param_name, param_distribution)
        return self.new_configuration(trial, {**trial.params, param_name: value}, trial.params)[param_name]

    def open(self, drawn: dict) -> bool:
        """Whether a configuration that starts with the keys `drawn` so far has not run: for all keys, whether it
        is not in `seen`; for fewer, in a choice space, whether fewer of its completions ran than it has (a trial
        whose first keys allow only configurations that ran would have to repeat one at its last key)."""
        if len(drawn) == len(self.space):
            return config_key(drawn) not in self.seen
        rest = [self.space[name] for name in self.space if name not in drawn]
        if not all(hasattr(d, "choices") for d in rest):
            return True
        ran = sum(all(config.get(k) == v for k, v in drawn.items()) for config in map(json.loads, self.seen))
        return ran < math.prod(len(d.choices) for d in rest)

    def new_configuration(self, trial, proposed: dict, fixed: dict) -> dict:
        """The proposal (all keys, or the first ones) when it is still open, else an untried configuration that keeps
        the keys already `fixed` (the proposal again when there is none: the searcher then closes the trial)."""
        if self.open(proposed):
            return proposed
        untried = [c for c in self.untried() or [] if all(c[k] == v for k, v in fixed.items())]
        if not untried:
            return proposed
        self.fallbacks.add(trial.number)
        return random.Random(len(self.seen)).choice(untried)

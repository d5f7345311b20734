"""ASHA whose rungs compare a trial only with the trials that share its values of some keys (its lr schedule).

ASHA stops a trial at a rung when its metric there is worse than most trials' at the same rung, which assumes that
a trial's order mid-run is its order at the end. Across learning-rate schedules it is not: a schedule sets the
learning rate at each step from the run's length, so at a rung one schedule may still be at a high learning rate
that another has already decayed from, and its loss there says little about its loss at the end. On the demo's
grid the best configuration (cosine with restarts) is worse than the linear and cosine ones at steps 20 and 40 and
better at 60, and a plain ASHA stops it. Comparing within a schedule keeps ASHA's early stops where they are fair.
"""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class GroupedASHAScheduler(FIFOScheduler):
    """One Ray ASHAScheduler per group of trials with the same values of `keys` (given as in Tune's config); each
    trial's rung results go to its group's ASHA alone. Takes ASHAScheduler's options."""

    def __init__(self, keys: list[str], **asha_options):
        super().__init__()
        self.keys, self.asha_options = list(keys), asha_options
        self.groups: dict[str, ASHAScheduler] = {}

    def group(self, trial) -> ASHAScheduler:
        """The ASHA of a trial's group, made when its first trial arrives."""
        name = json.dumps([trial.config.get(key) for key in self.keys], default=str)
        if name not in self.groups:
            self.groups[name] = ASHAScheduler(**self.asha_options)
        return self.groups[name]

    def on_trial_add(self, tune_controller, trial) -> None:
        self.group(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.group(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.group(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.group(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"Using ASHA within {', '.join(self.keys)}: {len(self.groups)} groups"

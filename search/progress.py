"""Live progress of a search: trials done / running / pruned / failed, the best metric, time left."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ray.tune import Callback


class SearchProgress(Callback):
    """Prints one status line when a trial ends (and at most every `every_s` seconds otherwise).

    `on_trial_end(trial_id)` is called after each finished trial (the report is rebuilt there).
    """

    def __init__(
        self,
        total: int,
        metric: str,
        max_steps: int,
        log: Callable[[str], None] | None = None,
        on_trial_end: Callable[[], None] | None = None,
        every_s: float = 30.0,
    ):
        self.total, self.metric, self.max_steps = total, metric, max_steps
        self.log, self.on_trial_end, self.every_s = log, on_trial_end, every_s
        self.started = time.time()
        self.last_line = 0.0
        self.steps: dict[str, int] = {}
        self.ended: dict[str, str] = {}
        self.best: tuple[float, str] | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.steps[trial.trial_id] = result.get("step", 0)
        value = result.get(self.metric)
        if value is not None and math.isfinite(value) and (self.best is None or value < self.best[0]):
            self.best = (value, trial.trial_id)
        if time.time() - self.last_line > self.every_s:
            self.print_status(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        status = last.get("status") or ("completed" if last.get("step", 0) >= self.max_steps else "stopped")
        self.ended[trial.trial_id] = "pruned" if status == "stopped" else status
        self.trial_ended(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = "failed"
        self.trial_ended(trials)

    def trial_ended(self, trials) -> None:
        if self.on_trial_end is not None:
            self.on_trial_end()
        self.print_status(trials)

    def print_status(self, trials) -> None:
        self.last_line = time.time()
        elapsed = self.last_line - self.started
        counts = {
            k: sum(1 for v in self.ended.values() if v == k) for k in ("completed", "pruned", "diverged", "failed")
        }
        running = [t for t in trials if t.status == "RUNNING" and t.trial_id not in self.ended]
        done_steps = sum(self.steps.values())
        # time left: the steps still to run (a trial not yet pruned may run to max_steps) at the pace so far
        left_steps = (self.total - len(self.ended)) * self.max_steps - sum(
            self.steps.get(t.trial_id, 0) for t in running
        )
        eta = (
            f"{max(left_steps, 0) * elapsed / done_steps / 60:.1f} min left (at most)"
            if done_steps
            else "time left: unknown"
        )
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else f"no {self.metric} yet"
        (self.log or print)(  # print looked up late: Tune pickles its callbacks with the experiment state
            f"[{elapsed / 60:5.1f} min] {len(self.ended)}/{self.total} trials done "
            f"({', '.join(f'{v} {k}' for k, v in counts.items())}), {len(running)} running; {best}; {eta}"
        )

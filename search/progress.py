"""Live progress of a search: trials done / running / pruned / failed, the best metric, time left.

The counts come from the run folder (every trial's result.json), not from what this driver saw, so a
resumed search counts the trials of the interrupted run too.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ray.tune import Callback

from fika.files import read_json
from fika.search.report.rows import public_status
from fika.search.searcher import trial_status


def record_error(folder: Path, error_file: str | None) -> None:
    """Records a trial that Ray gave up on (its worker died, say) in its own folder, unless the trial already
    recorded how it failed; the reason is the last line of Ray's error file."""
    result = read_json(folder / "result.json") or {}
    if result.get("status") == "failed" and result.get("error"):
        return
    lines = []
    if error_file and Path(error_file).exists():
        lines = [line for line in Path(error_file).read_text(errors="replace").splitlines() if line.strip()]
    from fika.result import write_failed_result

    folder.mkdir(parents=True, exist_ok=True)
    write_failed_result(folder, (lines[-1] if lines else "the trial's worker failed")[:500])


class SearchProgress(Callback):
    """Prints one status line when a trial ends (and at most every `every_s` seconds otherwise).

    `on_trial_end()` is called after each finished trial (the report is rebuilt there).
    """

    def __init__(
        self,
        run_dir: Path,
        total: int,
        metric: str,
        max_steps: int,
        on_trial_end: Callable[[], None] | None = None,
        every_s: float = 30.0,
        only: set[str] | None = None,
    ):
        self.run_dir, self.total, self.metric, self.max_steps = Path(run_dir), total, metric, max_steps
        self.only = only  # count these trial folders only (the re-runs of `fika confirm`), else the search's trials
        self.on_trial_end, self.every_s = on_trial_end, every_s
        self.started = time.time()
        self.last_line = 0.0
        self.steps: dict[str, int] = {}
        self.just_ended: dict[str, tuple[str, float | None]] = {}  # folder: (status, metric) as Tune saw it end
        self.results: dict[str, tuple[int, tuple[str, float | None] | None]] = {}  # folder: (mtime, its result)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.first_result_at = getattr(self, "first_result_at", None) or time.time()
        self.steps[trial.trial_id] = result.get("step", 0)
        if time.time() - self.last_line > self.every_s:
            self.print_status(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self.just_ended[folder_of(trial)] = (public_status(trial_status(last, self.max_steps)), last.get(self.metric))
        self.trial_ended(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        record_error(self.run_dir / "trials" / folder_of(trial), trial.error_file)
        self.just_ended[folder_of(trial)] = ("failed", None)
        self.trial_ended(trials)

    def trial_ended(self, trials) -> None:
        if self.on_trial_end is not None:
            self.on_trial_end()
        self.print_status(trials)

    def ended(self) -> tuple[Counter, tuple[float, str] | None]:
        """Counts by status of the trials that ended, and the best metric so far: from their folders, and for a
        trial this driver just saw end whose result.json is not written yet (Tune ends a trial at its last
        step's record, a moment before the trial writes its result), from that last record."""
        ended = dict(self.just_ended)
        for path in (self.run_dir / "trials").glob("*/result.json"):
            wanted = path.parent.name in self.only if self.only else not (path.parent / "confirm.json").exists()
            if wanted:
                ended.update(self.result_of(path))
        done = [
            (value, name)
            for name, (status, value) in ended.items()
            if status == "completed" and value is not None and math.isfinite(value)
        ]
        return Counter(status for status, _ in ended.values()), min(done, default=None)

    def result_of(self, path: Path) -> dict[str, tuple[str, float | None]]:
        """A trial's status and metric from its result.json, read again only when the file changed (a long search
        prints a line per trial's end: reading every result each time would grow with the trials)."""
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return {}
        cached = self.results.get(path.parent.name)
        if cached is None or cached[0] != stamp:
            result = read_json(path)
            entry = (public_status(result.get("status", "failed")), result.get(self.metric)) if result else None
            cached = self.results[path.parent.name] = (stamp, entry)
        return {path.parent.name: cached[1]} if cached[1] else {}

    def print_status(self, trials) -> None:
        self.last_line = time.time()
        elapsed = self.last_line - self.started
        counts, best = self.ended()
        done = sum(counts.values())
        running = [t for t in trials if t.status == "RUNNING" and folder_of(t) not in self.just_ended]
        run_steps = sum(self.steps.get(t.trial_id, 0) for t in running)
        ran = sum(self.steps.values())
        eta = time_left(
            max(self.total - done, 0) * self.max_steps - run_steps,
            ran,
            self.last_line - getattr(self, "first_result_at", self.last_line),
            bool(running),
        )
        shown = ", ".join(f"{counts[k]} {k}" for k in ("completed", "pruned", "diverged", "failed"))
        best_text = f"best {self.metric} {best[0]:.4f} ({best[1]})" if best else f"no {self.metric} yet"
        print(  # looked up late: Tune pickles its callbacks with the experiment state
            f"[{elapsed / 60:5.1f} min] {done}/{self.total} trials done ({shown}), {len(running)} running; "
            f"{best_text}; {eta}",
            flush=True,
        )


def time_left(steps_left: int, steps_ran: int, seconds: float, running: bool) -> str:
    """The time left at the search's pace so far (`seconds` for `steps_ran` steps over all its trials), if every
    trial not yet ended runs to max_steps; pruning makes it shorter, a slot left idle at the end longer."""
    if steps_ran <= 10:
        return "time left: unknown yet"
    if steps_left <= 0:
        return "finishing the last trials" if running else "no steps left"
    return f"about {steps_left * seconds / steps_ran / 60:.1f} min left if no more trials are pruned"


def folder_of(trial) -> str:
    """The trial's folder name: its Tune id, or a re-run's own name (the trainable reports it)."""
    return Path((trial.last_result or {}).get("trial_dir") or trial.trial_id).name

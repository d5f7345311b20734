"""The Optuna searcher of a fika search: OptunaSearch whose study tells the truth about every trial, a
concurrency limiter that survives a resume, and how a trial's end is told to Optuna. The Ray and Optuna internals
it uses are listed in fika.search.internals."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from fika.files import append_line, read_json
from fika.result import write_failed_result
from fika.search.internals import keep_tune_state


class FikaOptunaSearch(OptunaSearch):
    """OptunaSearch whose study tells the truth about every trial, and that never runs a configuration twice.

    - A result is reported to Optuna as an intermediate value when it carries the rung metric at a rung,
      or the search metric (the final eval); per-step records are skipped.
    - A trial stopped by the scheduler is told PRUNED (its value: the last rung's), a diverged one FAIL, a
      completed one COMPLETE: `optuna.load_study` and optuna-dashboard show what the report shows.
    - TPE can draw a combination of choices again; such a draw is told FAIL, marked with the user attribute
      `fika_repeat_of`, and replaced (up to 20 draws).
    - Every draw is logged to `draws.jsonl` in the run folder: the trial, its params, and how it was drawn
      (`baseline`, `random` during the start-up trials, or `tpe`).
    - `budget` caps the trials of the search, counting trials adopted from an interrupted run.
    """

    def __init__(
        self, *args, run_dir: str, rungs: list[int], rung_key: str, max_steps: int, startup: int, budget: int, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.run_dir, self.rungs, self.rung_key, self.max_steps = run_dir, rungs, rung_key, max_steps
        self.startup, self.budget = startup, budget
        self.seen: dict[str, int] = {}  # params -> optuna trial number
        self.adopted = 0

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if value is None and result.get("step") in self.rungs:
            value = result.get(self.rung_key)
        if value is not None and math.isfinite(value) and trial_id in self._ot_trials:
            with contextlib.suppress(RuntimeError):  # a finished trial replayed after a resume
                self._ot_trials[trial_id].report(value, result.get("step", 0))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        self._completed_trials.add(trial_id)
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if frozen.state.is_finished():
            return  # told before the driver was killed, replayed after the resume
        status = "failed" if error else trial_status(result or {}, self.max_steps)
        step = (result or {}).get("step", 0)
        rung_value = (result or {}).get(self.rung_key)
        if (
            status == "stopped"
            and rung_value is not None
            and math.isfinite(rung_value)
            and step not in frozen.intermediate_values
        ):
            ot_trial.report(rung_value, step)  # Tune withholds the result that stopped the trial
        ot_trial.set_user_attr("fika_status", "pruned" if status == "stopped" else status)
        tell_final(self._ot_study, ot_trial, status, (result or {}).get(self.metric), error)

    def suggest(self, trial_id: str):
        if len(self._ot_trials) + self.adopted >= self.budget:
            return Searcher.FINISHED
        finished = len(self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        for attempt in range(21):
            if attempt == 20:  # TPE keeps drawing what ran: take a combination that has not run, if one is left
                untried = self.untried()
                if not untried:
                    return Searcher.FINISHED
                self._ot_study.enqueue_trial(random.Random(len(self.seen)).choice(untried))
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            key = json.dumps(config, sort_keys=True, default=str)
            if key not in self.seen:
                break
            ot_trial.set_user_attr("fika_repeat_of", self.seen[key])
            self._ot_study.tell(self._ot_trials.pop(trial_id), state=TrialState.FAIL)
        fixed = "fixed_params" in self._ot_study._storage.get_trial_system_attrs(ot_trial._trial_id)
        drawn = "random" if attempt == 20 or (not fixed and finished < self.startup) else "baseline" if fixed else "tpe"
        ot_trial.set_user_attr("tune_trial_id", trial_id)
        ot_trial.set_user_attr("fika_drawn", drawn)
        self.seen[key] = ot_trial.number
        append_line(
            Path(self.run_dir) / "draws.jsonl",
            {"trial": trial_id, "number": ot_trial.number, "drawn": drawn, "params": config},
        )
        return config

    def untried(self) -> list[dict]:
        """The combinations of a choice-only space that have not run (empty for a space with ranges)."""
        from optuna.distributions import CategoricalDistribution

        if not all(isinstance(d, CategoricalDistribution) for d in self._space.values()):
            return []
        names = list(self._space)
        combos = (
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(self._space[n].choices for n in names))
        )
        return [c for c in combos if json.dumps(c, sort_keys=True, default=str) not in self.seen]

    def reconcile(self) -> list[str]:
        """After a killed driver: settles the study trials that Tune never recorded (asked after its last save).

        A trial whose folder holds a final result is told that result; one that was cut short is told FAIL and
        its folder is marked failed (interrupted). One that never started is told FAIL. Every one of them that
        ran counts toward the budget, also one the study was told of before the kill (Tune's save had failed, on
        a full disk), and none of their params are drawn again. Returns the ids of the interrupted trials.
        """
        interrupted = []
        self.adopted = 0  # counted again from the study: a second resume sees the first one's adopted trials too
        for frozen in self._ot_study.get_trials(deepcopy=False):
            key = json.dumps(frozen.params, sort_keys=True, default=str)
            self.seen.setdefault(key, frozen.number)
            trial_id = frozen.user_attrs.get("tune_trial_id")
            if trial_id is None or trial_id in self._ot_trials:
                continue
            folder = Path(self.run_dir) / "trials" / trial_id
            ran = (folder / "config.yaml").exists() or (folder / "result.json").exists()
            self.adopted += int(ran)
            if frozen.state.name != "RUNNING":
                continue
            result = read_json(folder / "result.json") or {}
            status = result.get("status")
            storage, tid = self._ot_study._storage, frozen._trial_id
            if status in ("completed", "stopped", "diverged"):
                storage.set_trial_user_attr(tid, "fika_status", "pruned" if status == "stopped" else status)
                for step, value in sorted((int(k), v) for k, v in (result.get("eval_losses") or {}).items()):
                    if math.isfinite(value):
                        storage.set_trial_intermediate_value(tid, step, value)
                tell_final(self._ot_study, frozen, status, result.get(self.metric), False)
            else:
                storage.set_trial_user_attr(tid, "fika_status", "failed")
                storage.set_trial_user_attr(tid, "fika_interrupted", "the driver was killed before Ray recorded it")
                self._ot_study.tell(frozen.number, state=TrialState.FAIL)
                if ran:  # a trial of this search, ended as failed
                    write_failed_result(folder, "interrupted: the driver was killed before Ray recorded this trial")
                    interrupted.append(trial_id)
                else:  # never started: an empty folder (made just before the disk filled) goes
                    with contextlib.suppress(OSError):
                        folder.rmdir()
        return interrupted

    def save(self, checkpoint_path: str) -> None:
        """Ray's save, plus a whole copy of Tune's state files in the run folder (`keep_tune_state`)."""
        super().save(checkpoint_path)
        keep_tune_state(checkpoint_path, Path(self.run_dir))

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.reconcile()


class ResumableConcurrencyLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, except that the completion of a trial it did not suggest reaches the searcher.

    After a resume the limiter knows none of the trials restored from the interrupted run (`set_state`), and
    Tune's own limiter would drop their completions: the study would keep them RUNNING (and fika's settling
    would then tell a completed trial FAIL).

    And a trial frees its place even when the searcher fails to take its completion (its storage failed: a full
    disk, a lost database connection). Tune logs that error and fails the trial; with the place kept, the
    limiter would hand out no trial once its places were gone, and Tune would wait for one forever.
    """

    def set_state(self, state: dict) -> None:
        """Restores the limiter, without its live trials: they are the ones of Tune's save before last (see
        `FikaOptunaSearch.save`), and one that has ended since would hold its place forever."""
        super().set_state({**state, "live_trials": set(), "num_unfinished_live_trials": 0})

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.live_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        try:
            super().on_trial_complete(trial_id, result=result, error=error)
        finally:
            if trial_id in self.live_trials:
                self.live_trials.remove(trial_id)
                self.num_unfinished_live_trials -= 1


def close_interrupted(study) -> None:
    """At the end of a search no study trial may stay RUNNING: any left is told FAIL (interrupted)."""
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(frozen._trial_id, "fika_interrupted", "never finished")
        study.tell(frozen.number, state=TrialState.FAIL)


def trial_status(last: dict, max_steps: int) -> str:
    """How a trial ended, from its last Tune result: the status it reported, else `stopped` (by the scheduler)
    before max_steps, `completed` at it."""
    return last.get("status") or ("completed" if last.get("step", 0) >= max_steps else "stopped")


def tell_final(study, trial, status: str, value: float | None, error: bool) -> None:
    """Tells Optuna how a trial ended: COMPLETE with its value, PRUNED (scheduler stop), or FAIL (once)."""
    if study._storage.get_trial(trial._trial_id).state.is_finished():
        return  # told before the driver was killed, replayed after the resume
    trial = trial.number if isinstance(trial, FrozenTrial) else trial
    if status == "completed" and value is not None and math.isfinite(value) and not error:
        study.tell(trial, value)
    elif status == "stopped" and not error:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)

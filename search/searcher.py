"""The Optuna searcher of a fika search: OptunaSearch whose study tells the truth about every trial, a
concurrency limiter that survives a resume, and how a trial's end is told to Optuna. The Ray and Optuna internals
it uses are listed in fika.search.internals."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from fika.files import append_line, read_json, write_atomic
from fika.result import write_failed_result
from fika.search.internals import keep_tune_state
from fika.search.run_folder import PRUNED_AT
from fika.search.sampler import MAX_DRAWS, NoRepeatSampler, config_key


class FikaOptunaSearch(OptunaSearch):
    """OptunaSearch whose study tells the truth about every trial, and that never runs a configuration twice.

    - A result is reported to Optuna as an intermediate value when it carries the rung metric at a rung,
      or the search metric (the final eval); per-step records are skipped.
    - A trial stopped by the scheduler is told PRUNED (its value: the last rung's), a diverged one FAIL, a
      completed one COMPLETE: `optuna.load_study` and optuna-dashboard show what the report shows.
    - No configuration runs twice, and no repeated draw enters the study: its sampler (fika.search.sampler)
      draws again while it proposes a configuration that ran, and takes one of the configurations not yet run
      when it keeps repeating itself (a choice space nearly exhausted). The study holds only trials that run:
      one per trial folder, plus the baseline and the trials the spec brings in.
    - Every draw is logged to `draws.jsonl` in the run folder: the trial, its params, and how it was drawn
      (`baseline`, `random` during the start-up trials, `tpe` or `gp`, or `untried` when the sampler kept
      repeating; `warm` for a configuration an earlier search brought in).
    - `budget` caps the trials of the search, counting trials adopted from an interrupted run.
    """

    def __init__(
        self,
        *args,
        run_dir: str,
        rungs: list[int],
        rung_key: str,
        max_steps: int,
        startup: int,
        budget: int,
        model: str = "tpe",
        **kwargs,
    ):
        self.run_dir, self.rungs, self.rung_key, self.max_steps = run_dir, rungs, rung_key, max_steps
        self.model = model  # how a draw of the sampler's model is named in draws.jsonl: tpe or gp
        self.startup, self.budget = startup, budget
        self.seen: dict[str, int] = {}  # params -> optuna trial number
        self.adopted = 0
        self.settled = False  # whether what an interrupted fit left in the study was settled (`reconcile`)
        kwargs["sampler"] = NoRepeatSampler(kwargs["sampler"], self.seen, self.untried)
        super().__init__(*args, **kwargs)
        if self._space:  # a space given here (not by Tune at the fit's start) sets the study up at once
            kwargs["sampler"].space = dict(self._space)

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
        if status == "stopped":
            mark_pruned(Path(self.run_dir) / "trials" / trial_id, step)
        ot_trial.set_user_attr("fika_status", "pruned" if status == "stopped" else status)
        tell_final(self._ot_study, ot_trial, status, (result or {}).get(self.metric), error)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Tune hands the space over at a fit's start (also before it restores an interrupted fit's searcher): the
        study is set up, or loaded; a point (the baseline) the study already holds is not queued again."""
        import optuna

        if self._points_to_evaluate and self._study_name in optuna.study.get_all_study_names(self._storage):
            trials = optuna.load_study(study_name=self._study_name, storage=self._storage).get_trials(deepcopy=False)
            held = {config_key(t.params) for t in trials} | {
                config_key(t.system_attrs["fixed_params"]) for t in trials if "fixed_params" in t.system_attrs
            }
            self._points_to_evaluate = [p for p in self._points_to_evaluate if config_key(p) not in held]
        ready = super().set_search_properties(metric, mode, config, **spec)
        if ready and isinstance(self._ot_study.sampler, NoRepeatSampler):
            self._ot_study.sampler.space = dict(self._space)
        return ready

    def suggest(self, trial_id: str):
        if not self.settled:  # a new fit over the study of an interrupted one (a restored fit settled in `restore`)
            self.reconcile()
        if len(self._ot_trials) + self.adopted >= self.budget or self.exhausted():
            return Searcher.FINISHED
        finished = len(self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        for _ in range(MAX_DRAWS):
            config = super().suggest(trial_id)  # a waiting trial (the baseline, a requeued one), or a new draw
            ot_trial = self._ot_trials[trial_id]
            key = config_key(config)
            if key not in self.seen:
                break
            # a configuration that ran: a waiting trial enqueued before it ran, or a space with nothing new left
            ot_trial.set_user_attr("fika_repeat_of", self.seen[key])
            self._ot_study.tell(self._ot_trials.pop(trial_id), state=TrialState.FAIL)
            if self.exhausted():
                return Searcher.FINISHED
        else:
            return Searcher.FINISHED  # the sampler keeps proposing what ran, in a space too large to list
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if "fika_drawn" in frozen.user_attrs:  # a trial requeued after a kill keeps how it was drawn
            drawn = frozen.user_attrs["fika_drawn"]
        elif "fixed_params" in frozen.system_attrs:
            drawn = "baseline"
        elif ot_trial.number in getattr(self._ot_study.sampler, "fallbacks", ()):
            drawn = "untried"
        elif ot_trial.number in getattr(getattr(self._ot_study.sampler, "sampler", None), "local_draws", ()):
            drawn = "local"  # a neighbour of the best trial (the local searcher)
        else:
            drawn = "random" if finished < self.startup else self.model
        ot_trial.set_user_attr("tune_trial_id", trial_id)
        ot_trial.set_user_attr("fika_drawn", drawn)
        self.seen[key] = ot_trial.number
        append_line(
            Path(self.run_dir) / "draws.jsonl",
            {"trial": trial_id, "number": ot_trial.number, "drawn": drawn, "params": config},
        )
        return config

    def configurations(self) -> int | None:
        """How many configurations the space holds; None for a space with ranges."""
        from optuna.distributions import CategoricalDistribution

        if not self._space or not all(isinstance(d, CategoricalDistribution) for d in self._space.values()):
            return None
        return math.prod(len(d.choices) for d in self._space.values())

    def exhausted(self) -> bool:
        """Whether every configuration of a choice space has run (or runs)."""
        total = self.configurations()
        return total is not None and len(self.seen) >= total

    def untried(self) -> list[dict] | None:
        """The configurations of a choice space that have not run; None for a space with ranges or too many
        configurations to list (where a sampler practically never repeats itself)."""
        total = self.configurations()
        if total is None or total > 1_000_000:
            return None
        names = list(self._space)
        combos = (
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(self._space[n].choices for n in names))
        )
        return [c for c in combos if config_key(c) not in self.seen]

    def reconcile(self) -> list[str]:
        """After a killed driver: settles the study trials that Tune never recorded (asked after its last save).

        A trial whose folder holds a final result is told that result; one that was cut short is told FAIL and
        its folder is marked failed (interrupted). One that never started goes back to the queue (WAITING): the
        next trial runs its configuration, as the same study trial. Every one of them that ran counts toward the
        budget, also one the study was told of before the kill (Tune's save had failed, on a full disk), and none
        of their params are drawn again. Returns the ids of the interrupted trials.
        """
        interrupted = []
        self.settled = True
        self.adopted = 0  # counted again from the study: a second resume sees the first one's adopted trials too
        for frozen in self._ot_study.get_trials(deepcopy=False):
            trial_id = frozen.user_attrs.get("tune_trial_id")
            if frozen.state == TrialState.WAITING or trial_id in self._ot_trials:
                continue
            folder = Path(self.run_dir) / "trials" / str(trial_id)
            ran = trial_id is not None and ((folder / "config.yaml").exists() or (folder / "result.json").exists())
            if frozen.state == TrialState.RUNNING and not ran:  # never started: its configuration runs next
                self._ot_study._storage.set_trial_state_values(frozen._trial_id, TrialState.WAITING)
                key = config_key(frozen.params)
                if self.seen.get(key) == frozen.number:
                    del self.seen[key]
                with contextlib.suppress(OSError):  # an empty folder (made just before the disk filled) goes
                    folder.rmdir()
                continue
            self.seen.setdefault(config_key(frozen.params), frozen.number)
            if trial_id is None:
                continue
            self.adopted += int(ran)
            if frozen.state == TrialState.RUNNING and settle_from_folder(self._ot_study, frozen, folder, self.metric):
                interrupted.append(trial_id)
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


def mark_pruned(folder: Path, step: int) -> None:
    """Records in a trial's folder that the scheduler stopped it at `step`, before the study is told PRUNED.

    Tune tells the searcher of a stop before the trial's worker has ended it: a driver killed in between leaves a
    study that says PRUNED and a trial that Tune runs again after the resume. That run stops at the same step
    (`FikaTrainable`), so the trial's folder says what the study says."""
    if folder.is_dir():
        write_atomic(folder / PRUNED_AT, json.dumps({"step": step}))


def settle_from_folder(study, frozen: FrozenTrial, folder: Path, metric: str) -> bool:
    """Tells the study how a trial Tune never recorded ended, from its folder: its result when it ended, else FAIL
    (its folder is then marked failed: interrupted). Returns whether it was interrupted."""
    result = read_json(folder / "result.json") or {}
    status = result.get("status")
    storage, tid = study._storage, frozen._trial_id
    if status in ("completed", "stopped", "diverged"):
        storage.set_trial_user_attr(tid, "fika_status", "pruned" if status == "stopped" else status)
        for step, value in sorted((int(k), v) for k, v in (result.get("eval_losses") or {}).items()):
            if math.isfinite(value):
                storage.set_trial_intermediate_value(tid, step, value)
        tell_final(study, frozen, status, result.get(metric), False)
        return False
    storage.set_trial_user_attr(tid, "fika_status", "failed")
    storage.set_trial_user_attr(tid, "fika_interrupted", "the driver was killed before Ray recorded it")
    study.tell(frozen.number, state=TrialState.FAIL)
    write_failed_result(folder, "interrupted: the driver was killed before Ray recorded this trial")
    return True


def close_interrupted(study) -> None:
    """At the end of a search no study trial may stay RUNNING or WAITING: a RUNNING one is told FAIL (interrupted),
    a WAITING one (queued, never run) too."""
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if frozen.state == TrialState.WAITING:
            study._storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING)
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

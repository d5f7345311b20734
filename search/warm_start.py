"""Warm starts: a new search starts from earlier ones (`warm_start:` in the spec, `--warm-start RUN ...`).

A trial of an earlier search whose resolved config is exactly the one this search would run for the same values
(same model, data, eval set, horizon and every key the new space does not search) enters the study with its result:
COMPLETE with its metric, or PRUNED with its rung values, without running again; the sampler models the space from
the first new trial, that configuration never runs twice, and the report ranks the trial with this search's own
(read from the earlier folder). An earlier search none of whose trials match (another model, data, length or
horizon) gives its best configuration, which runs first (`warm` in draws.jsonl) with the values that carry over: its
learning rate and LoRA rank, which a cold start would guess (at their largest, with the local searcher), and each
other key the earlier search settled, i.e. where a completed trial that differs from its best in that key alone lost
to it beyond the eval noise (paired over the held-out conversations). The other keys of that trial are drawn as a
cold start draws them: a schedule or dropout that won on other data by a margin the earlier search did not show is
not carried over. What was reused is written to `warm_start.json` in the run folder for the report.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fika.errors import ConfigError
from fika.files import read_json, write_atomic
from fika.search.spec import EVAL_KEYS, SearchSpec, top_first_key
from fika.search.trials import space_values, trial_config

IGNORED = ("output.", *EVAL_KEYS, "train.logging_steps")  # keys that change a trial's outputs and evals, not its result


@dataclass
class Earlier:
    """What one earlier search brings: its trials' results (`values`) when they match, else what of its best runs
    first (`first`)."""

    run: str
    values: list[dict] = field(default_factory=list)  # {trial, params, state, value, intermediate}
    first: list[dict] = field(default_factory=list)  # {trial, params}: the configuration that runs first
    differs: str = ""  # the first key whose value differs, when none of its trials match
    settled: list[str] = field(default_factory=list)  # the keys it settled (see `settled_keys`)

    def describe(self) -> str:
        if self.values:
            return (
                f"{self.run}: {len(self.values)} trials enter the study with their values and rank with this "
                "search's (same configs)"
            )
        if not self.first:
            return f"{self.run} differs ({self.differs}): none of its values carry over, nothing runs first"
        return f"{self.run} differs ({self.differs}): {carried_text(self)}"


def carried_text(earlier: Earlier, ran: bool = False) -> str:
    """What of an earlier search that differs runs first (`ran`: ran first), in words."""
    kept = ", ".join(f"{key} {value}" for key, value in earlier.first[0]["params"].items())
    settled = f"it settled {', '.join(earlier.settled)}" if earlier.settled else "it settled no other key"
    runs, drawn = ("ran", "were") if ran else ("runs", "are")
    return (
        f"its best configuration {runs} first with {kept} ({settled}); the other keys {drawn} drawn as at a cold start"
    )


def absolute_runs(runs: list[str]) -> list[str]:
    """The earlier searches' folders made absolute against the current folder (recorded so in spec.yaml)."""
    return [os.path.abspath(Path(run).expanduser()) for run in runs]


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def first_difference(old: dict, new: dict) -> str | None:
    """The first key whose value differs between two resolved trial configs, ignoring outputs and evals."""
    a, b = flatten(old), flatten(new)
    for key in sorted(set(a) | set(b)):
        if not key.startswith(IGNORED) and a.get(key) != b.get(key):
            return f"{key} {a.get(key)!r} -> {b.get(key)!r}"
    return None


def earlier_search(spec: SearchSpec, run: str) -> Earlier:
    """What the search in `run` brings to `spec` (see the module docstring)."""
    from fika.search.report.rows import load_rows, rank
    from fika.search.rerun import load_run_spec

    folder = Path(run)
    if not (folder / "spec.yaml").exists():
        raise ConfigError(f"warm_start: {run} is not a search folder (no spec.yaml)")
    old = load_run_spec(folder)
    if old.metric != spec.metric:
        return Earlier(run, differs=f"metric {old.metric!r} -> {spec.metric!r}", first=[])
    earlier = Earlier(run)
    rows = [r for r in rank(load_rows(folder, old, running=False)) if not r.confirm_of and r.config]
    for row in rows:
        params = space_values(spec, row.config)
        if params is None or row.status not in ("completed", "pruned"):
            continue
        mine = trial_config(spec, params, row.config["output"]["dir"]).model_dump(mode="json")
        difference = first_difference(row.config, mine)
        if difference is None:
            state = "COMPLETE" if row.status == "completed" else "PRUNED"
            intermediate = {str(k): v for k, v in row.rung_values.items()}
            earlier.values.append(
                {
                    "trial": row.trial_id,
                    "params": params,
                    "state": state,
                    "value": row.metric,
                    "intermediate": intermediate,
                }
            )
        elif not earlier.differs:
            earlier.differs = difference
    if not earlier.values:
        ranked = [(r, space_values(spec, r.config)) for r in rows if r.status in ("completed", "pruned")]
        ranked = [(r, params) for r, params in ranked if params is not None]  # in the report's order
        finals = [(r, params) for r, params in ranked if r.status == "completed" and r.final_eval]
        earlier.settled = settled_keys([(params, r.final_eval) for r, params in finals])
        best, params = (finals or ranked or [(None, {})])[0]
        if values := carried_values(params, earlier.settled):
            earlier.first = [{"trial": best.trial_id, "params": values}]
        earlier.differs = earlier.differs or "no trial lies in this search's space"
    return earlier


def carried_values(best: dict, settled: list[str]) -> dict:
    """The values of an earlier search's best configuration that run first in a search that differs: its learning
    rate and LoRA rank, and the other keys it settled."""
    return {key: value for key, value in best.items() if key in settled or top_first_key(key)}


def settled_keys(finals: list[tuple[dict, dict]]) -> list[str]:
    """The keys a search settled, from its completed trials' (params, final eval) pairs, best first: those where a
    trial that differs from the best in that key alone lost to it beyond the eval noise, paired over the held-out
    conversations."""
    from fika.search.report.analysis import compare

    if not finals:
        return []
    (best, best_eval), settled = finals[0], []
    for params, evals in finals[1:]:
        differ = [key for key in best if params.get(key) != best[key]]
        if len(differ) == 1 and differ[0] not in settled:
            paired = compare(evals, best_eval)
            if paired is not None and paired.significant and paired.diff > 0:
                settled.append(differ[0])
    return [key for key in best if key in settled]


def plan_warm_start(spec: SearchSpec) -> list[Earlier]:
    """What every earlier search of the spec brings (checked before Ray starts)."""
    return [earlier_search(spec, run) for run in spec.warm_start]


def add_warm_start(spec: SearchSpec, directory: Path, study_storage) -> list[Earlier]:
    """Puts what the earlier searches bring into the search's study (created here when new): finished trials with
    their values, configurations queued to run first. Adds only what the study does not hold yet (a driver killed
    midway runs this again), and records it in `warm_start.json`."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from fika.search.tuner import tune_space

    if not spec.warm_start:
        return []
    plan = plan_warm_start(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.name, storage=study_storage, direction="minimize", load_if_exists=True)
    distributions = OptunaSearch.convert_search_space(tune_space(spec))
    held = {
        (t.user_attrs.get("fika_warm_start"), t.user_attrs.get("fika_trial")) for t in study.get_trials(deepcopy=False)
    }
    for earlier in plan:
        for trial in earlier.values + earlier.first:
            if (earlier.run, trial["trial"]) in held:
                continue
            attrs = {"fika_warm_start": earlier.run, "fika_trial": trial["trial"]}
            if trial in earlier.first:
                study.enqueue_trial(trial["params"], user_attrs={**attrs, "fika_drawn": "warm"})
                continue
            state = optuna.trial.TrialState[trial["state"]]
            finished = optuna.trial.create_trial(
                params=trial["params"],
                distributions=distributions,
                state=state,
                user_attrs=attrs,
                value=trial["value"] if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values={int(k): v for k, v in trial["intermediate"].items()},
            )
            study.add_trial(finished)
    write_atomic(directory / "warm_start.json", json.dumps([asdict(e) for e in plan], indent=1))
    return plan


def read_warm_start(directory: Path) -> list[Earlier]:
    """What a search's warm start brought (its `warm_start.json`), for the report."""
    return [Earlier(**e) for e in read_json(Path(directory) / "warm_start.json") or []]

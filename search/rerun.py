"""Re-runs of a finished search's best trials: other seeds (is the ranking noise?) and a longer horizon (does
the 60-step order hold at N steps?). `fika confirm RUN_DIR --top K --seeds S [--steps N]`.

Each re-run gets a deterministic folder (`trials/<trial>-seed<S>[-steps<N>]`), so running the same command
again after an interruption runs only what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from fika.console import say
from fika.errors import ConfigError, first_line
from fika.search.spec import SearchSpec
from fika.search.trials import encode_choice
from fika.validation import format_validation_error


def load_run_spec(run: Path) -> SearchSpec:
    """The resolved spec a search saved in its folder."""
    from pydantic import ValidationError

    path = Path(run) / "spec.yaml"
    if not path.exists():
        raise ConfigError(f"{run}: not a search folder (no spec.yaml); give the folder `fika search` printed")
    try:
        return SearchSpec.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as err:
        why = format_validation_error(err, SearchSpec).splitlines()[0]
        raise ConfigError(f"{path}: not a spec this fika can read ({why})") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not a spec this fika can read ({first_line(err)})") from None


def confirm_name(run: dict) -> str:
    """The folder of a re-run: `<trial>-seed<S>[-steps<N>]`."""
    return f"{run['of']}-seed{run['seed']}" + (f"-steps{run['steps']}" if run.get("steps") else "")


def plan_confirm(
    run: Path, top: int, seeds: int, steps: int | None, trials: list[str] | None = None
) -> tuple[SearchSpec, list[dict]]:
    """The re-runs `fika confirm` does on a finished search: the `top` best completed trials (or the `trials`
    named), each with `seeds` other seeds and/or once at `steps`."""
    from fika.search.report.folder import relative
    from fika.search.report.rows import search_state

    spec = load_run_spec(run)
    state = search_state(run)
    if state == "running":
        raise ConfigError(
            f"{run}: the search is still running; confirm re-runs the trials of a finished search, so "
            "wait for it to end"
        )
    if state == "interrupted":
        raise ConfigError(
            f"{run}: the search was interrupted; confirm re-runs the trials of a finished search: "
            f"`fika search {relative(Path(run) / 'spec.yaml')} --resume` finishes it first"
        )
    if steps is not None and steps <= spec.max_steps:
        raise ConfigError(f"--steps: {steps} is not allowed: give more than the search's {spec.max_steps} steps")
    if not seeds and not steps:
        raise ConfigError("--seeds: 0 is not allowed without --steps: nothing would run")
    return spec, confirm_runs(run, spec, top, seeds, steps, trials)


def confirm_runs(
    run: Path, spec: SearchSpec, top: int, seeds: int, steps: int | None, trials: list[str] | None = None
) -> list[dict]:
    """The re-runs of the search in `run`: its `top` best completed trials as the report ranks them (those a warm
    start reused included), or the `trials` named, each with `seeds` other seeds and/or once at `steps` (a search's
    own `confirm:` asks for them when its trials ended)."""
    from fika.search.report.rows import ranked_trials

    completed = [r for r in ranked_trials(run, spec, running=False)[0] if r.status == "completed"]
    if trials:
        named = {r.trial_id: r for r in completed}
        missing = [t for t in trials if t not in named]
        if missing:
            raise ConfigError(f"--trials: {', '.join(missing)} is not a completed trial of the search in {run}")
        best = [named[t] for t in trials]
    else:
        best = completed[:top]
    if not best and not trials and top:
        raise ConfigError(f"--top: the search in {run} has no completed trial to re-run")
    runs = []
    for row in best:
        params = {k: encode_choice(v) for k, v in row.params.items()}
        base_seed = row.seed if row.seed is not None else spec.base.train.seed
        runs += [{"of": row.trial_id, "params": params, "seed": base_seed + i} for i in range(1, seeds + 1)]
        if steps:
            runs.append({"of": row.trial_id, "params": params, "seed": base_seed, "steps": steps})
    return runs


def run_confirm(
    run: Path,
    spec: SearchSpec,
    runs: list[dict],
    address: str | None = None,
    callbacks: list | None = None,
    log: Callable[[str], None] = say,
    on_done: Callable[[], None] | None = None,
    prepared: bool = False,
) -> None:
    """Runs the re-runs on Ray (one trial each, reused workers); those that already ran are replayed.

    `on_done()` is called when they have ended, before a Ray instance this call started is shut down. `prepared`:
    the data are ready and Ray is joined (the search's own `confirm:`).
    """
    from ray import tune

    from fika.search.driver import prepare_search_data, recorded_fit
    from fika.search.ray_session import check_address, connect_ray, end_ray, stopping_gracefully
    from fika.search.tuner import tracker_callbacks, trainable_for

    run = Path(run).expanduser().resolve()  # Tune's storage and the workers need it absolute
    if address is not None:
        spec = spec.model_copy(update={"address": address})
    if spec.address:
        check_address(spec.address)
    log(f"confirm: {len({r['of'] for r in runs})} trials, {len(runs)} re-runs")
    if not prepared:
        prepare_search_data(spec, log)
    connected = connect_ray(spec, spec.address)
    tuner = tune.Tuner(
        trainable_for(spec, run),
        param_space={"_confirm": tune.grid_search([json.dumps(r) for r in runs])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(
            name=f"confirm-{int(time.time())}",
            storage_path=str(run / "tune-confirm"),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[*(callbacks or []), *tracker_callbacks(spec, run)],
            verbose=0,
        ),
    )
    with recorded_fit(run, spec), stopping_gracefully(run):
        tuner.fit()
    end_ray(connected, on_done)

"""A search, driven to its end in this process: every check that needs no Ray, then Ray, the data (tokenized
once, here, for every trial), the Tune fit, and the settling of what a killed driver left.

Everything a bad spec can get wrong is checked before Ray starts: the run folder (a finished search of the
same spec is reported, another spec under the same name refused), the Optuna storage, the cluster address,
the memory estimate against the GPU, and the data sources.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fika.console import say
from fika.errors import ConfigError
from fika.files import cut_partial_line, read_json, write_atomic
from fika.folder_lock import exclusive_folder
from fika.paths import out_of_space
from fika.search.checks import checks_before_ray
from fika.search.ray_session import connect_ray, end_ray, local_slots, stopping_gracefully
from fika.search.run_folder import run_dir, run_state, spec_yaml, unfinished_search, write_run_json
from fika.search.spec import OPTUNA_SEARCHERS, SearchSpec
from fika.search.trials import data_needs
from fika.search.tuner import build_tuner, study_storage


def prepare_search_data(spec: SearchSpec, log: Callable[[str], None]) -> dict:
    """Tokenizes every source once, as many rows as the largest trial needs, before any trial starts (and
    converts the built-in model once, so that the workers only load it)."""
    from fika.data import prepare_data
    from fika.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(spec.base.model)
    resolve_model_path(spec.base.model)
    mix = prepare_data(spec.base.data, tokenizer, spec.base.model.max_seq_length, need=data_needs(spec))
    summary = mix.summary()
    per_source = ", ".join(f"{name} {n}" for name, n in summary["eval_per_source"].items())
    log(f"data: base mix {summary['train_rows']:,} train conversations; eval {summary['eval_rows']:,} ({per_source})")
    return summary


def preflight(spec: SearchSpec, directory: Path, resume: bool, hold: contextlib.ExitStack) -> str:
    """Every check that needs no Ray (`fika.search.checks`), then the run folder, made last so that a refused
    search leaves nothing behind. From the first look at an unfinished search's folder on, `hold` keeps it
    locked: a second driver is refused."""
    locked = unfinished_search(directory)
    if locked:
        hold.enter_context(exclusive_folder(directory, "name", f"fika search {spec.name}"))
    state = checks_before_ray(spec, directory, resume)
    if state == "finished":
        return state
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"storage: cannot create {directory}: {err.strerror}") from None
    if not locked:  # a new search: another driver of the same spec may have started it since the first look
        hold.enter_context(exclusive_folder(directory, "name", f"fika search {spec.name}"))
        state = run_state(spec, resume)
    return state


@dataclass
class SearchHooks:
    """What a caller hands a search: Tune callbacks for the fit (progress, the live report), the log, `on_done()`
    (called when the results are final, before a Ray instance the search started is shut down, which takes seconds:
    work started there runs meanwhile), and `confirm_callbacks(names, total)`: the callbacks of the re-runs a spec's
    `confirm:` asks for (the re-runs' folder names, how many)."""

    callbacks: list = field(default_factory=list)
    log: Callable[[str], None] = say
    on_done: Callable[[], None] | None = None
    confirm_callbacks: Callable[[set[str], int], list] | None = None


def run_search(spec: SearchSpec, address: str | None = None, resume: bool = False, hooks: SearchHooks | None = None):
    """Runs (or resumes) a search to its end, its `confirm:` re-runs included; returns `finished` when it had
    already finished, else `done`."""
    hooks = hooks or SearchHooks()
    directory, log = run_dir(spec), hooks.log
    if address is not None:
        spec = spec.model_copy(update={"address": address})
    with contextlib.ExitStack() as hold:
        state = preflight(spec, directory, resume, hold)
        if state == "finished":
            return state
        if resume and state == "new":
            log(f"search {spec.name}: nothing was saved in {directory} before it stopped; starting the search")
        log(f"search {spec.name}: {spec.num_trials()} trials of {spec.max_steps} steps; results in {directory}")
        try:
            search_to_its_end(spec, directory, state, hooks)
        except KeyboardInterrupt:
            if (directory / "spec.yaml").exists():
                log(
                    f"search {spec.name}: interrupted; the trials that ended are kept, and `fika search ... --resume` "
                    "continues the search"
                )
            raise
        except Exception as err:
            full = out_of_space(
                err, directory, "storage", "free space, then `fika search ... --resume` continues the search"
            )
            if full is None:
                raise
            raise full from None
    return "done"


def search_to_its_end(spec: SearchSpec, directory: Path, state: str, hooks: SearchHooks) -> None:
    """The body of `run_search` once its folder is held: Ray, data, the fit, the settling of what it left, the
    re-runs of `confirm:`."""
    from fika.search.internals import actors_in_prestarted_workers

    # Ray first: a local Ray's workers import the trial's libraries while this process reads the data
    connected = connect_ray(spec, spec.address)
    started = time.time()
    try:
        prepare_search_data(spec, hooks.log)  # before the search is written: a source that cannot be used leaves none
        cut_partial_line(directory / "optuna.journal")  # half a line, from a driver that died mid-append (a full disk)
        start_run_folder(spec, directory, state)
        tuner = build_tuner(spec, directory, hooks.callbacks, resume=state == "resume")
        local = connected and spec.address is None
        prestarted = actors_in_prestarted_workers() if local else contextlib.nullcontext()
        with recorded_fit(directory, spec), stopping_gracefully(directory), prestarted:
            tuner.fit()
        settle(spec, directory)
        if spec.confirm is not None:
            confirm_in_run(spec, directory, hooks)
    except Exception:
        # a Ray this call started ends with it (a later search in this process starts its own)
        with contextlib.suppress(Exception):
            end_ray(connected, None)
        raise
    write_run_json(directory, finished_at=time.time())
    hooks.log(f"search {spec.name}: done in {time.time() - started:.0f} s; results in {directory}")
    end_ray(connected, hooks.on_done)


def confirm_in_run(spec: SearchSpec, directory: Path, hooks: SearchHooks) -> None:
    """The re-runs a spec's `confirm:` asks for, on the Ray the search ran on: its best trials with other seeds
    and/or at a longer horizon (those that ran before a kill are replayed, not run again)."""
    from fika.search.rerun import confirm_name, confirm_runs, run_confirm

    c = spec.confirm
    runs = confirm_runs(directory, spec, c.top, c.seeds, c.steps)
    if not runs:
        hooks.log(f"search {spec.name}: no completed trial to confirm")
        return
    names = {confirm_name(r) for r in runs}
    callbacks = hooks.confirm_callbacks(names, len(runs)) if hooks.confirm_callbacks else []
    run_confirm(directory, spec, runs, callbacks=callbacks, log=hooks.log, prepared=True)


def start_run_folder(spec: SearchSpec, directory: Path, state: str) -> None:
    """Writes what a new search records first (`spec.yaml`, then `run.json` with its id); for a restart, what a
    driver killed before it wrote them left missing, and no Tune state that cannot be restored. Files a killed
    writer left half-written (`.NAME.PID.tmp`) are removed: this driver holds the folder."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    if state == "new":
        write_atomic(directory / "spec.yaml", spec_yaml(spec))
    if state == "restart":
        from fika.search.internals import forget_tune_state

        forget_tune_state(directory)
    if state in ("new", "restart") and spec.warm_start:
        from fika.search.warm_start import add_warm_start

        add_warm_start(spec, directory, study_storage(spec, directory))
    if not (read_json(directory / "run.json") or {}).get("id"):
        write_atomic(directory / "run.json", json.dumps({"id": uuid.uuid4().hex[:12], "created_at": time.time()}))


@contextlib.contextmanager
def recorded_fit(directory: Path, spec: SearchSpec):
    """Records a Tune fit in `run.json` (`fits`: its start, its end, the trials it could run at once on a local
    Ray, null on a cluster), so that a report can say how much of the slots the trials used. A fit whose driver
    was killed keeps no end. A packed fit's packs end with it."""
    slots = local_slots(spec)
    if slots and spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    fit = {"started_at": time.time(), "slots": slots}
    fits = (read_json(directory / "run.json") or {}).get("fits", [])
    write_run_json(directory, fits=[*fits, fit])
    try:
        yield
    finally:
        from fika.search.pack_server import end_packs

        end_packs()  # a packed fit's packs end with it (their base models free the GPU)
        fit["ended_at"] = time.time()
        write_run_json(directory, fits=[*fits, fit])


def settle(spec: SearchSpec, directory: Path) -> None:
    """After the search: a trial folder that never got a result, or a study trial left RUNNING, was cut short
    by a killed driver; both are recorded as failed (interrupted), so nothing stays `running` forever. A trial the
    scheduler had stopped, whose worker died before it wrote its result, is recorded as stopped (`record_stopped`)."""
    from fika.result import write_failed_result
    from fika.search.run_folder import record_stopped
    from fika.search.searcher import close_interrupted

    for folder in (directory / "trials").glob("*/"):
        unfinished = (folder / "config.yaml").exists() and read_json(folder / "result.json") is None
        if unfinished and not record_stopped(folder):
            write_failed_result(folder, "interrupted: the driver was killed mid-trial")
    if spec.searcher in OPTUNA_SEARCHERS:
        import optuna

        study = optuna.load_study(study_name=spec.name, storage=study_storage(spec, directory))
        close_interrupted(study)

"""Build, run or resume a search: Ray Tune with OptunaSearch (TPE) or a grid / random searcher, plus ASHA.

A search lives in `<storage>/<name>/`: `spec.yaml` (resolved), `run.json` (its id; each Tune fit's start, end
and trials at a time; when it finished), `optuna.journal` (the Optuna study, readable with `optuna.load_study`
and optuna-dashboard), `draws.jsonl` (how each trial's params were drawn), `tune/` (Ray's experiment state,
for --resume), `trials/<trial_id>/` (each trial's config, data, metrics, evals and result, written as
they arrive) and `.fika.lock` (held by the one driver that runs the search, or re-runs its trials).

Everything a bad spec can get wrong is checked before Ray starts: the run folder (a finished search of the
same spec is reported, another spec under the same name refused), the Optuna storage, the cluster address,
the memory estimate against the GPU, and the data (each source tokenized once, here, for every trial).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fika.common import (
    LOCK_FILE,
    cache_dir,
    cut_partial_line,
    exclusive_folder,
    interruption,
    mask_secrets,
    out_of_space,
    read_json,
    say,
    stop_signals_handled,
    write_atomic,
)
from fika.config import ConfigError
from fika.search.spec import SearchSpec, baseline_params, data_needs, encode_choice

# Results the driver must see at once: every step is reported, the metric only at eval steps.
DRIVER_ENV = {
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # fika prints its own progress lines
    # Save the experiment state every second (Ray's default starts at 10 s), so that after a killed driver
    # `--resume` knows nearly every trial that had started; fika settles the rest (searcher.reconcile).
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    # Ctrl-C is fika's (`stopping_gracefully`): Tune's own handler would end the fit as if it had run to its end,
    # and the search would be recorded finished with trials never run.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}
# Trials work in the driver's working folder (Tune would move each into its own; a cluster's worker starts
# wherever its node's Ray runs; `FikaTrainable.setup` moves it there), so that relative data paths mean the same
# to every trial as to the driver that validated them. A local Ray's workers inherit the driver's environment; a
# cluster's get it as a runtime env (which costs each new worker a second or two).
# A trial that tokenizes (a node without the driver's data cache) keeps to its CPU share.
WORKER_ENV_VARS = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TOKENIZERS_PARALLELISM": "false"}
# Settings that change where and how fast a search runs, not its results: a resume may change them.
IGNORED_WHEN_COMPARING = ("storage", "address", "report_dir", "trackers", "max_concurrent", "max_failures", "resources")


def run_dir(spec: SearchSpec) -> Path:
    return Path(spec.storage).expanduser().resolve() / spec.name


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def with_absolute_data_paths(saved: dict) -> dict:
    """A saved spec with its local data paths made absolute against the current folder, as `fika search` now records
    them (a search saved by an earlier fika holds them as written), so that such a search can still be resumed."""
    from fika.sources import DataError, local_path

    data = (saved.get("base") or {}).get("data") if isinstance(saved, dict) else None
    for key in ("sources", "eval_sources"):
        for source in (data.get(key) or []) if isinstance(data, dict) else []:
            path = source.get("path") if isinstance(source, dict) else None
            try:
                found = local_path(path) if isinstance(path, str) else None
            except DataError:  # gone: the comparison then names it
                found = None
            if found is not None:
                source["path"] = os.path.abspath(found)
    return saved


def spec_differences(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two resolved specs (settings that do not change results ignored)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(IGNORED_WHEN_COMPARING))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def run_state(spec: SearchSpec, resume: bool) -> str:
    """What to do with the run folder: `new`, `resume`, or `finished` (report it); refuses a conflict."""
    try:
        return folder_state(spec, run_dir(spec), resume)
    except OSError as err:  # a name too long for the filesystem, a folder that cannot be read
        raise ConfigError(f"storage: cannot use {run_dir(spec)}: {err.strerror}") from None


def folder_state(spec: SearchSpec, directory: Path, resume: bool) -> str:
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"storage: {directory} is a file; give a folder for the search")
    saved = directory / "spec.yaml"
    if not saved.exists():
        if directory.exists() and any(p.name not in ("report", LOCK_FILE) for p in directory.iterdir()):
            raise ConfigError(f"name: {directory} exists and is not a fika search; pick another name or storage")
        if resume:
            raise ConfigError(f"--resume: there is no search to resume in {directory}")
        return "new"
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        old = None
    differences = spec_differences(with_absolute_data_paths(old or {}), spec_dict(spec))
    if differences:
        raise ConfigError(
            f"name: {spec.name!r} already has a search in {directory} with another spec ({'; '.join(differences[:6])}"
            f"{'; ...' if len(differences) > 6 else ''}); pick another name, or remove that folder"
        )
    if (read_json(directory / "run.json") or {}).get("finished_at"):
        return "finished"
    if not resume:
        ended = len(list((directory / "trials").glob("*/result.json")))
        raise ConfigError(
            f"name: the search {spec.name!r} in {directory} is unfinished ({ended} of {spec.num_trials()} trials "
            "ended): add --resume to continue it"
        )
    from ray import tune

    return "resume" if tune.Tuner.can_restore(str(directory / "tune")) else "new"


def spec_dict(spec: SearchSpec) -> dict:
    return json.loads(spec.model_dump_json())


def spec_yaml(spec: SearchSpec) -> str:
    """The resolved spec as YAML, credentials masked (it is copied into reports)."""
    return mask_secrets(yaml.safe_dump(spec_dict(spec), sort_keys=False))


def tune_space(spec: SearchSpec) -> dict[str, Any]:
    """The spec's space as Ray Tune distributions (paired values travel as YAML strings)."""
    from ray import tune

    space = {}
    for key, param in spec.space.items():
        if param.choice is not None:
            values = [encode_choice(v) for v in param.choice]
            space[key] = tune.grid_search(values) if spec.searcher == "grid" else tune.choice(values)
        elif param.uniform is not None:
            space[key] = tune.uniform(*param.uniform)
        else:
            space[key] = tune.loguniform(*param.loguniform)
    return space


def study_storage(spec: SearchSpec, directory: Path):
    """The Optuna storage: a journal file in the run folder, or the spec's RDB URL (checked here, once)."""
    import optuna

    if spec.optuna_storage:
        try:
            return optuna.storages.RDBStorage(spec.optuna_storage)
        except Exception as err:  # a bad URL, a missing driver, an unreachable server
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ConfigError(
                f"optuna_storage: {mask_secrets(spec.optuna_storage)!r} cannot be used: {mask_secrets(first)}"
            ) from None
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(directory / "optuna.journal")))


def local_slots(spec: SearchSpec) -> int | None:
    """How many trials a local Ray runs at once (its CPUs and GPUs over a trial's share); None on a cluster,
    which an autoscaler may grow."""
    import ray

    if spec.address is not None:
        return None
    have = ray.cluster_resources()
    fits = [have.get("CPU", 0) / spec.resources.cpu]
    if spec.resources.gpu:
        fits.append(have.get("GPU", 0) / spec.resources.gpu)
    return max(1, int(min(fits) + 1e-9))


def build_searcher(spec: SearchSpec, directory: Path):
    """The trial sampler. Tune lets a searcher without a concurrency limit keep one trial pending, so a search's
    first trials would start one after the other, each waiting until the previous worker is up (about 2 s on
    a CPU). On a local Ray the Optuna searcher is limited to its slots plus one: the first trials start
    together, and the next trial is drawn while they run, as Tune does, ready when a slot frees."""
    from ray.tune.search import BasicVariantGenerator

    baseline = baseline_params(spec) if spec.baseline else None
    points = [baseline] if baseline else None
    if spec.searcher != "optuna":
        return BasicVariantGenerator(
            points_to_evaluate=points, random_state=spec.seed, max_concurrent=spec.max_concurrent or 0
        )
    import optuna

    from fika.search.searcher import FikaOptunaSearch, ResumableConcurrencyLimiter

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = FikaOptunaSearch(
        metric=spec.metric,
        mode="min",
        points_to_evaluate=points,
        sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup()),
        study_name=spec.name,
        storage=study_storage(spec, directory),
        run_dir=str(directory),
        rungs=spec.rungs(),
        rung_key=spec.rung_key(),
        max_steps=spec.max_steps,
        startup=spec.startup(),
        budget=spec.num_trials(),
    )
    slots = local_slots(spec)
    limit = spec.max_concurrent or (slots + 1 if slots else None)
    return ResumableConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher


def build_scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        metric=spec.rung_key(),
        mode="min",
        max_t=spec.max_steps,
        grace_period=spec.rungs()[0] if spec.rungs() else spec.max_steps,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def tracker_callbacks(spec: SearchSpec, directory: Path) -> list:
    """Ray Tune's own logger callbacks for the spec's trackers, grouped by the search's name: TensorBoard (event
    files in each trial's Tune folder), MLflow (MLFLOW_TRACKING_URI, else a SQLite store in the run folder), W&B
    (project WANDB_PROJECT, else fika; WANDB_MODE=offline works without network)."""
    callbacks = []
    for tracker in spec.trackers:
        if tracker == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
            continue
        if tracker == "mlflow":
            from fika.search.searcher import mlflow_callback

            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{directory / 'mlflow.db'}"
            callbacks.append(mlflow_callback(tracking_uri=uri, experiment_name=spec.name, save_artifact=False))
        else:
            from ray.air.integrations.wandb import WandbLoggerCallback

            project = os.environ.get("WANDB_PROJECT", "fika")
            callbacks.append(WandbLoggerCallback(project=project, group=spec.name, dir=str(directory)))
    return callbacks


def trainable_for(spec: SearchSpec, directory: Path):
    from ray import tune

    from fika.search.trainable import FikaTrainable

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = tune.with_parameters(FikaTrainable, spec=spec.model_dump(mode="json"), run_dir=str(directory),
                                     cwd=os.getcwd())  # fmt: skip
    return tune.with_resources(trainable, resources)


def build_tuner(spec: SearchSpec, directory: Path, callbacks: list, resume: bool):
    """A new Tuner, or the interrupted one restored from `directory/tune` (finished trials are kept)."""
    from ray import tune

    from fika.search.searcher import restore_tune_state, with_callbacks

    trainable = trainable_for(spec, directory)
    callbacks = [*callbacks, *tracker_callbacks(spec, directory)]
    if callbacks:
        import_tune_callback_classes()
    if resume:
        restore_tune_state(directory)
        restored = tune.Tuner.restore(str(directory / "tune"), trainable, resume_errored=True, restart_errored=False)
        return with_callbacks(restored, callbacks)
    return tune.Tuner(
        trainable,
        param_space=tune_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(spec, directory),
            scheduler=build_scheduler(spec),
            num_samples=spec.num_samples,
            reuse_actors=True,
            max_concurrent_trials=spec.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(directory),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def import_tune_callback_classes() -> None:
    """Imports the logger callbacks Ray Tune's usage stats compare a fit's callbacks against (wandb, mlflow,
    comet, aim: about 2 s of CPU), so that a fit given callbacks does it here and not after it starts, while
    the first trials' workers wait for the driver and its placement groups."""
    import ray.air.integrations.comet  # noqa: F401
    import ray.air.integrations.mlflow  # noqa: F401
    import ray.air.integrations.wandb  # noqa: F401
    import ray.tune.logger.aim  # noqa: F401


def check_address(address: str) -> None:
    """Fails in seconds when a HOST:PORT cluster address does not answer (ray.init would wait for minutes)."""
    if address in ("auto", "local") or address.startswith(("ray://", "anyscale://")):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"address: {address!r} is not allowed: give auto or HOST:PORT (the head's GCS port, 6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as err:
        raise ConfigError(
            f"address: {address!r} does not answer ({err.strerror or err}); is `ray start --head` running there?"
        ) from None


def connect_ray(spec: SearchSpec, address: str | None) -> bool:
    """Joins the given cluster (or an already started instance), or starts a local Ray; checks that a trial fits.

    Returns whether this call connected (the caller then shuts down what it started: `ray.shutdown()`).
    """
    import ray

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    address = address or spec.address
    connected = not ray.is_initialized()
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if connected:
        if address is None:
            os.environ.update(WORKER_ENV_VARS)
            with environment(local_ray_environment(spec)):  # the raylet, and through it the workers, inherit it
                ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        else:
            try:
                runtime_env = {"env_vars": WORKER_ENV_VARS}
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, logging_level="ERROR")
            except ConnectionError as err:
                raise ConfigError(
                    f"address: cannot join the Ray cluster at {address!r}: {str(err).splitlines()[0]}"
                ) from None
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)  # Ray's own handler dumps a stack and dies; keep the caller's
    try:
        check_trial_fits(spec, local=address is None)
    except ConfigError:
        if connected:
            ray.shutdown()
        raise
    return connected


def local_ray_environment(spec: SearchSpec) -> dict[str, str]:
    """The variables a search's local Ray starts with (its raylet, and through it its workers, inherit them).

    Ray starts one worker per CPU with itself, and Tune's trainable actors take them (`actors_in_prestarted_workers`,
    which needs the variable Tune would give them in a runtime env here). When each of those workers will run a
    trial (trials of at most one CPU, at least as many at once as the machine has CPUs: an idle one would hold
    about 400 MB) and the machine has no CUDA device, they import the trial's libraries (`fika.search.worker`,
    without the ones no trial needs) while the driver reads the data, so the first trials start without 6-8 s of
    imports in their slots. Not with CUDA: a library that asks for the GPUs at import would fix the worker's
    devices before Ray sets its trial's CUDA_VISIBLE_DEVICES.
    Ray ends a worker that has been idle for 1 s when it counts more workers than it keeps; a prestarted worker was
    ended that way ("idle for a long time") just as Tune created the first actors, which then started new processes
    (5 of 13 tries; 0 of 13 with 60 s), so the wait is 60 s here.
    """
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS

    from fika.model import device_kind
    from fika.search.trainable import unused_libraries

    values = {**DEFAULT_ENV_VARS, "RAY_idle_worker_killing_time_threshold_ms": "60000"}
    at_once = min(spec.num_trials(), spec.max_concurrent or spec.num_trials())
    if spec.resources.cpu <= 1 and at_once >= (os.cpu_count() or 1) and device_kind() == "cpu":
        values.update(RAY_preload_python_modules="fika.search.worker",
                      FIKA_HIDE_LIBRARIES=",".join(unused_libraries(spec)))  # fmt: skip
    return values


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Sets these environment variables in this process for the duration, then puts back what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_trial_fits(spec: SearchSpec, local: bool) -> None:
    """Refuses a trial that no node of the connected Ray can hold (Tune would wait for it forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.resources.gpu > gpus:
        raise ConfigError(
            f"resources.gpu: {spec.resources.gpu:g} is not allowed: the Ray cluster has {gpus:g} GPUs "
            "(set resources.gpu: 0 for CPU trials)"
        )
    cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if spec.resources.cpu > cpus:
        where = "this machine has" if local else "a trial runs on one node, and the largest of the Ray cluster has"
        raise ConfigError(f"resources.cpu: {spec.resources.cpu:g} is not allowed: {where} {cpus:g} CPUs")


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


def unfinished_search(directory: Path) -> bool:
    """Whether `directory` holds a search that has not finished (False where it cannot be read: `run_state` then
    says why)."""
    try:
        return (directory / "spec.yaml").exists() and not (read_json(directory / "run.json") or {}).get("finished_at")
    except OSError:
        return False


def preflight(spec: SearchSpec, directory: Path, resume: bool, hold: contextlib.ExitStack) -> str:
    """Every check that needs no Ray: run folder, storage, Optuna storage, local GPU, memory estimate. From the
    first look at an unfinished search's folder on, `hold` keeps it locked: a second driver is refused."""
    locked = unfinished_search(directory)
    if locked:
        hold.enter_context(exclusive_folder(directory, "name", f"fika search {spec.name}"))
    state = run_state(spec, resume)
    if state == "finished":
        return state
    if spec.address:
        check_address(spec.address)
    if spec.searcher == "optuna" and spec.optuna_storage:
        study_storage(spec, directory)
    if spec.resources.gpu > 0 and spec.address is None:
        import ray
        import torch

        if torch.cuda.device_count() == 0 and not ray.is_initialized():  # an instance given is checked in connect_ray
            raise ConfigError(
                f"resources.gpu: {spec.resources.gpu:g} is not allowed: this machine has no GPU "
                "(join a GPU cluster with --address, or set resources.gpu: 0)"
            )
    from fika.search.plan import check_memory

    check_memory(spec)
    cache_dir()  # the driver tokenizes into it
    try:  # created last: a refused search leaves nothing behind
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"storage: cannot create {directory}: {err.strerror}") from None
    if not locked:  # a new search: another driver of the same spec may have started it since the first look
        hold.enter_context(exclusive_folder(directory, "name", f"fika search {spec.name}"))
        state = run_state(spec, resume)
    return state


def run_search(
    spec: SearchSpec,
    address: str | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    log: Callable[[str], None] = say,
    on_done: Callable[[], None] | None = None,
) -> str:
    """Runs (or resumes) a search to its end; returns `finished` when it had already finished, else `done`.

    `on_done()` is called when the results are final, before a Ray instance this call started is shut down
    (which takes seconds: work started there runs meanwhile).
    """
    directory = run_dir(spec)
    if address is not None:
        spec = spec.model_copy(update={"address": address})
    with contextlib.ExitStack() as hold:
        state = preflight(spec, directory, resume, hold)
        if state == "finished":
            return state
        log(f"search {spec.name}: {spec.num_trials()} trials of {spec.max_steps} steps; results in {directory}")
        try:
            search_to_its_end(spec, directory, state, callbacks or [], log, on_done)
        except KeyboardInterrupt:
            if (directory / "spec.yaml").exists():
                log(f"search {spec.name}: interrupted; the trials that ended are kept, and `fika search ... --resume` "
                    "continues the search")  # fmt: skip
            raise
        except Exception as err:
            full = out_of_space(err, directory, "storage", "free space, then `fika search ... --resume` continues "
                                "the search")  # fmt: skip
            if full is None:
                raise
            raise full from None
    return "done"


def search_to_its_end(spec: SearchSpec, directory: Path, state: str, callbacks: list, log: Callable[[str], None],
                      on_done: Callable[[], None] | None) -> None:  # fmt: skip
    """The body of `run_search` once its folder is held: Ray, data, the fit, the settling of what it left."""
    from fika.search.searcher import actors_in_prestarted_workers

    # Ray first: a local Ray's workers import the trial's libraries while this process reads the data
    connected = connect_ray(spec, spec.address)
    started = time.time()
    try:
        prepare_search_data(spec, log)  # before the search is written: a source that cannot be used leaves none
        cut_partial_line(directory / "optuna.journal")  # half a line, from a driver that died mid-append (a full disk)
        if state == "new":
            write_atomic(directory / "spec.yaml", spec_yaml(spec))
            write_atomic(directory / "run.json", json.dumps({"id": uuid.uuid4().hex[:12], "created_at": time.time()}))
        tuner = build_tuner(spec, directory, callbacks, resume=state == "resume")
        local = connected and spec.address is None
        prestarted = actors_in_prestarted_workers() if local else contextlib.nullcontext()
        with recorded_fit(directory, spec), stopping_gracefully(directory), prestarted:
            tuner.fit()
    except Exception:
        # a Ray this call started ends with it (a later search in this process starts its own)
        with contextlib.suppress(Exception):
            end_ray(connected, None)
        raise
    settle(spec, directory)
    write_run_json(directory, finished_at=time.time())
    log(f"search {spec.name}: done in {time.time() - started:.0f} s; results in {directory}")
    end_ray(connected, on_done)


@contextlib.contextmanager
def recorded_fit(directory: Path, spec: SearchSpec):
    """Records a Tune fit in `run.json` (`fits`: its start, its end, the trials it could run at once on a local
    Ray, null on a cluster), so that a report can say how much of the slots the trials used. A fit whose driver
    was killed keeps no end."""
    slots = local_slots(spec)
    if slots and spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    fit = {"started_at": time.time(), "slots": slots}
    fits = (read_json(directory / "run.json") or {}).get("fits", [])
    write_run_json(directory, fits=[*fits, fit])
    try:
        yield
    finally:
        fit["ended_at"] = time.time()
        write_run_json(directory, fits=[*fits, fit])


@contextlib.contextmanager
def stopping_gracefully(directory: Path):
    """Around a Tune fit: the first Ctrl-C or SIGTERM has Tune save its state with every live trial and stop
    them, marked interrupted (`INTERRUPTED`: `--resume` runs them again, none is recorded failed), then raises
    KeyboardInterrupt (`fika.common.Terminated` for SIGTERM); a second one, or one before Tune's loop runs, raises
    at once. Off the main thread it changes nothing."""
    from fika.search.trainable import INTERRUPTED

    marker = directory / INTERRUPTED
    marker.unlink(missing_ok=True)
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's loop ends on it, after saving its state
        if received or getattr(tune_stop, "__name__", "") != "signal_interrupt_tune_run":
            raise interruption(signum)
        received.append(signum)
        marker.touch()
        tune_stop(signum, frame)

    main = threading.current_thread() is threading.main_thread()
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_DFL) if main else None  # not a handler of an earlier fit
    try:
        with stop_signals_handled(on_signal):
            yield
    except Exception as err:
        if received:  # the signal reached Ray's own processes too: the fit ended on their loss
            raise interruption(received[0]) from err
        raise
    finally:
        if main:
            signal.signal(signal.SIGUSR1, usr1)
    if received:
        raise interruption(received[0])


def write_run_json(directory: Path, **values) -> None:
    """Updates keys of the run's `run.json`."""
    write_atomic(directory / "run.json", json.dumps({**(read_json(directory / "run.json") or {}), **values}))


def end_ray(connected: bool, on_done: Callable[[], None] | None) -> None:
    """Calls `on_done()`, then shuts down the Ray connection `connect_ray` made (`connected`), if it made one."""
    if on_done is not None:
        on_done()
    if connected:
        import gc

        import ray

        # Ray ends the process when an object of a Ray that is shutting down is freed meanwhile (its core worker
        # is gone before Python knows): Tune's leftovers are collected first, and no collection runs in any
        # thread (the report's) until the shutdown is done.
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            ray.shutdown()
        finally:
            if enabled:
                gc.enable()


def settle(spec: SearchSpec, directory: Path) -> None:
    """After the search: a trial folder that never got a result, or a study trial left RUNNING, was cut short
    by a killed driver; both are recorded as failed (interrupted), so nothing stays `running` forever."""
    from fika.search.searcher import close_interrupted
    from fika.trial import write_failed_result

    for folder in (directory / "trials").glob("*/"):
        if (folder / "config.yaml").exists() and read_json(folder / "result.json") is None:
            write_failed_result(folder, "interrupted: the driver was killed mid-trial")
    if spec.searcher == "optuna":
        import optuna

        study = optuna.load_study(study_name=spec.name, storage=study_storage(spec, directory))
        close_interrupted(study)

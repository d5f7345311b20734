"""The Ray Tune Tuner of a search: its space, searcher (OptunaSearch with fika's sampler, or a grid / random
searcher), ASHA scheduler, trainable, tracker callbacks; new, or restored from the run folder to resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fika.errors import ConfigError, first_line
from fika.masking import mask_secrets
from fika.search.ray_session import local_slots
from fika.search.spec import OPTUNA_SEARCHERS, SearchSpec
from fika.search.trials import baseline_params, encode_choice


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
            raise ConfigError(
                f"optuna_storage: {mask_secrets(spec.optuna_storage)!r} cannot be used: "
                f"{mask_secrets(first_line(err, 200))}"
            ) from None
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(directory / "optuna.journal")))


def build_searcher(spec: SearchSpec, directory: Path):
    """The trial sampler. Tune lets a searcher without a concurrency limit keep one trial pending, so a search's
    first trials would start one after the other, each waiting until the previous worker is up (about 2 s on
    a CPU). On a local Ray the Optuna searcher is limited to its slots plus one: the first trials start
    together, and the next trial is drawn while they run, as Tune does, ready when a slot frees."""
    from ray.tune.search import BasicVariantGenerator

    # a grid runs the baseline's configuration as one of its own (Tune would spend one of its passes over the
    # grid on a queued point: with num_samples 1, the point alone would run)
    baseline = baseline_params(spec) if spec.baseline and spec.searcher != "grid" else None
    points = [baseline] if baseline else None
    if spec.searcher not in OPTUNA_SEARCHERS:
        return BasicVariantGenerator(
            points_to_evaluate=points, random_state=spec.seed, max_concurrent=spec.max_concurrent or 0
        )
    import optuna

    from fika.search.searcher import FikaOptunaSearch, ResumableConcurrencyLimiter

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = study_storage(spec, directory)
    searcher = FikaOptunaSearch(
        metric=spec.metric,
        mode="min",
        points_to_evaluate=points,
        sampler=optuna_sampler(spec.searcher, spec.seed, spec.startup()),
        study_name=spec.name,
        storage=storage,
        run_dir=str(directory),
        rungs=spec.rungs(),
        rung_key=spec.rung_key(),
        max_steps=spec.max_steps,
        startup=spec.startup(),
        budget=spec.num_trials(),
        model=model_name(spec),
    )
    slots = local_slots(spec)
    limit = spec.max_concurrent or (slots + 1 if slots else None)
    return ResumableConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher


def model_name(spec: SearchSpec) -> str:
    """How the report names a draw of the searcher's model (after its random start-up draws): tpe or gp (a local
    search's neighbours are named `local`, its draws when no neighbour is left `tpe`)."""
    return "gp" if spec.searcher == "gp" else "tpe"


def optuna_sampler(searcher: str, seed: int, startup: int):
    """The Optuna sampler of an optuna (TPE), gp or local search, seeded, with `startup` start-up draws first."""
    import optuna

    if searcher == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if searcher == "local":
        from fika.search.local_search import LocalSearchSampler

        return LocalSearchSampler(tpe, startup, seed)
    return tpe


def build_scheduler(spec: SearchSpec):
    """FIFO, or ASHA on the rung metric; with `scheduler.compare_within` keys, one ASHA per group of their values."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.kind == "fifo":
        return FIFOScheduler()
    options = {
        "time_attr": "step",
        "metric": spec.rung_key(),
        "mode": "min",
        "max_t": spec.max_steps,
        "grace_period": spec.rungs()[0] if spec.rungs() else spec.max_steps,
        "reduction_factor": spec.scheduler.reduction_factor,
    }
    within = spec.compare_within()
    if not within:
        return ASHAScheduler(**options)
    from fika.search.grouped_asha import GroupedASHAScheduler

    return GroupedASHAScheduler(within, **options)


def tracker_callbacks(spec: SearchSpec, directory: Path) -> list:
    """Ray Tune's JSON logger, and its logger callbacks for the spec's trackers, grouped by the search's name:
    TensorBoard (event files in each trial's Tune folder), MLflow (MLFLOW_TRACKING_URI, else a SQLite store in the run folder), W&B
    (project WANDB_PROJECT, else fika; WANDB_MODE=offline works without network)."""
    from ray.tune.logger import JsonLoggerCallback

    callbacks = [JsonLoggerCallback()]  # each trial's Tune results in tune/<trial>/result.json
    for tracker in spec.trackers:
        if tracker == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
            continue
        if tracker == "mlflow":
            from fika.search.internals import mlflow_callback

            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{directory / 'mlflow.db'}"
            callbacks.append(mlflow_callback(tracking_uri=uri, experiment_name=spec.name, save_artifact=False))
        else:
            from ray.air.integrations.wandb import WandbLoggerCallback

            project = os.environ.get("WANDB_PROJECT", "fika")
            callbacks.append(WandbLoggerCallback(project=project, group=spec.name, dir=str(directory)))
    return callbacks


def trainable_for(spec: SearchSpec, directory: Path):
    """The trainable of a search's trials with their resources; for a packed search, it starts the fit's packs."""
    from ray import tune

    from fika.search.pack_server import start_packs
    from fika.search.plan import pack_size
    from fika.search.trainable import FikaTrainable

    members = pack_size(spec)  # a packed search's trial holds its share of a pack's resources
    resources = {"cpu": spec.resources.cpu / members, "gpu": spec.resources.gpu / members}
    packs = start_packs(spec, members, os.getcwd()) if members > 1 else None
    trainable = tune.with_parameters(
        FikaTrainable, spec=spec.model_dump(mode="json"), run_dir=str(directory), cwd=os.getcwd(), packs=packs
    )
    return tune.with_resources(trainable, resources)


def build_tuner(spec: SearchSpec, directory: Path, callbacks: list, resume: bool):
    """A new Tuner, or the interrupted one restored from `directory/tune` (finished trials are kept)."""
    from ray import tune

    from fika.search.internals import restore_tune_state, with_callbacks

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

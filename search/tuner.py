"""Build, run or resume a search: Ray Tune with OptunaSearch (TPE) or a grid / random searcher, plus ASHA.

A search lives in `<storage>/<name>/`: `spec.yaml` (resolved), `optuna.journal` (the Optuna study, readable
with `optuna.load_study` and optuna-dashboard), `tune/` (Ray's experiment state, for --resume) and
`trials/<trial_id>/` (each trial's config.yaml, metrics.jsonl, result.json as they arrive).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fika.config import ConfigError
from search.spec import SearchSpec, baseline_params, encode_choice

# Trials report every step, the eval metric only at eval steps (ASHA rungs and the last step).
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # fika prints its own progress lines
# Save the experiment state every second (Ray's default starts at 10 s), so that after a killed driver
# `--resume` knows every trial that had started; a trial that had ended is replayed from its result.json.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")


def run_dir(spec: SearchSpec) -> Path:
    return Path(spec.storage).resolve() / spec.name


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
    """The Optuna storage: a journal file in the run folder, or the spec's RDB URL."""
    import optuna

    if spec.optuna_storage:
        return optuna.storages.RDBStorage(spec.optuna_storage)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(directory / "optuna.journal")))


def build_searcher(spec: SearchSpec, directory: Path):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    baseline = baseline_params(spec) if spec.baseline else None
    points = [baseline] if baseline else None
    if spec.searcher != "optuna":
        return BasicVariantGenerator(
            points_to_evaluate=points, random_state=spec.seed, max_concurrent=spec.max_concurrent or 0
        )

    class EvalStepOptunaSearch(OptunaSearch):
        """OptunaSearch that skips per-step results without the metric (Optuna prunes nothing anyway) and
        does not run a configuration twice: TPE (random for its first 10 trials) can draw a combination of
        choices again; such a draw is told to the study as FAIL and replaced, up to 20 times."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

        def suggest(self, trial_id: str):
            seen = self.__dict__.setdefault("_fika_seen", set())
            for _ in range(20):
                config = super().suggest(trial_id)
                key = json.dumps(config, sort_keys=True, default=str)
                if not isinstance(config, dict) or key not in seen:
                    break
                self._ot_study.tell(self._ot_trials.pop(trial_id), state=optuna.trial.TrialState.FAIL)
            if isinstance(config, dict):
                seen.add(key)
            return config

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = EvalStepOptunaSearch(
        metric=spec.metric,
        mode="min",
        points_to_evaluate=points,
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
        study_name=spec.name,
        storage=study_storage(spec, directory),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent) if spec.max_concurrent else searcher


def build_scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        metric=spec.metric,
        mode="min",
        max_t=spec.max_steps,
        grace_period=spec.rungs()[0] if spec.rungs() else spec.max_steps,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def trainable_for(spec: SearchSpec, directory: Path):
    from ray import tune

    from search.trainable import FikaTrainable

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.with_resources(
        tune.with_parameters(FikaTrainable, spec=spec.model_dump(mode="json"), run_dir=str(directory)), resources
    )


def build_tuner(spec: SearchSpec, directory: Path, callbacks: list, resume: bool):
    """A new Tuner, or the interrupted one restored from `directory/tune` (finished trials are kept)."""
    from ray import tune

    trainable = trainable_for(spec, directory)
    experiment = directory / "tune"
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise ConfigError(f"--resume: no search to resume in {experiment}")
        return tune.Tuner.restore(str(experiment), trainable, resume_errored=True, restart_errored=False)
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


def connect_ray(spec: SearchSpec, address: str | None) -> None:
    """Joins the given cluster (or an already started instance), or starts a local Ray; checks GPUs."""
    import ray

    address = address or spec.address
    if not ray.is_initialized():
        if address is None:
            if spec.resources.gpu > 0:
                import torch

                if torch.cuda.device_count() == 0:
                    raise ConfigError(
                        f"resources.gpu: {spec.resources.gpu:g} is not allowed: this machine has no GPU "
                        "(join a GPU cluster with --address, or set resources.gpu: 0)"
                    )
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.resources.gpu > gpus:
        raise ConfigError(
            f"resources.gpu: {spec.resources.gpu:g} is not allowed: the Ray cluster has {gpus:g} GPUs "
            "(set resources.gpu: 0 for CPU trials)"
        )


def prepare_search_data(spec: SearchSpec, log: Callable[[str], None]) -> dict:
    """Builds (or loads) the tokenized mix of the base config once, before any trial starts."""
    from fika.data import prepare_data
    from fika.model import load_tokenizer

    tokenizer = load_tokenizer(spec.base.model)
    mix = prepare_data(spec.base.data, tokenizer, spec.base.model.max_seq_length)
    summary = mix.summary()
    log(f"data: {summary['train_rows']:,} train / {summary['eval_rows']:,} eval conversations, mix {mix.fingerprint}")
    return summary


def run_search(
    spec: SearchSpec,
    address: str | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    log: Callable[[str], None] = print,
):
    """Runs (or resumes) a search to its end and returns Ray's ResultGrid."""
    directory = run_dir(spec)
    if not resume and (directory / "tune").exists():
        raise ConfigError(
            f"name: {spec.name!r} already has a search in {directory}: add --resume, or pick another name"
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spec.yaml").write_text(spec_yaml(spec))
    connect_ray(spec, address)
    prepare_search_data(spec, log)
    started = time.time()
    tuner = build_tuner(spec, directory, callbacks or [], resume)
    results = tuner.fit()
    log(f"search {spec.name}: {len(results)} trials in {time.time() - started:.0f} s; results in {directory}")
    return results


def spec_yaml(spec: SearchSpec) -> str:
    import yaml

    return yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)


def run_confirm(
    spec: SearchSpec, top: int, seeds: int, callbacks: list | None = None, log: Callable[[str], None] = print
):
    """Re-runs the `top` best completed trials with `seeds` other seeds each, to measure seed noise."""
    from ray import tune

    from search.report import load_rows, rank

    directory = run_dir(spec)
    best = [r for r in rank(load_rows(directory, spec)) if r.status == "completed" and not r.confirm_of][:top]
    if not best:
        raise ConfigError("--confirm-top: the search has no completed trial to confirm")
    runs = [
        json.dumps(
            {
                "of": row.trial_id,
                "params": {k: encode_choice(v) for k, v in row.params.items()},
                "seed": spec.base.train.seed + i,
            }
        )  # fmt: skip
        for row in best
        for i in range(1, seeds + 1)
    ]
    log(f"confirm: {len(best)} trials x {seeds} seeds = {len(runs)} runs")
    tuner = tune.Tuner(
        trainable_for(spec, directory),
        param_space={"_confirm": tune.grid_search(runs)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(
            name="tune-confirm",
            storage_path=str(directory),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=callbacks or [],
            verbose=0,
        ),
    )
    return tuner.fit()

"""Every check a search makes before it starts Ray, in one list (`BEFORE_RAY`) that the real run and the dry run
both run, so that a dry run that passes promises a run that starts. What needs Ray or the data itself is checked
by the real run only (`AFTER_RAY`), and the dry run says so."""

from __future__ import annotations

import os
from pathlib import Path

from fika.errors import ConfigError, FikaError, first_line
from fika.masking import mask_secrets
from fika.search.run_folder import run_state
from fika.search.spec import OPTUNA_SEARCHERS, SearchSpec
from fika.search.trials import encode_choice, split_key, trial_config

AFTER_RAY = (
    "that a trial fits a node of the Ray cluster (needs Ray)",
    "that every data source yields usable conversations (needs the data read and tokenized)",
)


def writable_parent(path: Path) -> tuple[Path, str | None]:
    """The first existing folder at or above `path`, and why a folder cannot be made there (None when it can)."""
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    if not parent.is_dir():
        return parent, f"{parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return parent, f"no permission on {parent}"
    return parent, None


def check_storage(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """The run folder can be made: `storage` is a folder, or can be created (no file on the way, a writable
    parent)."""
    _, why = writable_parent(directory)
    if why:
        raise ConfigError(f"storage: cannot create {directory}: {why}")


def check_cluster_address(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """A HOST:PORT cluster address answers."""
    from fika.search.ray_session import check_address

    if spec.address:
        check_address(spec.address)


def check_optuna_storage(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """A team's Optuna database (`optuna_storage`) can be used: the real run opens it (creating its tables); the dry
    run parses the URL, finds its driver and connects, creating nothing (a SQLite file's folder must exist)."""
    if spec.searcher not in OPTUNA_SEARCHERS or not spec.optuna_storage:
        return
    if not dry_run:
        from fika.search.tuner import study_storage

        study_storage(spec, directory)
        return
    import sqlalchemy

    shown = mask_secrets(spec.optuna_storage)
    try:
        url = sqlalchemy.engine.make_url(spec.optuna_storage)
        if url.get_backend_name() == "sqlite":
            folder = Path(url.database or ".").expanduser().parent
            if url.database and not folder.is_dir():
                raise ConfigError(f"optuna_storage: {shown!r} cannot be used: the folder {folder} does not exist")
            return
        sqlalchemy.create_engine(url).connect().close()
    except ConfigError:
        raise
    except Exception as err:  # a bad URL, a missing driver, an unreachable server
        raise ConfigError(f"optuna_storage: {shown!r} cannot be used: {mask_secrets(first_line(err, 200))}") from None


def check_local_gpu(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """GPU trials on a local Ray need a GPU here (a cluster's GPUs are counted once Ray is joined)."""
    if spec.resources.gpu <= 0 or spec.address is not None:
        return
    import ray
    import torch

    if torch.cuda.device_count() == 0 and not ray.is_initialized():  # an instance given is checked in connect_ray
        raise ConfigError(
            f"resources.gpu: {spec.resources.gpu:g} is not allowed: this machine has no GPU "
            "(join a GPU cluster with --address, or set resources.gpu: 0)"
        )


def check_trial_memory(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """The largest trial's estimated peak fits its share of a GPU."""
    from fika.search.plan import check_memory

    check_memory(spec)


def check_cache(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """fika's cache, where the driver tokenizes the data, can be written (the real run makes it)."""
    from fika.paths import cache_dir, cache_error, cache_root

    if not dry_run:
        cache_dir()
        return
    _, why = writable_parent(cache_root())
    if why:
        raise cache_error(why)


def check_space_data(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """Every local data file or folder a searched data key can name exists (the base config's are checked when the
    spec is read)."""
    from fika.sources import resolve_local_paths

    for key, param in spec.space.items():
        if param.choice is None or not any(part.startswith("data.") and "path" in part for part in split_key(key)):
            continue
        for value in param.choice:
            data = trial_config(spec, {key: encode_choice(value)}, "x").data
            try:
                resolve_local_paths(data, prefix="data.")
            except FikaError as err:
                raise ConfigError(f"space.{key}: {err}") from None


def check_warm_start(spec: SearchSpec, directory: Path, dry_run: bool) -> None:
    """Every earlier search `warm_start` names is a search folder this fika can read."""
    from fika.search.warm_start import plan_warm_start

    plan_warm_start(spec)


BEFORE_RAY = (
    check_storage,
    check_cluster_address,
    check_optuna_storage,
    check_local_gpu,
    check_trial_memory,
    check_cache,
    check_space_data,
    check_warm_start,
)


def checks_before_ray(spec: SearchSpec, directory: Path, resume: bool, dry_run: bool = False) -> str:
    """Runs every check of `BEFORE_RAY` after the run folder's own (`run_state`); returns that state (`new`,
    `resume`, `restart` or `finished`: a finished search needs no other check)."""
    state = run_state(spec, resume)
    if state == "finished":
        return state
    for check in BEFORE_RAY:
        check(spec, directory, dry_run)
    return state

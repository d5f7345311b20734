"""A search's run folder, `<storage>/<name>/`: whether it holds a new, an unfinished, a finished or another search,
and its bookkeeping files (`spec.yaml`, the resolved spec; `run.json`, its id, each Tune fit's start, end and
trials at a time, and when it finished).

Layout: `spec.yaml`, `run.json`, `optuna.journal` (the Optuna study, readable with `optuna.load_study` and
optuna-dashboard), `draws.jsonl` (how each trial's params were drawn), `tune/` (Ray's experiment state, for
--resume), `trials/<trial_id>/` (each trial's config, data, metrics, evals and result, written as they arrive)
and `.fika.lock` (held by the one driver that runs the search, or re-runs its trials).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from fika.errors import ConfigError
from fika.files import read_json, write_atomic
from fika.folder_lock import LOCK_FILE
from fika.masking import mask_secrets
from fika.search.spec import SearchSpec

# In a trial's folder: the step at which the scheduler stopped it, written before the study is told
# (fika.search.searcher.mark_pruned; a run of that trial after a killed driver stops there, FikaTrainable)
PRUNED_AT = "pruned.json"

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


def with_defaults(saved: dict) -> dict:
    """A saved spec with the keys a later fika added set to their defaults (a search saved before a key existed ran
    with what its default does), or as saved when it is not a valid spec now (the comparison then names why)."""
    from pydantic import ValidationError

    try:
        return spec_dict(SearchSpec.model_validate(saved))
    except ValidationError:
        return saved


def spec_differences(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two resolved specs (settings that do not change results ignored)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(IGNORED_WHEN_COMPARING))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def run_state(spec: SearchSpec, resume: bool) -> str:
    """What to do with the run folder: `new` (also for `--resume` of a search that saved nothing before it was
    stopped), `resume` (Tune restores the interrupted fit), `restart` (an interrupted search whose Tune state
    cannot be restored: a new fit takes over its study and its trials), or `finished` (report it); refuses a
    conflict."""
    try:
        return folder_state(spec, run_dir(spec), resume)
    except OSError as err:  # a name too long for the filesystem, a folder that cannot be read
        raise ConfigError(f"storage: cannot use {run_dir(spec)}: {err.strerror}") from None


def folder_state(spec: SearchSpec, directory: Path, resume: bool) -> str:
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"storage: {directory} is a file; give a folder for the search")
    saved = directory / "spec.yaml"
    if not saved.exists():
        if directory.exists() and any(
            p.name not in ("report", LOCK_FILE) and not is_temporary(p.name) for p in directory.iterdir()
        ):
            raise ConfigError(f"name: {directory} exists and is not a fika search; pick another name or storage")
        return "new"
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        old = None
    differences = spec_differences(with_defaults(with_absolute_data_paths(old or {})), spec_dict(spec))
    if differences:
        raise ConfigError(
            f"name: {spec.name!r} already has a search in {directory} with another spec ({'; '.join(differences[:6])}"
            f"{'; ...' if len(differences) > 6 else ''}); pick another name, remove that folder, or give its values "
            "as overrides (KEY=VALUE) to go on with it"
        )
    if (read_json(directory / "run.json") or {}).get("finished_at"):
        return "finished"
    if not resume:
        ended = len(list((directory / "trials").glob("*/result.json")))
        raise ConfigError(
            f"name: the search {spec.name!r} in {directory} is unfinished ({ended} of {spec.num_trials()} trials "
            "ended): add --resume to continue it"
        )
    from fika.search.internals import tune_state_restorable

    return "resume" if tune_state_restorable(directory) else "restart"


def is_temporary(name: str) -> bool:
    """A file an atomic write left behind when its writer was killed (`.NAME.PID.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp")


def spec_dict(spec: SearchSpec) -> dict:
    return json.loads(spec.model_dump_json())


def spec_yaml(spec: SearchSpec) -> str:
    """The resolved spec as YAML, credentials masked (it is copied into reports)."""
    return mask_secrets(yaml.safe_dump(spec_dict(spec), sort_keys=False))


def unfinished_search(directory: Path) -> bool:
    """Whether `directory` holds a search that has not finished (False where it cannot be read: `run_state` then
    says why)."""
    try:
        return (directory / "spec.yaml").exists() and not (read_json(directory / "run.json") or {}).get("finished_at")
    except OSError:
        return False


def write_run_json(directory: Path, **values) -> None:
    """Updates keys of the run's `run.json`."""
    write_atomic(directory / "run.json", json.dumps({**(read_json(directory / "run.json") or {}), **values}))


def record_stopped(folder: Path) -> bool:
    """Writes the result of a trial the scheduler stopped (`pruned.json`) whose worker died before it wrote one
    (killed while Ray handed it the next trial, say): `stopped` at that step, from the records the trial wrote up to
    it. Returns False, writing nothing, when the trial has no record at that step."""
    import time
    from dataclasses import asdict

    from fika.files import read_jsonl
    from fika.result import TrialResult, add_records

    step = (read_json(folder / PRUNED_AT) or {}).get("step")
    records = [r for r in read_jsonl(folder / "metrics.jsonl") if step is not None and r.get("step", 0) <= step]
    if not records or records[-1].get("step") != step:
        return False
    last = records[-1]
    result = TrialResult(
        status="stopped",
        steps=step,
        max_steps=last.get("max_steps", 0),
        train_loss=last.get("train_loss"),
        train_loss_smooth=last.get("train_loss_smooth"),
        tokens_seen=last.get("tokens_seen", 0),
        wall_time_s=last.get("elapsed_s", 0.0),
        output_dir=str(folder),
        ended_at=time.time(),
    )
    add_records(result, records)
    write_atomic(folder / "result.json", json.dumps(asdict(result), indent=1))
    return True

"""fika's Python API: one run (`fika.train`) and its data mix (`fika.data_mix`), as a notebook calls them.

    import fika
    result = fika.train(overrides={"lora.r": 32, "train.learning_rate": 5e-4})    # the embedded default, changed
    result = fika.train("reports/demo/best.yaml", ["train.max_steps=120"], output_dir="outputs/best-120")
    result.status, result.eval_loss, result.adapter_dir

`config` is a YAML path, a mapping of sections, a TrialConfig, or None (the embedded default); `overrides` the
command line's `key=value` strings as a list, or a dict of dotted keys. Every check `fika train` makes runs
first, and a problem raises `fika.FikaError` whose message is the line the command prints. The command line
(`fika.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import copy
from pathlib import Path

from fika.config import TrialConfig, build_config, load_config
from fika.errors import FikaError
from fika.files import read_json
from fika.overrides import Overrides

ConfigSource = str | Path | dict | TrialConfig | None
Folder = str | Path | None


def trial_config(config: ConfigSource = None, overrides: Overrides = None, output_dir: str | Path | None = None):
    """A validated TrialConfig from a path, a mapping, a TrialConfig or the embedded default, with overrides."""
    if isinstance(config, TrialConfig):
        config = config.model_dump(mode="json")
    if isinstance(config, dict):
        built = build_config(copy.deepcopy(config), overrides)
    elif config is None or isinstance(config, (str, Path)):
        built = load_config(config, overrides)
    else:
        raise FikaError(f"config: a {type(config).__name__} is not allowed: give a YAML path, a mapping or None")
    if output_dir is not None:
        built = built.model_copy(update={"output": built.output.model_copy(update={"dir": str(output_dir)})})
    return built


def checked_trial(config: TrialConfig) -> TrialConfig:
    """The checks a run makes before any compute beyond the config's own: its target modules exist in the model,
    its local data files exist (their paths made absolute), its trackers can log."""
    from fika.model import check_target_modules, empty_model
    from fika.sources import resolve_local_paths
    from fika.trackers import check_reporting

    problem = check_target_modules(empty_model(config.model), config.lora.target_modules)
    if problem:
        raise FikaError(f"lora.target_modules: {problem}")
    config = config.model_copy(update={"data": resolve_local_paths(config.data)})
    check_reporting("train.report_to", config.train.report_to)
    return config


def resumed_config(output_dir: str | Path) -> TrialConfig:
    """The config of the run in `output_dir`, to continue it (its output.dir may be relative to where it started)."""
    from fika.output_dir import check_output_dir

    out = Path(output_dir).expanduser()
    check_output_dir(out, resume=True)
    config = load_config(out / "config.yaml")
    return config.model_copy(update={"output": config.output.model_copy(update={"dir": str(out)})})


def plan_train(config: ConfigSource, overrides: Overrides, output_dir: Folder, resume: bool, overwrite: bool):
    """Every check `train` makes before it loads anything, without training: the config it would run."""
    from fika.output_dir import check_output_dir

    if resume:
        if config is not None or overrides:
            raise FikaError("--resume DIR continues a run with its own config.yaml; give no --config or overrides")
        if output_dir is None:
            raise FikaError("--resume: give the run's output folder")
        config = resumed_config(output_dir)
    else:
        config = trial_config(config, overrides, output_dir)
        check_output_dir(Path(config.output.dir).expanduser(), overwrite=overwrite)
    return checked_trial(config)


def train(
    config: ConfigSource = None,
    overrides: Overrides = None,
    output_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
):
    """Runs one LoRA trial (or a full run) and returns its `TrialResult` (status, losses, adapter path).

    `resume=True` continues the run in `output_dir` from its last complete checkpoint (give no config then); a
    run that already ended there is returned as it is. `overwrite=True` replaces an earlier run in the output
    folder. Ctrl-C or SIGTERM during training ends the run after its current step (status `interrupted`, with a
    checkpoint when `train.checkpoints` is on); a second one stops at once.
    """
    from fika.console import TrainProgress, log
    from fika.observe import TrialHooks
    from fika.output_dir import check_output_dir
    from fika.result import load_result
    from fika.stopping import StopAfterStep, stop_signals_handled
    from fika.trial import run_trial

    if resume and output_dir is not None and config is None and not overrides:
        out = Path(output_dir).expanduser()
        check_output_dir(out, resume=True)
        ended = load_result(out)
        if ended is not None and ended.status in ("completed", "diverged"):  # what it would train is there
            log(
                f"train: {out} holds a run that ended ({ended.status}); nothing to resume (`fika train --config "
                f"{out / 'config.yaml'} --overwrite` runs it again)"
            )
            return ended
    checked = plan_train(config, overrides, output_dir, resume, overwrite)
    out = Path(checked.output.dir).expanduser()
    if resume and not complete_checkpoint_in(out):
        log(f"train: {out} has no complete checkpoint: the run starts again from step 0")
    source = config if isinstance(config, (str, Path)) else None
    progress = TrainProgress(out, checked, lambda max_steps: time_estimate(source, max_steps))
    stop = StopAfterStep()

    def on_start(max_steps: int) -> None:
        stop.training = True
        progress.on_start(max_steps)

    hooks = TrialHooks(report=progress.report, on_start=on_start, interrupted=stop.requested)
    try:
        with stop_signals_handled(stop):
            result = run_trial(checked, hooks=hooks, resume=resume, overwrite=overwrite)
    finally:
        progress.close()
    if result.status == "interrupted":
        if checked.train.checkpoints:
            then = f"its checkpoint of step {result.steps} is saved, and `fika train --resume {out}` continues it"
        else:
            then = "train.checkpoints is off, so `fika train --resume` would start it again from step 0"
        log(f"train: stopped after step {result.steps} of {result.max_steps}; {then}")
    return result


def complete_checkpoint_in(out: Path) -> bool:
    from fika.observe import complete_checkpoints

    return bool(complete_checkpoints(out / "checkpoints"))


def time_estimate(config_path: str | Path | None, max_steps: int) -> str:
    """How long `max_steps` take, from the seconds per step a search measured for this config (the report holding
    the config file, a best.yaml)."""
    report = read_json(Path(config_path).parent / "report.json") if config_path else None
    best = (report or {}).get("best") or {}
    if not best.get("seconds_per_step"):
        return "time: estimated after the first steps"
    seconds = max_steps * best["seconds_per_step"]
    return (
        f"time: about {seconds / 60:.0f} min of training plus evals, at the {best['seconds_per_step']:.2f} s/step "
        f"search '{report.get('name')}' measured on {best.get('device', '?')}"
    )


def data_mix(config: ConfigSource = None, overrides: Overrides = None, *, rebuild: bool = False):
    """Builds (or loads from the cache) a config's data mix and returns it: `.summary()` has the rows in, dropped
    by reason, eval, train and unused per source; `.train` and `.eval` are the tokenized rows."""
    from fika.data import prepare_data
    from fika.model import load_tokenizer
    from fika.sources import resolve_local_paths

    config = trial_config(config, overrides)
    config = config.model_copy(update={"data": resolve_local_paths(config.data)})
    tokenizer = load_tokenizer(config.model)
    return prepare_data(config.data, tokenizer, config.model.max_seq_length, rebuild=rebuild)

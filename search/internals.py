"""Every private internal of Ray, Optuna and trl that fika relies on, in this one list (each is checked against
the installed version by tests/test_searcher.py::test_the_internals_fika_relies_on_are_still_there).

Ray:
- `OptunaSearch._ot_study` (the optuna Study), `OptunaSearch._ot_trials` (Tune trial id -> the optuna Trial asked
  for it), `OptunaSearch._completed_trials` (the ids it has already told) and `OptunaSearch._space` (the Optuna
  distributions of the space): `fika.search.searcher.FikaOptunaSearch` tells Optuna what really happened to a
  trial, and lists the configurations of a choice space that have not run;
- `OptunaSearch._points_to_evaluate`, `._storage` and `._study_name`: Tune sets a searcher's space up (queuing its
  points, the baseline) before it restores an interrupted fit's searcher, so `FikaOptunaSearch` drops the points
  of a study that holds trials already;
- Tune's state files (`experiment_state-*.json`, `search_gen_state-*.json`, `searcher-state-*.pkl`, a grid or
  random search's `basic-variant-state-*.json` (a pickle), and the name
  of the searcher's staging file, `.<uuid>-tmp-searcher-state-<session>.pkl`), and the Tuner's `tuner.pkl`: Ray
  writes the state files in a driver staging folder and copies them, and a resumed fit's `tuner.pkl`, into storage
  without an atomic rename, so a driver killed mid-copy leaves them cut short; `FikaOptunaSearch.save` keeps one
  consistent copy of them in the run folder (written atomically) and `restore_tune_state` puts it back before a
  resume;
- `ConcurrencyLimiter.live_trials` and `.num_unfinished_live_trials` (the trials it suggested and that have not
  completed) and its `set_state`: Tune saves them with the search generator's state, one save behind, so fika
  restores the limiter without them (`ResumableConcurrencyLimiter`);
- `Tuner._local_tuner.get_run_config()`, whose callbacks are replaced to hand a restored Tuner this run's
  callbacks (`Tuner.restore` otherwise reuses the callbacks pickled with the interrupted run): `with_callbacks`;
- `ray.tune.execution.class_cache.DEFAULT_ENV_VARS` and `.ENV_VARS_TO_PROPAGATE`, the variables Tune puts in its
  trainable actors' runtime env: given to a local Ray's workers when it starts (`tune_actor_env_vars`), and
  emptied during a fit on that Ray, whose workers already have them (`actors_in_prestarted_workers`);
- Tune's SIGUSR1 handler, `signal_interrupt_tune_run` (its loop saves its state and ends on it), found by that
  name while a fit runs: `tune_stop_handler`;
- `MLflowLoggerCallback._trial_runs`, `.tags` and `.mlflow_util`, to log a trial's params under names MLflow
  accepts (a paired key `lora.r,lora.alpha` becomes `lora.r:lora.alpha`): `mlflow_callback`.

Optuna: `Study._storage` and `Trial._trial_id` (`FrozenTrial._trial_id`), to read and mark trials by their storage
id (`FikaOptunaSearch`, `close_interrupted`, `tell_final`).

trl: `trl.trainer.utils._use_triton`, which decides whether trl's fused LM head skips the positions without a
label; patched by `fika.trial.score_labelled_positions_only` (it lives in fika/, which never imports this package).

peft: a LoRA layer's `lora_A`, `lora_B`, `lora_dropout` and `scaling`, keyed by adapter name: `fika.pack_lora`
takes a new adapter's modules out of peft's layers into a pack's, and puts them back into peft's layers to save
them. What a pack reproduces of a solo run (transformers' data order and random draws, trl's loss normalisation and
its bf16 LoRA weights on a quantized model, accelerate's gradient clipping) is not an attribute to check: the
packed runs of tests/test_pack.py are compared with real solo runs, step by step.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import signal
from pathlib import Path

from fika.files import write_atomic

TUNE_STATE = "tune-state.pkl"
TUNER_PKL = "tuner.pkl"  # the Tuner Ray pickles into its folder when it is made
TUNE_STOP_HANDLER = "signal_interrupt_tune_run"


def tune_stop_handler():
    """Tune's SIGUSR1 handler while a fit runs (its loop saves its state and ends on it), or None outside a fit."""
    handler = signal.getsignal(signal.SIGUSR1)
    return handler if getattr(handler, "__name__", "") == TUNE_STOP_HANDLER else None


def tune_actor_env_vars() -> dict[str, str]:
    """The variables Tune gives every trainable actor in its runtime env."""
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS

    return dict(DEFAULT_ENV_VARS)


def keep_tune_state(checkpoint_path: str, run_dir: Path) -> None:
    """After Tune saved the searcher's state to `checkpoint_path`: a copy of Tune's state files of that driver
    session, and of the Tuner's `tuner.pkl`, in the run folder, written whole (see `restore_tune_state`).

    Ray writes the search generator's state after the searcher's, so the copy holds the previous save's: its
    counts are behind, which is harmless (the searcher's budget decides how many trials run, and the limiter
    drops its live trials on restore). A fit's first save has none yet: no copy is written then (a resume
    without the generator's state would create no trial), and Ray's own files stand until the next save.
    Ray's upload of a resumed fit's folder rewrites `tuner.pkl` in place (a kill then leaves it cut short): the
    copy keeps the last whole one.
    """
    staging, saved = Path(checkpoint_path).parent, Path(checkpoint_path)
    if "-tmp-searcher-state-" not in saved.name:  # not Tune's own save (`.<uuid>-tmp-searcher-state-<session>.pkl`)
        return
    session = saved.name.split("-tmp-searcher-state-", 1)[1].removesuffix(".pkl")
    names = (f"experiment_state-{session}.json", f"search_gen_state-{session}.json")
    if not all((staging / name).exists() for name in names):
        return
    files = {f"searcher-state-{session}.pkl": saved.read_bytes()}
    files.update({name: (staging / name).read_bytes() for name in names})
    tuner = whole_file(Path(run_dir) / "tune" / TUNER_PKL) or kept_tune_state(run_dir).get(TUNER_PKL)
    if tuner is not None:
        files[TUNER_PKL] = tuner
    write_atomic(Path(run_dir) / TUNE_STATE, pickle.dumps(files))


def kept_tune_state(run_dir: Path) -> dict[str, bytes]:
    """fika's whole copy of Tune's files (`keep_tune_state`), by name; empty when there is none."""
    path = Path(run_dir) / TUNE_STATE
    return pickle.loads(path.read_bytes()) if path.exists() else {}


def whole_file(path: Path) -> bytes | None:
    """The bytes of one of Tune's state files (JSON, or a pickle, whatever its name says), or None where it is
    missing or cut short (a kill while Ray wrote it). A pickle is read opcode by opcode to its end, without building
    what it holds."""
    import pickletools

    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        json.loads(data)
        return data
    except ValueError:
        pass
    try:
        for _ in pickletools.genops(data):  # raises at a cut; ends at the pickle's STOP
            pass
        return data
    except Exception:  # cut short
        return None


def tune_state_restorable(run_dir: Path) -> bool:
    """Whether Tune can resume the fit saved in `run_dir/tune`: a whole `tuner.pkl` (written when the Tuner is
    made, before the fit) and a whole set of state files (fika's copy, or Ray's own, which the first save writes):
    the experiment's, and the searcher's (an Optuna search's generator and searcher; a grid or random search's
    variant generator). A driver killed between the two left a Tuner Tune would restore without its searcher."""
    tune_dir, kept = Path(run_dir) / "tune", kept_tune_state(run_dir)
    if TUNER_PKL not in kept and whole_file(tune_dir / TUNER_PKL) is None:
        return False
    if kept:
        return True

    def whole(pattern: str) -> bool:
        return any(whole_file(path) is not None for path in tune_dir.glob(pattern))

    searcher = whole("basic-variant-state-*.json") or (
        whole("search_gen_state-*.json") and whole("searcher-state-*.pkl")
    )
    return whole("experiment_state-*.json") and searcher


def forget_tune_state(run_dir: Path) -> None:
    """Removes a fit's Tune folder that cannot be restored (see `tune_state_restorable`), and fika's copy of its
    state, so that a new fit starts there; the study and the trials' folders are kept."""
    import shutil

    shutil.rmtree(Path(run_dir) / "tune", ignore_errors=True)
    (Path(run_dir) / TUNE_STATE).unlink(missing_ok=True)


def restore_tune_state(run_dir: Path) -> None:
    """Before a resume: puts the last whole copy of Tune's files back into `run_dir/tune`.

    The copy is never older than what Ray copied into storage (it is written before Ray's copy starts), and it
    is whole where Ray's copy may be cut short by the kill.
    """
    files = kept_tune_state(run_dir)
    if not files:
        return
    tune_dir = Path(run_dir) / "tune"
    for pattern in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"):
        for old in tune_dir.glob(pattern):
            old.unlink()
    for name, data in files.items():
        write_atomic(tune_dir / name, data)


@contextlib.contextmanager
def actors_in_prestarted_workers():
    """Has Tune create its trainable actors with no runtime env of their own, so that Ray gives them the workers it
    started (and that imported the trial's libraries, `fika.search.worker`) instead of new processes.

    Tune gives every trainable actor a runtime env holding `PL_DISABLE_FORK` and the variables of the driver it
    propagates, and Ray never hands an actor with a runtime env a worker started without it. For a Ray this process
    started, its workers inherit this process's environment, so the runtime env adds nothing: `connect_ray` puts
    `PL_DISABLE_FORK` there before starting Ray, and this empties Tune's two lists during the fit.
    """
    from ray.tune.execution import class_cache

    defaults, propagated = dict(class_cache.DEFAULT_ENV_VARS), class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.DEFAULT_ENV_VARS.clear()
    class_cache.ENV_VARS_TO_PROPAGATE = set()
    try:
        yield
    finally:
        class_cache.DEFAULT_ENV_VARS.update(defaults)
        class_cache.ENV_VARS_TO_PROPAGATE = propagated


def with_callbacks(tuner, callbacks: list):
    """A restored Tuner that reports to this run's callbacks instead of the ones pickled with the old run."""
    tuner._local_tuner.get_run_config().callbacks = callbacks
    return tuner


def mlflow_callback(**kwargs):
    """Ray's MLflowLoggerCallback, with the params of paired keys named as MLflow allows."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class FikaMLflowLoggerCallback(MLflowLoggerCallback):
        def log_trial_start(self, trial) -> None:
            if trial not in self._trial_runs:
                tags = {**self.tags, "trial_name": str(trial)}
                self._trial_runs[trial] = self.mlflow_util.start_run(tags=tags, run_name=str(trial)).info.run_id
            params = {key.replace(",", ":"): value for key, value in trial.config.items()}
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=params)

    return FikaMLflowLoggerCallback(**kwargs)

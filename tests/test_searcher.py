"""The Optuna searcher and the Ray internals fika relies on, checked against the installed Ray and Optuna."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import optuna
import pytest
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from fika.search.internals import with_callbacks
from fika.search.searcher import FikaOptunaSearch, ResumableConcurrencyLimiter


def searcher(tmp_path: Path, budget: int = 10, points=None) -> FikaOptunaSearch:
    space = OptunaSearch.convert_search_space(
        {"train.learning_rate": tune.choice([1e-4, 2e-4]), "lora.r": tune.choice([8, 16])}
    )
    search = FikaOptunaSearch(
        space=space,
        metric="eval_loss",
        mode="min",
        points_to_evaluate=points,
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
        storage=optuna.storages.InMemoryStorage(),
        run_dir=str(tmp_path),
        rungs=[4],
        rung_key="train_loss_smooth",
        max_steps=12,
        startup=2,
        budget=budget,
    )
    (tmp_path / "trials").mkdir(parents=True, exist_ok=True)
    return search


def test_the_internals_fika_relies_on_are_still_there(tmp_path):
    """Every private internal listed in fika.search.internals, against the installed Ray, Optuna and trl."""
    import inspect

    import ray.tune.tune
    import trl.trainer.utils
    from optuna.distributions import CategoricalDistribution
    from peft.tuners.lora import LoraLayer
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.execution import class_cache
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.search_generator import SearchGenerator

    from fika.search.internals import TUNE_STOP_HANDLER

    search = searcher(tmp_path)
    assert isinstance(search._ot_study, optuna.Study) and isinstance(search._ot_trials, dict)
    assert isinstance(search._completed_trials, set)
    assert all(isinstance(d, CategoricalDistribution) for d in search._space.values())
    assert search._points_to_evaluate == [] and search._study_name and search._storage is not None
    search.suggest("a")
    assert isinstance(search._ot_trials["a"], optuna.Trial) and search._ot_trials["a"]._trial_id is not None
    frozen = search._ot_study._storage.get_trial(search._ot_trials["a"]._trial_id)
    assert isinstance(frozen, optuna.trial.FrozenTrial) and frozen._trial_id == search._ot_trials["a"]._trial_id
    limiter = ResumableConcurrencyLimiter(search, max_concurrent=2)
    assert limiter.suggest("b") is not None and limiter.live_trials == {"b"} and limiter.num_unfinished_live_trials == 1
    assert {"live_trials", "num_unfinished_live_trials"} <= set(limiter.get_state())  # what set_state restores
    # Tune's state files, and the name of its staging copy of the searcher's state (`keep_tune_state`)
    assert Searcher.CKPT_FILE_TMPL == "searcher-state-{}.pkl"
    assert SearchGenerator.CKPT_FILE_TMPL == "search_gen_state-{}.json"
    assert TuneController.CKPT_FILE_TMPL == "experiment_state-{}.json"
    assert BasicVariantGenerator.CKPT_FILE_TMPL == "basic-variant-state-{}.json"
    assert '-tmp-{file_name}"' in inspect.getsource(Searcher.save_to_dir)
    assert isinstance(class_cache.DEFAULT_ENV_VARS, dict) and isinstance(class_cache.ENV_VARS_TO_PROPAGATE, set)
    assert f"def {TUNE_STOP_HANDLER}(" in inspect.getsource(ray.tune.tune)
    logger = MLflowLoggerCallback(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (
        hasattr(logger, "tags")
        and hasattr(logger, "mlflow_util")
        and "_trial_runs" in inspect.getsource(MLflowLoggerCallback.log_trial_start)
    )
    assert callable(trl.trainer.utils._use_triton)
    assert {"lora_A", "lora_B"} <= set(LoraLayer.adapter_layer_names)
    assert {"lora_dropout", "scaling"} <= set(LoraLayer.other_param_names)


def test_a_trial_restored_by_a_resume_reaches_the_study_through_the_concurrency_limiter(tmp_path):
    """Tune saves the searcher, not the limiter around it: after a resume the limiter has no live trials, and a
    restored trial's completion must still reach the study (Tune's own limiter drops it)."""
    search = searcher(tmp_path)
    search.suggest("restored")  # asked before the driver was killed
    limiter = ResumableConcurrencyLimiter(search, max_concurrent=2)  # as the resumed Tuner holds it
    assert limiter.live_trials == set()
    assert limiter.suggest("new") is not None and limiter.live_trials == {"new"}
    limiter.on_trial_complete("restored", {"step": 12, "eval_loss": 2.0, "status": "completed"})
    limiter.on_trial_complete("new", {"step": 4, "train_loss_smooth": 2.9})
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in search._ot_study.trials}
    assert states == {"restored": "COMPLETE", "new": "PRUNED"} and limiter.live_trials == set()


def test_a_trial_whose_completion_the_searcher_fails_to_take_frees_its_place(tmp_path):
    """The study's storage fails as a trial ends (a full disk): Tune logs the error and fails the trial; the place
    is free again, so the search does not wait forever for a trial the limiter will not hand out."""
    search = searcher(tmp_path)
    limiter = ResumableConcurrencyLimiter(search, max_concurrent=1)
    assert limiter.suggest("a") is not None and limiter.suggest("b") is None  # the one place is taken

    def storage_fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    search.on_trial_complete = storage_fails
    with pytest.raises(OSError):
        limiter.on_trial_complete("a", {"step": 12, "eval_loss": 2.0})
    assert limiter.live_trials == set() and limiter.suggest("b") is not None


def test_a_resume_restores_the_limiter_without_the_live_trials_of_an_old_save(tmp_path):
    """The limiter's state comes from Tune's save before last: a trial live then may have ended since, and would
    hold its place forever (with every place held, Tune waits for a trial that never comes)."""
    limiter = ResumableConcurrencyLimiter(searcher(tmp_path), max_concurrent=1)
    assert limiter.suggest("a") is not None
    state = limiter.get_state()
    restored = ResumableConcurrencyLimiter(searcher(tmp_path / "b"), max_concurrent=1)
    restored.set_state(state)
    assert restored.live_trials == set() and restored.suggest("b") is not None


def test_the_copy_of_tunes_state_is_written_only_with_the_search_generators(tmp_path):
    """Ray writes the search generator's state after the searcher's; at a fit's first save it does not exist yet,
    and a copy without it would resume into a search that creates no more trials."""
    from fika.search.internals import TUNE_STATE

    search, staging = searcher(tmp_path), tmp_path / "staging"
    staging.mkdir()
    (staging / "experiment_state-s1.json").write_text("{}")
    search.save(str(staging / ".u1-tmp-searcher-state-s1.pkl"))
    assert not (tmp_path / TUNE_STATE).exists()  # the first save: Ray's own files stand
    (staging / "search_gen_state-s1.json").write_bytes(b"gen")
    search.save(str(staging / ".u2-tmp-searcher-state-s1.pkl"))
    files = pickle.loads((tmp_path / TUNE_STATE).read_bytes())
    assert sorted(files) == ["experiment_state-s1.json", "search_gen_state-s1.json", "searcher-state-s1.pkl"]


def test_a_tuner_pkl_cut_short_by_a_kill_is_put_back_whole(tmp_path):
    """Ray's upload of a resumed fit's folder rewrites `tune/tuner.pkl` in place: a driver killed during it left an
    empty file that `Tuner.restore` cannot read. fika's copy keeps the last whole one and puts it back."""
    from fika.search.internals import TUNE_STATE, restore_tune_state, tune_state_restorable, whole_file

    search, staging, tune_dir = searcher(tmp_path), tmp_path / "staging", tmp_path / "tune"
    staging.mkdir()
    tune_dir.mkdir()
    whole = pickle.dumps({"trainable": list(range(2000))})
    (tune_dir / "tuner.pkl").write_bytes(whole)
    (staging / "experiment_state-s1.json").write_text("{}")
    (staging / "search_gen_state-s1.json").write_text("{}")
    search.save(str(staging / ".u1-tmp-searcher-state-s1.pkl"))
    assert pickle.loads((tmp_path / TUNE_STATE).read_bytes())["tuner.pkl"] == whole
    for cut in (b"", whole[: len(whole) // 2]):
        (tune_dir / "tuner.pkl").write_bytes(cut)
        assert whole_file(tune_dir / "tuner.pkl") is None
        search.save(str(staging / ".u2-tmp-searcher-state-s1.pkl"))  # a save while it is cut keeps the whole one
        assert tune_state_restorable(tmp_path)
        restore_tune_state(tmp_path)
        assert (tune_dir / "tuner.pkl").read_bytes() == whole
    (tmp_path / TUNE_STATE).unlink()  # Ray's own files, with a cut tuner.pkl: a new fit, not a failed restore
    for name in ("experiment_state-s1.json", "search_gen_state-s1.json", "searcher-state-s1.pkl"):
        assert whole_file(tune_dir / name) is not None
    assert tune_state_restorable(tmp_path)
    (tune_dir / "tuner.pkl").write_bytes(b"")
    assert not tune_state_restorable(tmp_path)


def test_a_grid_or_random_search_resumes_from_its_variant_generators_state(tmp_path):
    """A grid or random search has no Optuna searcher: Tune saves its variant generator instead (a pickle named
    .json). A resume restores that fit (before, fika did not know the file, started a new fit, and the grid ran
    its configurations again from the first)."""
    from ray.tune.search import BasicVariantGenerator

    from fika.search.internals import tune_state_restorable

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps({"trainable": "x"}))
    (tune_dir / "experiment_state-s1.json").write_text("{}")
    generator = BasicVariantGenerator()
    generator.save_to_dir(str(tune_dir), "s1")
    state = tune_dir / "basic-variant-state-s1.json"
    assert state.exists()
    assert tune_state_restorable(tmp_path)
    state.write_bytes(state.read_bytes()[:20])  # cut short by a kill
    assert not tune_state_restorable(tmp_path)


def test_a_scheduler_stop_is_recorded_in_the_trials_folder_before_the_study_is_told(tmp_path):
    """Tune tells the searcher of an ASHA stop before the trial's worker ends it; the folder says where it was
    stopped, so that a run of it after a killed driver stops there too (`FikaTrainable`)."""
    from fika.search.run_folder import PRUNED_AT

    search = searcher(tmp_path)
    search.suggest("a")
    (tmp_path / "trials" / "a").mkdir()
    search.on_trial_result("a", {"step": 4, "train_loss_smooth": 2.5})
    search.on_trial_complete("a", {"step": 4, "train_loss_smooth": 2.5})
    assert json.loads((tmp_path / "trials" / "a" / PRUNED_AT).read_text()) == {"step": 4}
    assert search._ot_study.trials[0].state.name == "PRUNED"


def test_the_study_gets_what_happened_to_each_trial(tmp_path):
    search = searcher(tmp_path, points=[{"train.learning_rate": 2e-4, "lora.r": 8}])
    configs = {t: search.suggest(t) for t in ("a", "b", "c")}
    assert configs["a"] == {"train.learning_rate": 2e-4, "lora.r": 8}  # the baseline first
    search.on_trial_result("a", {"step": 1, "train_loss_smooth": 3.0})  # a per-step record: not reported
    search.on_trial_result("a", {"step": 4, "train_loss_smooth": 2.5})  # a rung: reported
    search.on_trial_complete("a", {"step": 12, "eval_loss": 2.1, "status": "completed"})
    search.on_trial_complete("b", {"step": 4, "train_loss_smooth": 2.9})  # stopped by ASHA at its rung
    search.on_trial_complete("c", {"step": 7, "eval_loss": float("nan"), "status": "diverged"})
    trials = {t.user_attrs["tune_trial_id"]: t for t in search._ot_study.trials if "tune_trial_id" in t.user_attrs}
    assert (
        trials["a"].state.name == "COMPLETE"
        and trials["a"].value == 2.1
        and trials["a"].intermediate_values == {4: 2.5}
    )
    assert (
        trials["b"].state.name == "PRUNED" and trials["b"].value == 2.9 and trials["b"].intermediate_values == {4: 2.9}
    )
    assert trials["c"].state.name == "FAIL" and trials["c"].user_attrs["fika_status"] == "diverged"
    draws = [json.loads(line) for line in (tmp_path / "draws.jsonl").read_text().splitlines()]
    assert [d["drawn"] for d in draws] == ["baseline", "random", "random"]
    search.on_trial_complete("a", {"step": 12, "eval_loss": 2.1, "status": "completed"})  # told once only


def test_no_combination_runs_twice_and_the_budget_holds(tmp_path):
    search = searcher(tmp_path, budget=10)
    seen = []
    for i in range(5):
        config = search.suggest(str(i))
        if config == Searcher.FINISHED:
            break
        seen.append(json.dumps(config, sort_keys=True))
        search.on_trial_complete(str(i), {"step": 12, "eval_loss": 2.0 + i / 10, "status": "completed"})
    assert len(seen) == len(set(seen)) == 4  # the 2 x 2 space, then FINISHED
    assert [t.state.name for t in search._ot_study.trials] == ["COMPLETE"] * 4  # no repeated draw in the study
    budget = searcher(tmp_path / "b", budget=2)
    assert budget.suggest("x") != Searcher.FINISHED and budget.suggest("y") != Searcher.FINISHED
    assert budget.suggest("z") == Searcher.FINISHED


def test_a_trial_drawn_key_by_key_never_gets_first_keys_whose_every_configuration_ran():
    """TPE and random draws take a trial's keys one at a time. A sampler that likes one learning rate, once every
    rank of it has run, must move to another learning rate at the first key: at the last key no rank would be new,
    and the study would be told a FAIL for a repeat."""
    from optuna.distributions import CategoricalDistribution
    from optuna.samplers import RandomSampler

    from fika.search.sampler import NoRepeatSampler, config_key

    class FavouriteSampler(RandomSampler):  # always its first choice while it can
        def sample_independent(self, study, trial, name, distribution):
            return distribution.choices[0]

    space = {"lr": CategoricalDistribution([1e-4, 2e-4]), "r": CategoricalDistribution([8, 16])}
    seen = {config_key({"lr": 1e-4, "r": 8}): 0, config_key({"lr": 1e-4, "r": 16}): 1}
    names = list(space)
    untried = [{"lr": 2e-4, "r": 8}, {"lr": 2e-4, "r": 16}]
    sampler = NoRepeatSampler(FavouriteSampler(seed=0), seen, lambda: [c for c in untried if config_key(c) not in seen])
    sampler.space = space
    study = optuna.create_study(sampler=sampler)
    for _ in range(2):
        trial = study.ask()
        config = {name: trial.suggest_categorical(name, space[name].choices) for name in names}
        assert config["lr"] == 2e-4 and config_key(config) not in seen
        seen[config_key(config)] = trial.number
        study.tell(trial, 1.0)


def test_after_a_killed_driver_the_study_trials_tune_never_saw_are_settled(tmp_path):
    search = searcher(tmp_path)
    for trial_id in ("known", "finished", "cut", "told"):
        search.suggest(trial_id)
    search.on_trial_complete("told", {"step": 12, "eval_loss": 2.5})  # told the study, then Tune's save failed
    for trial_id, status in (("finished", "stopped"), ("cut", None), ("told", "completed")):  # after Tune's last save
        folder = tmp_path / "trials" / trial_id
        folder.mkdir()
        (folder / "config.yaml").write_text("{}")
        if status:
            (folder / "result.json").write_text(json.dumps({"status": status, "eval_losses": {"4": 2.7}}))
        search._ot_trials.pop(trial_id)  # the restored searcher does not know them
    interrupted = search.reconcile()
    trials = {t.user_attrs["tune_trial_id"]: t for t in search._ot_study.trials if "fika_repeat_of" not in t.user_attrs}
    assert interrupted == ["cut"] and search.adopted == 3  # every one that ran counts toward the budget
    assert trials["finished"].state.name == "PRUNED" and trials["cut"].state.name == "FAIL"
    assert trials["told"].state.name == "COMPLETE"
    assert trials["known"].state.name == "RUNNING"  # Tune will finish it
    assert json.loads((tmp_path / "trials" / "cut" / "result.json").read_text())["status"] == "failed"
    assert {json.dumps(t.params, sort_keys=True) for t in trials.values()} <= set(search.seen)  # never drawn again
    assert search.reconcile() == [] and search.adopted == 3  # a second resume counts them once


def test_the_baseline_is_queued_once_whatever_tune_sets_up_again(tmp_path):
    """Tune sets the space of the searcher pickled with the Tuner up again before it restores an interrupted fit's
    searcher: a study that holds trials does not get its baseline queued a second time."""
    from optuna.storages.journal import JournalFileBackend

    baseline = {"train.learning_rate": 2e-4, "lora.r": 8}
    space = {"train.learning_rate": tune.choice([1e-4, 2e-4]), "lora.r": tune.choice([8, 16])}

    def fresh():
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
        search = FikaOptunaSearch(
            metric="eval_loss",
            mode="min",
            points_to_evaluate=[baseline],
            study_name="s",
            sampler=optuna.samplers.TPESampler(seed=0),
            storage=storage,
            run_dir=str(tmp_path),
            rungs=[4],
            rung_key="train_loss_smooth",
            max_steps=12,
            startup=2,
            budget=10,
        )
        search.set_search_properties("eval_loss", "min", space)
        return search

    (tmp_path / "trials").mkdir()
    assert fresh().suggest("first") == baseline
    again = fresh()  # as Tune does before a restore
    assert [t.state.name for t in again._ot_study.get_trials()] == ["RUNNING"]  # no second baseline waiting


def test_a_trial_that_never_started_goes_back_to_the_queue(tmp_path):
    """A study trial whose Tune trial never started (killed before, or its folder made just before the disk filled):
    no folder and no count, and the next trial runs its configuration as the same study trial."""
    search = searcher(tmp_path)
    params = search.suggest("empty")
    (tmp_path / "trials" / "empty").mkdir()  # made, then the disk was full: not even its config.yaml
    search._ot_trials.pop("empty")
    assert search.reconcile() == [] and search.adopted == 0  # another trial takes its place in the budget
    assert not (tmp_path / "trials" / "empty").exists()
    assert [t.state.name for t in search._ot_study.trials] == ["WAITING"]
    assert search.suggest("next") == params  # the same configuration, drawn once
    (trial,) = search._ot_study.trials
    assert trial.state.name == "RUNNING" and trial.user_attrs["tune_trial_id"] == "next"


@pytest.fixture
def ray_local():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_restored_tuner_reports_to_this_runs_callbacks(tmp_path, ray_local):
    def trainable(config):
        tune.report({"x": config["a"]})

    tune.Tuner(
        trainable,
        param_space={"a": tune.grid_search([1, 2])},
        run_config=tune.RunConfig(name="t", storage_path=str(tmp_path), verbose=0),
    ).fit()

    class Mine(tune.Callback):
        pass

    mine = Mine()
    restored = with_callbacks(tune.Tuner.restore(str(tmp_path / "t"), trainable), [mine])
    assert restored._local_tuner.get_run_config().callbacks == [mine]


def test_the_progress_line_counts_a_trial_tune_saw_end_before_its_result_is_written(tmp_path, capsys):
    from types import SimpleNamespace

    from fika.search.progress import SearchProgress

    done = tmp_path / "trials" / "a"
    done.mkdir(parents=True)
    (done / "result.json").write_text(json.dumps({"status": "completed", "eval_loss": 1.5}))
    progress = SearchProgress(tmp_path, total=3, metric="eval_loss", max_steps=60)
    last = {"step": 60, "eval_loss": 1.2, "trial_dir": str(tmp_path / "trials" / "b")}  # b still saving
    progress.on_trial_complete(0, [], SimpleNamespace(trial_id="b", last_result=last))
    assert "2/3 trials done (2 completed, 0 pruned" in capsys.readouterr().out
    assert progress.ended()[1] == (1.2, "b")

    pruned = {"step": 20, "eval_loss": 0.1, "trial_dir": str(tmp_path / "trials" / "c")}  # not a finished metric
    progress.on_trial_complete(0, [], SimpleNamespace(trial_id="c", last_result=pruned))
    line = capsys.readouterr().out
    assert "3/3 trials done (2 completed, 1 pruned" in line and "best eval_loss 1.2000 (b)" in line


def test_the_time_left_claims_no_bound_it_cannot_keep():
    from fika.search.progress import time_left

    assert time_left(100, 5, 10.0, True) == "time left: unknown yet"
    assert time_left(120, 240, 300.0, True) == "about 2.5 min left if no more trials are pruned"
    assert time_left(0, 280, 300.0, True) == "finishing the last trials"  # its last step done, its eval running
    assert time_left(-5, 280, 300.0, False) == "no steps left"


def test_a_local_optuna_search_creates_its_first_trials_together(tmp_path, ray_local):
    """Tune keeps one trial pending for a searcher without a limit, so each worker would wait for the previous
    one to start; on a local Ray fika limits the searcher to its slots plus one drawn ahead. On a cluster
    (an autoscaler may add nodes) Tune's own default stays."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import SearchGenerator

    from fika.search.spec import load_spec
    from fika.search.tuner import build_searcher

    smoke = Path(__file__).resolve().parents[1] / "search" / "specs" / "smoke.yaml"
    pending = {}
    for name, overrides in {"local": [], "cluster": ["address=auto"], "capped": ["max_concurrent=1"]}.items():
        spec = load_spec(smoke, [f"storage={tmp_path}", f"name={name}", *overrides])
        (tmp_path / name).mkdir()
        pending[name] = _get_max_pending_trials(SearchGenerator(build_searcher(spec, tmp_path / name)))
    assert pending == {"local": 2, "cluster": 1, "capped": 1}  # ray_local: 1 CPU, 1-CPU trials


def test_a_journal_cut_mid_line_is_repaired_before_the_study_writes_again(tmp_path):
    """A full disk (or a kill) mid-append leaves half a line at the journal's end; the next append would run into
    it and Optuna could read the journal no more. The half line is cut before a resume opens the study."""
    from optuna.storages.journal import JournalFileBackend

    from fika.files import cut_partial_line

    journal = tmp_path / "optuna.journal"

    def study():
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
        return optuna.create_study(study_name="s", storage=storage, load_if_exists=True)

    study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 6, "worker_id": "w", "trial_id": 2, "sta')  # the disk filled here
    cut_partial_line(journal)
    assert journal.read_bytes() == whole
    cut_partial_line(journal)  # a whole file stays as it is
    assert journal.read_bytes() == whole
    study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert [t.state.name for t in study().trials] == ["COMPLETE"] * 3
    (tmp_path / "none").write_bytes(b"no newline at all")
    cut_partial_line(tmp_path / "none")
    assert (tmp_path / "none").read_bytes() == b""
    cut_partial_line(tmp_path / "missing")  # nothing to cut

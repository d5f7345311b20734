"""The local searcher (start-up at the top learning rate and the largest rank, then neighbours of the best trial) and
ASHA compared within each lr schedule: their draws and stops, and a real search with both."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from fika.cli import main
from fika.search.grouped_asha import GroupedASHAScheduler
from fika.search.searcher import FikaOptunaSearch
from fika.search.tuner import optuna_sampler

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search" / "specs" / "smoke.yaml"
SPACE = {
    "train.learning_rate": tune.choice([1e-4, 2e-4, 5e-4]),
    "train.lr_scheduler": tune.choice(["linear", "cosine"]),
    "lora.r": tune.choice([8, 16, 32]),
}


def local_searcher(tmp_path: Path, startup: int = 2) -> FikaOptunaSearch:
    (tmp_path / "trials").mkdir(parents=True, exist_ok=True)
    return FikaOptunaSearch(
        space=OptunaSearch.convert_search_space(SPACE),
        metric="eval_loss",
        mode="min",
        sampler=optuna_sampler("local", 0, startup),
        storage=optuna.storages.InMemoryStorage(),
        run_dir=str(tmp_path),
        rungs=[],
        rung_key="train_loss_smooth",
        max_steps=12,
        startup=startup,
        budget=18,
    )


def loss(config: dict) -> float:
    """A made-up loss: lower with a higher learning rate and rank, cosine a little better."""
    return (
        3.0
        - 1000 * config["train.learning_rate"]
        - config["lora.r"] / 100
        - 0.01 * (config["train.lr_scheduler"] == "cosine")
    )


def one_apart(a: dict, b: dict) -> bool:
    return sum(a[k] != b[k] for k in a) == 1


def neighbours(config: dict) -> list[dict]:
    return [{**config, k: v} for k, d in SPACE.items() for v in d.categories if v != config[k]]


def test_start_up_draws_take_the_top_learning_rate_and_rank_then_neighbours_of_the_best_are_tried(tmp_path):
    """The start-up draws: the largest learning rate and rank, the other keys spread over their choices. Then a
    neighbour of the best trial, until none is left."""
    search = local_searcher(tmp_path)
    done: dict[str, dict] = {}
    for i in range(18):
        config = search.suggest(str(i))
        if config == Searcher.FINISHED:
            break
        if i < 2:
            assert config["train.learning_rate"] == 5e-4 and config["lora.r"] == 32  # the start-up: the largest
        else:
            best = min(done.values(), key=loss)
            drawn = json.loads((tmp_path / "draws.jsonl").read_text().splitlines()[-1])["drawn"]
            if drawn == "local":
                assert one_apart(config, best)  # one choice away from the best so far
            else:
                assert drawn in ("tpe", "untried") and all(n in done.values() for n in neighbours(best))
        done[str(i)] = config
        search.on_trial_complete(str(i), {"step": 12, "eval_loss": loss(config), "status": "completed"})
    kinds = [json.loads(line)["drawn"] for line in (tmp_path / "draws.jsonl").read_text().splitlines()]
    assert kinds[:2] == ["random", "random"] and "local" in kinds
    first, second = done["0"], done["1"]
    assert first["train.lr_scheduler"] != second["train.lr_scheduler"]  # spread over the other key's choices
    assert len({json.dumps(c, sort_keys=True) for c in done.values()}) == len(done) == 18  # none twice, all run
    best = {"train.learning_rate": 5e-4, "train.lr_scheduler": "cosine", "lora.r": 32}
    assert best in list(done.values())[:2]  # found by the start-up


def test_a_paired_rank_key_starts_at_its_largest_rank_and_spreads_over_the_pairs_that_tie():
    """`lora.r,lora.alpha` by its r: [16, 16] and [16, 32] tie at the top and the start-up draws take both; a key
    that names no learning rate or rank, or choices that are not numbers, get no top."""
    from optuna.distributions import CategoricalDistribution

    from fika.search.local_search import top_choices
    from fika.search.trials import encode_choice

    pairs = CategoricalDistribution([encode_choice(p) for p in ([8, 8], [16, 16], [16, 32])])
    assert top_choices("lora.r,lora.alpha", pairs) == ["[16, 16]", "[16, 32]"]
    assert top_choices("lora.alpha,lora.r", CategoricalDistribution(["[8, 32]", "[16, 16]"])) == ["[8, 32]"]
    assert top_choices("lora.alpha", CategoricalDistribution([8, 16])) is None
    assert top_choices("train.learning_rate", CategoricalDistribution(["low", "high"])) is None
    study = optuna.create_study(sampler=optuna_sampler("local", 0, 2))
    drawn = [study.ask({"lora.r,lora.alpha": pairs}).params["lora.r,lora.alpha"] for _ in range(2)]
    assert sorted(drawn) == ["[16, 16]", "[16, 32]"]


def test_a_learning_rate_given_as_a_range_is_drawn_by_tpe_for_every_trial():
    """The top-of-the-range prior is for choices: a range's start-up draws are TPE's random ones, spread over it. After
    the start-up a local move changes a choice key, and TPE draws the range again: it is not pinned to the best's."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import create_trial

    sampler = optuna_sampler("local", 0, 3)
    study = optuna.create_study(sampler=sampler)
    rate = {"train.learning_rate": FloatDistribution(1e-5, 1e-3, log=True)}
    values = [study.ask(rate).params["train.learning_rate"] for _ in range(3)]
    assert len(set(values)) == 3 and all(1e-5 <= v < 1e-3 for v in values)
    space = {**rate, "train.lr_scheduler": CategoricalDistribution(["linear", "cosine", "constant"])}
    study = optuna.create_study(sampler=optuna_sampler("local", 0, 2))
    best = {"train.learning_rate": 3e-4, "train.lr_scheduler": "linear"}
    for params, value in ((best, 1.0), ({"train.learning_rate": 1e-5, "train.lr_scheduler": "cosine"}, 2.0)):
        study.add_trial(create_trial(params=params, distributions=space, value=value))
    local, after = study.ask(space), study.ask(space)
    assert local.params["train.lr_scheduler"] == "constant"  # the one schedule no trial holds yet
    assert local.params["train.learning_rate"] != 3e-4  # drawn by TPE, not the best's
    local_draws = study.sampler.local_draws
    assert local.number in local_draws and after.number not in local_draws  # every schedule has run: TPE


class Trial:
    def __init__(self, trial_id: str, schedule: str):
        self.trial_id, self.config = trial_id, {"train.lr_scheduler": schedule}


def test_asha_within_the_schedule_compares_a_trial_only_with_its_own_schedule():
    """Reduction 2, one rung at step 4. A trial in the worse half of its own schedule's trials is stopped there; a
    cosine trial far worse than the linear ones, but better than the other cosine one, goes on (one ASHA over all
    four trials stops it)."""
    options = dict(time_attr="step", metric="m", mode="min", max_t=12, grace_period=4, reduction_factor=2)
    trials = [Trial("a", "linear"), Trial("c", "cosine"), Trial("b", "linear"), Trial("d", "cosine")]
    values = [1.0, 2.0, 1.5, 1.9]
    decisions = {}
    for name, asha in (
        ("within", GroupedASHAScheduler(["train.lr_scheduler"], **options)),
        ("one", ASHAScheduler(**options)),
    ):
        for trial in trials:
            asha.on_trial_add(None, trial)
        decisions[name] = [
            asha.on_trial_result(None, t, {"step": 4, "m": v}) for t, v in zip(trials, values, strict=True)
        ]
        asha.on_trial_complete(None, trials[0], {"step": 12, "m": 0.9})
    assert decisions["within"] == ["CONTINUE", "CONTINUE", "STOP", "CONTINUE"]
    assert decisions["one"] == ["CONTINUE", "STOP", "CONTINUE", "STOP"]  # d: in the worse half of all four


def test_compare_within_names_searched_keys_only(capsys):
    assert main(["search", str(SMOKE), "scheduler.compare_within=[lora.alpha]", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scheduler.compare_within: 'lora.alpha' is not allowed: give searched keys" in err[0]


def test_a_local_search_runs_end_to_end_with_asha_within_the_schedule(tmp_path, capsys, monkeypatch):
    """The smoke search with the local searcher: a real Ray Tune search, its draws named, the report written."""
    monkeypatch.chdir(tmp_path)  # the report goes to reports/ here
    args = ["search", str(SMOKE), "searcher=local", "num_samples=6", f"storage={tmp_path}"]
    args.append("scheduler.compare_within=[train.lr_scheduler]")  # the smoke spec sets one ASHA for the other tests
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "local searcher, 6 trials, 2 drawn at random (at the top learning rate and the largest rank)" in out
    assert "rungs at steps [6] on train_loss_smooth, each trial compared within its train.lr_scheduler" in out
    assert main(args) == 0
    run = tmp_path / "smoke"
    draws = [json.loads(line) for line in (run / "draws.jsonl").read_text().splitlines()]
    kinds = [d["drawn"] for d in draws]
    later = kinds.index("local")  # the start-up: the draws made before 2 trials had finished
    assert kinds[:later] == ["baseline"] + ["random"] * (later - 1) and later >= 3
    assert all(d["params"]["train.learning_rate"] == 2e-2 for d in draws[1:later])  # the smoke space's top
    assert all(d["params"]["lora.r,lora.alpha"] in ("[16, 16]", "[16, 32]") for d in draws[1:later])  # largest r
    assert set(kinds[later:]) <= {"local", "tpe", "untried"}
    study = optuna.load_study(
        study_name="smoke",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / "optuna.journal"))),
    )
    assert len(study.trials) == 6 and all(t.state.is_finished() for t in study.trials)
    assert (tmp_path / "reports" / "smoke" / "index.md").exists()


def test_a_warm_started_study_moves_from_its_best_earlier_trial_at_once():
    """Trials an earlier search brought in (COMPLETE, with their values) count as the start-up: the first new draw is
    already a neighbour of the best of them."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    space = {
        "train.learning_rate": CategoricalDistribution([1e-4, 2e-4, 5e-4]),
        "lora.r": CategoricalDistribution([8, 16, 32]),
    }
    sampler = optuna_sampler("local", 0, 2)
    study = optuna.create_study(sampler=sampler)
    earlier = [({"train.learning_rate": 1e-4, "lora.r": 8}, 2.0), ({"train.learning_rate": 2e-4, "lora.r": 16}, 1.5)]
    for params, value in earlier:
        study.add_trial(create_trial(params=params, distributions=space, value=value))
    trial = study.ask(space)
    assert one_apart(trial.params, earlier[1][0]) and trial.number in sampler.local_draws


def test_a_local_move_walks_down_the_learning_rates_first_one_choice_at_a_time():
    """A key of numbers moves to its nearest untried choice on either side, a key of names to any untried one; while a
    learning-rate move is left, the local search makes only those."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from fika.search.local_search import nearest_untried

    rates = CategoricalDistribution([1e-4, 2e-4, 5e-4, 1e-3])
    assert nearest_untried(rates, 1e-3, lambda c: False) == [5e-4]
    assert nearest_untried(rates, 2e-4, lambda c: False) == [1e-4, 5e-4]
    assert nearest_untried(rates, 1e-3, lambda c: c == 5e-4) == [2e-4]  # the next untried one down
    names = CategoricalDistribution(["linear", "cosine", "constant"])
    assert nearest_untried(names, "linear", lambda c: False) == ["cosine", "constant"]
    space = {"train.learning_rate": rates, "train.lr_scheduler": names}
    study = optuna.create_study(sampler=optuna_sampler("local", 0, 1))
    best = {"train.learning_rate": 1e-3, "train.lr_scheduler": "linear"}
    study.add_trial(create_trial(params=best, distributions=space, value=1.0))
    drawn = [study.ask(space).params for _ in range(4)]  # no results told: each drawn trial counts as tried
    assert [d["train.learning_rate"] for d in drawn[:3]] == [5e-4, 2e-4, 1e-4]
    assert all(d["train.lr_scheduler"] == "linear" for d in drawn[:3])
    assert drawn[3]["train.learning_rate"] == 1e-3 and drawn[3]["train.lr_scheduler"] != "linear"  # then the others

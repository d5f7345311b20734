"""Fewer trials to the same decision: warm starts from earlier searches, the GP sampler, and a spec's `confirm:`
re-runs that end in a decision. Real searches on the tiny model."""

from __future__ import annotations

import json
import os
import random
import shutil

import optuna
import pytest
import yaml

import fika.search
from fika.cli import main
from fika.search.warm_start import carried_values, plan_warm_start, read_warm_start, settled_keys

from .test_search import SMOKE, load_study


def draws(run) -> list[dict]:
    return [json.loads(line) for line in (run / "draws.jsonl").read_text().splitlines()]


def config_of(run, trial: str) -> str:
    config = yaml.safe_load((run / "trials" / trial / "config.yaml").read_text())
    return json.dumps({k: config[k] for k in ("lora", "train")}, sort_keys=True)


@pytest.fixture
def tiny_copy(tmp_path):
    """The tiny model as a folder of its own: another `model.name` for the searches below."""
    from fika.config import ModelConfig
    from fika.model import load_tokenizer, tiny_model_dir

    folder = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model_dir(), folder)
    load_tokenizer(ModelConfig(name="tiny")).save_pretrained(folder)
    return folder


def test_a_search_settles_a_key_where_a_trial_that_differs_in_it_alone_loses_beyond_the_eval_noise():
    """What carries over from an earlier search that differs: its best's learning rate and rank, and the keys where a
    one-key neighbour of the best lost to it beyond the eval noise (paired over the conversations)."""
    rng = random.Random(0)
    base = [rng.uniform(40, 60) for _ in range(24)]
    evals = lambda shift, noise=0.0: {  # noqa: E731
        "ids": list(range(24)),
        "sums": [b + shift + rng.gauss(0, noise) for b in base],
        "counts": [20] * 24,
    }
    best = {
        "train.learning_rate": 5e-4,
        "train.lr_scheduler": "cosine",
        "lora.r,lora.alpha": "[32, 32]",
        "lora.dropout": 0.1,
    }
    finals = [
        (best, evals(0.0)),
        ({**best, "train.lr_scheduler": "linear"}, evals(0.5, 0.1)),  # worse on every conversation: settled
        ({**best, "lora.dropout": 0.0}, evals(0.0, 0.5)),  # within the noise: not settled
        ({**best, "lora.dropout": 0.0, "train.learning_rate": 2e-4}, evals(3.0)),  # two keys differ: says nothing
        ({**best, "lora.r,lora.alpha": "[8, 8]"}, evals(-1.0)),  # better than the best: not a loss
    ]
    assert settled_keys(finals) == ["train.lr_scheduler"]
    assert settled_keys([]) == []
    assert carried_values(best, ["train.lr_scheduler"]) == {k: best[k] for k in list(best)[:3]}
    assert carried_values({"lora.dropout": 0.1}, []) == {}


def test_values_that_run_first_leave_the_other_keys_to_the_local_start_up():
    """A warm start's carried values are fixed; the local searcher's start-up draws the other keys as at a cold start
    (the largest rank, the least-used schedule), and its other start-up draws take the carried learning rate instead
    of the top one."""
    from optuna.distributions import CategoricalDistribution

    from fika.search.tuner import optuna_sampler

    space = {
        "train.learning_rate": CategoricalDistribution([1e-4, 2e-4, 5e-4]),
        "train.lr_scheduler": CategoricalDistribution(["linear", "cosine"]),
        "lora.r": CategoricalDistribution([8, 16, 32]),
    }
    study = optuna.create_study(sampler=optuna_sampler("local", 0, 2))
    study.enqueue_trial({"train.learning_rate": 1e-4}, user_attrs={"fika_drawn": "warm"})  # an earlier search's best
    warm, start_up = study.ask(space), study.ask(space)
    assert (warm.params["train.learning_rate"], warm.params["lora.r"]) == (1e-4, 32)
    assert (start_up.params["train.learning_rate"], start_up.params["lora.r"]) == (1e-4, 32)
    assert start_up.params["train.lr_scheduler"] != warm.params["train.lr_scheduler"]
    cold = optuna.create_study(sampler=optuna_sampler("local", 0, 2))
    cold.enqueue_trial({"train.learning_rate": 1e-4})  # another enqueued trial (a baseline) sets no prior
    cold.ask(space)
    assert cold.ask(space).params["train.learning_rate"] == 5e-4


def test_a_warm_start_reuses_values_of_the_same_configs_and_reruns_the_best_of_another_model(
    tmp_path, tiny_copy, capsys
):
    common = {"storage": str(tmp_path), "num_samples": 4}
    other = fika.search.run(
        SMOKE, {**common, "name": "other", "base.model.name": str(tiny_copy), "report_dir": str(tmp_path / "r-other")}
    )
    # another model: none of its values enter the study; its best configuration runs first with what carries over
    first = fika.search.run(
        SMOKE, {**common, "name": "first", "warm_start": [str(other.run_dir)], "report_dir": str(tmp_path / "r-first")}
    )
    first_draws = draws(first.run_dir)
    assert [d["drawn"] for d in first_draws].count("warm") == 1 and first_draws[0]["drawn"] == "warm"
    (earlier,) = read_warm_start(first.run_dir)
    best_other = list(other.ranking[other.ranking["status"] == "completed"]["trial"])[0]
    best_params = next(d["params"] for d in draws(other.run_dir) if d["trial"] == best_other)
    carried = earlier.first[0]["params"]
    assert earlier.first[0]["trial"] == best_other and set(earlier.settled) <= set(best_params)
    assert carried == {
        k: v for k, v in best_params.items() if k in ("train.learning_rate", "lora.r,lora.alpha", *earlier.settled)
    }
    assert all(first_draws[0]["params"][k] == v for k, v in carried.items())  # on this search's model
    study = load_study(first.run_dir, "first")
    assert len(study.trials) == len(first.ranking) == 4  # no values of the other model's trials
    report = (tmp_path / "r-first" / "index.md").read_text()
    assert (
        f"differs (model.name '{tiny_copy}' -> 'tiny')" in report and "its best configuration ran first with" in report
    )
    local = fika.search.api.resolved_spec(SMOKE, {**common, "name": "local", "searcher": "local", "num_samples": 12})
    local = local.model_copy(update={"warm_start": [str(other.run_dir)]})
    assert [e.first for e in plan_warm_start(local)] == [earlier.first]

    # the same configs: the earlier trials enter the study with their values, and none of them runs again
    overrides = {
        **common,
        "name": "second",
        "searcher": "gp",
        "warm_start": [str(first.run_dir)],
        "confirm": {"top": 2, "seeds": 1, "steps": 24},
        "report_dir": str(tmp_path / "r-second"),
    }
    assert main(["search", str(SMOKE), *(f"{k}={json.dumps(v)}" for k, v in overrides.items()), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert (
        "warm start: " in dry
        and "4 trials enter the study with their values and rank with this search's (same configs)" in dry
    )
    assert "confirm: the best 2 re-run with 1 other seeds and once at 24 steps after the search: 4 more trials" in dry
    second = fika.search.run(SMOKE, overrides)
    study = load_study(second.run_dir, "second")
    reused = [t for t in study.trials if t.user_attrs.get("fika_warm_start") == str(first.run_dir)]
    assert len(reused) == 4 and {t.state.name for t in reused} <= {"COMPLETE", "PRUNED"}
    assert all(t.number < 4 for t in reused)  # in the study before the first new trial was drawn
    ran = [d["trial"] for d in draws(second.run_dir)]
    assert len(ran) == 4 and len(study.trials) == 8  # one study trial per trial folder, plus the reused ones
    earlier = {config_of(first.run_dir, d["trial"]) for d in first_draws}
    assert not {config_of(second.run_dir, t) for t in ran} & earlier  # no configuration ran twice
    assert {d["drawn"] for d in draws(second.run_dir)} <= {"gp", "random", "untried"}
    report = (tmp_path / "r-second" / "index.md").read_text()
    assert "Warm start: 4 trials of" in report and "entered the study with their values" in report
    assert "they rank with this search's own trials, marked `reused from" in report
    # the reused trials rank with this search's own, read from the earlier folder, marked with where they came from
    ranking = second.ranking
    reused = ranking[ranking["from"] != ""]
    assert set(reused["trial"]) == {d["trial"] for d in first_draws} and len(ranking) == 8
    assert set(reused["from"]) == {os.path.relpath(first.run_dir, second.run_dir)}
    assert list(ranking["rank"]) == list(range(1, 9)) and "4 trials: " in report
    assert sum("reused from " in line for line in report.splitlines() if line.startswith("| ")) == 4  # status
    notes = [line for line in report.splitlines() if line.startswith("> ")]
    assert notes[0].startswith("> Decision: ") and "paired over 2 seeds and the held-out conversations" in notes[0]
    assert (
        "## Seeds: re-runs of the top trials" in report
        and "## Horizon: does the 12-step order hold at 24 steps?" in report
    )
    reruns = list((second.run_dir / "trials").glob("*-seed*"))
    assert len(reruns) == 4  # the confirm re-runs, in the same run, of the best 2 of the ranking (reused ones too)
    assert {path.name.split("-seed")[0] for path in reruns} == set(ranking["trial"][:2])
    shutil.move(first.run_dir, tmp_path / "moved")  # an earlier search's folder gone: its trials are not ranked
    moved = fika.search.load(second.run_dir, tmp_path / "r-moved")
    assert list(moved.ranking["trial"]) == [t for t in ranking["trial"] if t not in set(reused["trial"])]
    fika.search.build_report(second.run_dir, tmp_path / "r-moved")
    assert (
        "its folder cannot be read any more, so they are not ranked" in (tmp_path / "r-moved" / "index.md").read_text()
    )

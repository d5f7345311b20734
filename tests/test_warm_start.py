"""Fewer trials to the same decision: warm starts from earlier searches, the GP sampler, and a spec's `confirm:`
re-runs that end in a decision. Real searches on the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

import fika.search
from fika.cli import main
from fika.search.warm_start import plan_warm_start

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


def test_a_warm_start_reuses_values_of_the_same_configs_and_reruns_the_best_of_another_model(
    tmp_path, tiny_copy, capsys
):
    common = {"storage": str(tmp_path), "num_samples": 4}
    other = fika.search.run(
        SMOKE, {**common, "name": "other", "base.model.name": str(tiny_copy), "report_dir": str(tmp_path / "r-other")}
    )
    # another model: none of its values enter the study; its best 3 configurations run first
    first = fika.search.run(
        SMOKE, {**common, "name": "first", "warm_start": [str(other.run_dir)], "report_dir": str(tmp_path / "r-first")}
    )
    first_draws = draws(first.run_dir)
    assert [d["drawn"] for d in first_draws[:3]] == ["warm"] * 3
    best_other = list(other.ranking[other.ranking["status"].isin(["completed", "pruned"])]["trial"])[:3]
    assert sorted(config_of(first.run_dir, d["trial"]).replace("tiny", "") for d in first_draws[:3]) == sorted(
        config_of(other.run_dir, t).replace(str(tiny_copy), "") for t in best_other
    )  # the same values of every key, on this search's model
    study = load_study(first.run_dir, "first")
    assert len(study.trials) == len(first.ranking) == 4  # no values of the other model's trials
    report = (tmp_path / "r-first" / "index.md").read_text()
    assert f"differs (model.name '{tiny_copy}' -> 'tiny')" in report and "best 3 configurations ran first" in report
    # as many as the search's start-up draws: the local searcher's 2 of 12 trials
    local = fika.search.api.resolved_spec(SMOKE, {**common, "name": "local", "searcher": "local", "num_samples": 12})
    local = local.model_copy(update={"warm_start": [str(other.run_dir)]})
    assert [len(e.first) for e in plan_warm_start(local)] == [local.startup()] == [2]

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
    assert "warm start: " in dry and "4 trials enter the study with their values (same configs)" in dry
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
    notes = [line for line in report.splitlines() if line.startswith("> ")]
    assert notes[0].startswith("> Decision: ") and "paired over 2 seeds and the held-out conversations" in notes[0]
    assert (
        "## Seeds: re-runs of the top trials" in report
        and "## Horizon: does the 12-step order hold at 24 steps?" in report
    )
    assert len(list((second.run_dir / "trials").glob("*-seed*"))) == 4  # the confirm re-runs, in the same run

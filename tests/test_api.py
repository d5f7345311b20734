"""The Python API a notebook uses: fika.train, fika.data_mix, fika.search.run / load / dry_run, with the same
validation and the same one-line errors as the command line (raised as fika.FikaError, never an exit)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

import fika
import fika.search
from fika.cli import main

SMOKE = Path(__file__).resolve().parents[1] / "search" / "specs" / "smoke.yaml"
TINY = {
    "model.name": "tiny",
    "train.max_steps": 8,
    "train.warmup_steps": 1,
    "train.learning_rate": 5e-3,
    "data.sources.0.limit": 200,
    "data.eval_size": 8,
}


def cli_error(capsys, args: list[str]) -> str:
    """The one line `fika` prints for a bad input, without its `fika COMMAND: error: ` prefix."""
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0].split(": error: ", 1)[1]


def test_train_from_python_returns_the_result_and_the_adapter(tmp_path):
    result = fika.train(overrides=TINY, output_dir=tmp_path / "run")
    assert result.status == "completed" and result.steps == 8
    assert math.isfinite(result.eval_loss) and result.eval_losses[8] == result.eval_loss
    assert (Path(result.adapter_dir) / "adapter_config.json").exists()
    # the resolved config the run wrote, as a mapping, with a list of the command line's overrides: the same run
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    again = fika.train(config, ["train.seed=3407", "data.sources.0.limit=200"], tmp_path / "again")
    assert again.status == "completed" and again.eval_loss == pytest.approx(result.eval_loss, abs=1e-6)
    # a list override into a section the config lacks edits the default list
    bare = fika.train(
        {"model": {"name": "tiny"}, "train": {"max_steps": 2, "warmup_steps": 0}},
        {"data.sources.0.limit": 100, "data.eval_size": 4, "model.max_seq_length": 128},
        tmp_path / "bare",
    )
    assert bare.status == "completed"
    assert yaml.safe_load((tmp_path / "bare" / "config.yaml").read_text())["data"]["sources"][0]["limit"] == 100
    mix = fika.data_mix(overrides=TINY)
    assert mix.summary()["eval_rows"] == 8 and len(mix.train) > 0


@pytest.mark.parametrize(
    "overrides, args",
    [
        ({"lora.r": 0}, ["lora.r=0"]),
        (["train.lr_scheduler=sine"], ["train.lr_scheduler=sine"]),
        ({"train.nope": 1}, ["train.nope=1"]),
    ],
)
def test_a_bad_config_raises_the_line_the_cli_prints(capsys, tmp_path, overrides, args):
    line = cli_error(capsys, ["train", *args, f"output.dir={tmp_path / 'x'}"])
    with pytest.raises(fika.FikaError) as raised:
        fika.train(overrides=overrides, output_dir=tmp_path / "x")
    assert str(raised.value) == line
    assert not (tmp_path / "x").exists()


def test_a_bad_spec_raises_the_line_the_cli_prints(capsys, tmp_path):
    line = cli_error(capsys, ["search", str(SMOKE), "num_samples=0", f"storage={tmp_path}"])
    with pytest.raises(fika.FikaError) as raised:
        fika.search.run(SMOKE, {"num_samples": 0, "storage": str(tmp_path)})
    assert str(raised.value) == line and "num_samples" in line
    assert "optuna searcher, 3 trials" in fika.search.dry_run("smoke", ["num_samples=3"])


def test_a_search_from_python_gives_its_ranking_as_a_dataframe(tmp_path):
    overrides = {"num_samples": 3, "storage": str(tmp_path), "report_dir": str(tmp_path / "report")}
    result = fika.search.run(SMOKE, overrides)
    assert result.state == "finished" and result.run_dir == tmp_path / "smoke"
    ranking = result.ranking
    assert isinstance(ranking, pd.DataFrame) and len(ranking) == 3
    assert list(ranking["rank"]) == [1, 2, 3] and "param:train.learning_rate" in ranking.columns
    written = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert list(written["trial"]) == list(ranking["trial"])  # the report's order
    completed = ranking[ranking["status"] == "completed"]
    assert result.best_trial == completed.iloc[0]["trial"] and result.best_metric == completed.iloc[0]["metric"]
    assert result.best_config["model"]["name"] == "tiny"
    loaded = fika.search.load(result.run_dir)
    assert loaded.state == "finished" and loaded.ranking.equals(ranking) and loaded.best_config == result.best_config
    # the best config runs as is
    best = fika.train(result.best_config, output_dir=tmp_path / "best")
    assert best.status == "completed" and best.eval_loss == pytest.approx(result.best_metric, abs=1e-4)

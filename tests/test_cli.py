"""The `fika` command: help for every subcommand, `fika data` output, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from fika.cli import build_parser, main


def subcommands() -> list[str]:
    parser = build_parser()
    return list(parser._subparsers._group_actions[0].choices)  # noqa: SLF001


@pytest.mark.parametrize("command", subcommands())
def test_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert command in capsys.readouterr().out


def write_config(tmp_path, data_files, **data) -> str:
    config = {
        "model": {"name": "tiny", "max_seq_length": 256},
        "data": {
            "sources": [{"path": str(data_files["finetome"])}, {"path": str(data_files["ultrachat"]), "limit": 2}],
            "eval_size": 2,
            **data,
        },
    }
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_data_prints_counts_per_source_and_masked_examples(tmp_path, data_files, capsys):
    assert main(["data", "--config", write_config(tmp_path, data_files), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "finetome.parquet" in out and "ultrachat_train_sft.jsonl" in out and "total" in out
    assert "--- example 0 (trained-on tokens in [[ ]]) ---" in out
    assert "<|im_start|>assistant\n[[" in out and "<|im_end|>]]" in out


def test_data_json_is_machine_readable(tmp_path, data_files, capsys):
    assert main(["data", "--config", write_config(tmp_path, data_files), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["eval"] + s["train"] for s in summary["sources"]] == [4, 3]  # the limit counts training rows
    assert summary["train_rows"] + summary["eval_rows"] == 7 and summary["eval_per_source"] == {
        "finetome": 1,
        "ultrachat_train_sft": 1,
    }


@pytest.mark.slow
def test_data_on_the_embedded_default_runs_offline(capsys, monkeypatch):
    """The built-in ShareGPT data through the built-in SmolLM2 tokenizer, with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["data", "--json", "data.sources.0.limit=300", "data.eval_size=16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (source,) = summary["sources"]
    assert source["format"] == "sharegpt" and source["eval"] == 16 and source["train"] + source["unused"] <= 300
    assert source["rows_in"] == sum(source["dropped"].values()) + source["eval"] + source["train"] + source["unused"]
    assert summary["eval_rows"] == 16 and summary["train_rows"] == source["train"]


def test_console_script_runs_as_a_process(tmp_path, data_files):
    cfg = write_config(tmp_path, data_files)
    done = subprocess.run(
        [sys.executable, "-m", "fika.cli", "data", "--config", cfg, "data.sources.0.limit=-3"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "fika data: error: data.sources.0.limit: -3 is not allowed: input should be greater than or equal to 0"
    )


def test_dry_runs_validate_and_estimate_memory(capsys):
    assert main(["train", "model.name=tiny", "--dry-run"]) == 0
    assert "config valid; memory: " in capsys.readouterr().out
    assert main(["search", "smoke", "--dry-run"]) == 0  # a shipped spec, found by its name
    out = capsys.readouterr().out
    assert (
        "search smoke: optuna searcher, 8 trials, 3 drawn at random before TPE" in out
        and "memory of the largest" in out
    )

"""TrialConfig: notebook defaults, dotted overrides, one clear line per bad value, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fika.config import DEFAULT_CONFIG, ConfigError, TrialConfig, apply_overrides, dump_config, load_config
from fika.observe import eval_schedule

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_unsloth_notebook():
    c = TrialConfig()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (16, 16, 0.0, "all-linear")
    t = c.train
    assert (t.batch_size, t.gradient_accumulation, t.warmup_steps, t.max_steps) == (2, 4, 5, 60)
    assert (t.learning_rate, t.lr_scheduler, t.weight_decay, t.optimizer, t.seed) == (
        2e-4,
        "linear",
        0.01,
        "adamw_8bit",
        3407,
    )
    assert t.assistant_only_loss and eval_schedule(c, t.max_steps) == {20, 40, 60}
    assert c.model.max_seq_length == 2048 and c.model.load_in_4bit == "auto" and not c.model.trust_remote_code


def test_overrides_and_yaml_numbers():
    c = load_config(
        None, ["lora.r=32", "train.learning_rate=5e-4", "train.lr_scheduler=cosine", "data.sources.0.limit=10"]
    )
    assert c.lora.r == 32 and c.train.learning_rate == 5e-4 and c.train.lr_scheduler == "cosine"
    assert c.data.sources[0].limit == 10
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "x.y=true"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "x": {"y": True},
    }


def test_tied_alpha_follows_r():
    assert load_config(None, ["lora.r=32", "lora.alpha_ratio=2"]).lora.alpha == 64
    assert load_config(None, ["lora.r=8", "lora.alpha=8", "lora.alpha_ratio=0.5"]).lora.alpha == 4
    assert load_config(None, ["lora.r=8", "lora.alpha=32"]).lora.alpha == 32  # free alpha


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=0", "train.learning_rate: 0 is not allowed: input should be greater than 0"),
        ("train.learning_rate=-0.0001", "train.learning_rate: -0.0001 is not allowed"),
        ("lora.r=0", "lora.r: 0 is not allowed: input should be greater than 0"),
        ("lora.dropout=1", "lora.dropout: 1 is not allowed: input should be less than 1"),
        ("train.lr_scheduler=step", "train.lr_scheduler: 'step' is not allowed: input should be 'linear', 'cosine'"),
        ("train.gradient_accumulation=0", "train.gradient_accumulation: 0 is not allowed"),
        ("lora.r=abc", "lora.r: 'abc' is not allowed: input should be a valid integer"),
        ("train.lr=1e-4", r"train.lr: unknown key \(allowed here: learning_rate, lr_scheduler"),
        ("optimizer.name=adam", r"optimizer: unknown key \(allowed here: model, lora, train, data, output\)"),
        ("train.max_steps=0", "train.max_steps: 0 is not allowed: give a positive step count, or -1"),
        ("train.eval_steps=[0, 60]", r"train.eval_steps: \[0, 60\] is not allowed: eval steps must be positive"),
        ("train.num_cycles=0", "train.num_cycles: 0 is not allowed"),
        ("model.chat_template=alpaca", "model.chat_template: 'alpaca' is not allowed"),
    ],
)
def test_bad_values_are_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert len(str(err.value).splitlines()) == 1, str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def test_weights_for_all_sources_or_none():
    with pytest.raises(ConfigError, match="give a weight to every source or to none"):
        load_config(None, ["data.sources=[{path: a.jsonl, weight: 1}, {path: b.jsonl}]"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["lora.alpha_ratio=2", "lora.r=8", "train.lr_scheduler=cosine_with_restarts"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def shipped_configs() -> list[Path]:
    return [DEFAULT_CONFIG, *sorted((REPO / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_says_how_to_run_it(path):
    load_config(path)
    assert path.read_text().startswith("#") and "fika " in path.read_text().splitlines()[1]

"""Shared fixtures: a private fika cache, and small data files in each hub dataset's own schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# No test may reach a hub: models and data come from packages or are built by the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A few rows per schema, with realistic content and the mess real dumps have (unknown roles, empty turns).
FINETOME_ROWS = [
    {
        "conversations": [
            {"from": "human", "value": "Explain what a hash table is in two sentences."},
            {
                "from": "gpt",
                "value": "A hash table maps keys to values by hashing each key to a bucket index. "
                "Lookups, inserts and deletes take constant time on average.",
            },
        ],
        "source": "infini-instruct-top-500k",
        "score": 5.06,
    },
    {
        "conversations": [
            {"from": "system", "value": "You are a patient math tutor."},
            {"from": "human", "value": "Why is the derivative of x^2 equal to 2x?"},
            {"from": "gpt", "value": "Take (x+h)^2 - x^2 = 2xh + h^2, divide by h and let h go to 0: you get 2x."},
            {"from": "human", "value": "And of x^3?"},
            {"from": "gpt", "value": "The same steps give 3x^2."},
        ],
        "source": "WebInstructSub_axolotl",
        "score": 4.92,
    },
    {
        "conversations": [
            {"from": "human", "value": "Name three noble gases."},
            {"from": "gpt", "value": "Helium, neon and argon."},
        ],
        "source": "infini-instruct-top-500k",
        "score": 4.7,
    },
    {
        "conversations": [
            {"from": "human", "value": "Translate 'good morning' into French."},
            {"from": "gpt", "value": "Bonjour."},
        ],
        "source": "flan",
        "score": 4.55,
    },
]

SHAREGPT_ENGLISH_ROWS = [
    {
        "conversations": [
            {"user": "human", "text": "What is the capital of Australia?"},
            {"user": "gpt", "text": "Canberra. Many people guess Sydney, but Canberra was chosen as a compromise."},
        ],
        "lang": "en",
    },
    {
        "conversations": [
            {"user": "human", "text": "Write a haiku about autumn."},
            {
                "user": "gpt",
                "text": "Red leaves drift and fall\ncool wind hums through empty trees\nthe year exhales slow",
            },
        ],
        "lang": "en",
    },
    {
        "conversations": [
            {"user": "human", "text": "How do I reverse a list in Python?"},
            {"user": "gpt", "text": "Use `items.reverse()` in place, or `items[::-1]` for a reversed copy."},
        ],
        "lang": "en",
    },
]

ULTRACHAT_ROWS = [
    {
        "prompt": "How does photosynthesis store energy?",
        "prompt_id": "a1",
        "messages": [
            {"role": "user", "content": "How does photosynthesis store energy?"},
            {"role": "assistant", "content": "Light drives the synthesis of ATP and NADPH, which fix CO2 into sugars."},
            {"role": "user", "content": "Where does that happen?"},
            {
                "role": "assistant",
                "content": "In the chloroplasts: the light reactions in the thylakoids, the Calvin cycle in the stroma.",
            },
        ],
    },
    {
        "prompt": "Give me a tip for better sleep.",
        "prompt_id": "a2",
        "messages": [
            {"role": "user", "content": "Give me a tip for better sleep."},
            {"role": "assistant", "content": "Keep a fixed wake-up time, even on weekends."},
        ],
    },
    {
        "prompt": "What is 17 * 3?",
        "prompt_id": "a3",
        "messages": [
            {"role": "user", "content": "What is 17 * 3?"},
            {"role": "assistant", "content": "51."},
        ],
    },
]

# One row per drop reason (and two repairable rows), in ShareGPT V3's own schema.
MESSY_SHAREGPT_ROWS = [
    {
        "id": "ok1",
        "conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello, how can I help?"}],
    },
    {
        "id": "dup",
        "conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello, how can I help?"}],
    },
    {"id": "empty", "conversations": []},
    {"id": "blank", "conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": ""}]},
    {"id": "noasst", "conversations": [{"from": "human", "value": "Is anyone there?"}]},
    {"id": "role", "conversations": [{"from": "tool", "value": "42"}, {"from": "gpt", "value": "The answer is 42."}]},
    {
        "id": "repair",
        "conversations": [
            {"from": "gpt", "value": "(a greeting left over from an earlier chat)"},
            {"from": "human", "value": "Tell me a joke."},
            {"from": "human", "value": "A short one."},
            {"from": "bard", "value": "Why did the scarecrow win an award? He was outstanding in his field."},
            {"from": "human", "value": "Another?"},
        ],
    },
    {"id": "long", "conversations": [{"from": "human", "value": "word " * 400}, {"from": "chatgpt", "value": "ok"}]},
    {"id": "ok2", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "chatgpt", "value": "4"}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True, scope="session")
def fika_cache(tmp_path_factory):
    """One private cache per test session (the built-in SmolLM2 is converted at most once)."""
    path = tmp_path_factory.mktemp("fika-cache")
    old = os.environ.get("FIKA_CACHE")
    os.environ["FIKA_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["FIKA_CACHE"]
    else:
        os.environ["FIKA_CACHE"] = old


@pytest.fixture
def data_files(tmp_path) -> dict[str, Path]:
    """The fixture rows written as the hub ships them: FineTome as parquet, the others as JSON lines."""
    import pandas as pd

    finetome = tmp_path / "finetome.parquet"
    pd.DataFrame(FINETOME_ROWS).to_parquet(finetome)
    return {
        "finetome": finetome,
        "sharegpt_english": write_jsonl(tmp_path / "sharegpt_english.jsonl", SHAREGPT_ENGLISH_ROWS),
        "ultrachat": write_jsonl(tmp_path / "ultrachat_train_sft.jsonl", ULTRACHAT_ROWS),
        "messy": write_jsonl(tmp_path / "messy_sharegpt.jsonl", MESSY_SHAREGPT_ROWS),
    }


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fika.config import ModelConfig
    from fika.model import load_tokenizer

    return load_tokenizer(ModelConfig(name="tiny"))


SMOKE_SPEC = Path(__file__).resolve().parents[1] / "search" / "specs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory):
    """A real smoke search, then the confirm commands its report prints (seeds and horizon), and its report."""
    import re
    import shlex

    import ray

    from fika.cli import main

    tmp = tmp_path_factory.mktemp("report")
    cwd = os.getcwd()
    os.chdir(tmp)  # as a user runs it: the report prints paths relative to here, and its commands run from here
    try:
        assert main(["search", str(SMOKE_SPEC), f"storage={tmp}", f"report_dir={tmp / 'report'}"]) == 0
        assert not ray.is_initialized()  # the search shut down the Ray it started
        printed = re.findall(r"`(fika confirm [^`]+)`", (tmp / "report" / "index.md").read_text())
        assert len(printed) == 2
        for command in printed:  # as printed, only made smaller: 2 trials, 2 seeds, 24 steps
            args = shlex.split(command)[1:]
            assert args[1] == "smoke"  # relative to where the search ran
            for flag, value in (("--top", "3"), ("--steps", "24")):
                if flag in args:
                    args[args.index(flag) + 1] = value
            if "--steps" not in args:
                args[args.index("--seeds") + 1] = "2"
            assert main(args) == 0
    finally:
        ray.shutdown()
        os.chdir(cwd)
    return tmp / "smoke", tmp / "report"


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory) -> Path:
    """A real adapter from `fika train` on the tiny model."""
    from fika.cli import main

    out = tmp_path_factory.mktemp("adapter") / "run"
    assert (
        main(
            [
                "train",
                "model.name=tiny",
                "train.max_steps=10",
                "train.learning_rate=5e-3",
                "data.sources.0.limit=300",
                "data.eval_size=16",
                f"output.dir={out}",
            ]
        )
        == 0
    )
    return out / "adapter"

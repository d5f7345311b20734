"""A data-centric search on a CPU: three local files in the three hub schemas, a weight (0 allowed), a limit and
a filter searched with the learning rate; one eval set for every trial, each source tokenized once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from fika.cli import main

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "tests" / "data" / "data-mix-cpu.yaml"


def test_a_data_mix_search_scores_every_trial_on_one_eval_set(tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(REPO)  # the spec's data paths are relative to the repository; the run records them absolute
    monkeypatch.setenv("FIKA_CACHE", str(tmp_path / "cache"))  # a fresh cache: count what is tokenized
    try:
        # FIFO: every trial runs to its final eval (which trials ASHA keeps depends on the order they reach the rung)
        args = [
            "search",
            str(SPEC),
            f"storage={tmp_path}",
            f"report_dir={tmp_path / 'report'}",
            "scheduler={kind: fifo}",
        ]
        assert main(args) == 0
    finally:
        ray.shutdown()
    run, report = tmp_path / "data-mix-cpu", tmp_path / "report"
    trials = sorted(p for p in (run / "trials").iterdir() if (p / "evals.jsonl").read_text().strip())
    assert len(trials) == 8
    ids = {tuple(json.loads(line)["ids"]) for t in trials for line in (t / "evals.jsonl").read_text().splitlines()}
    assert len(ids) == 1 and len(next(iter(ids))) == 24  # the same 24 conversations for every trial and eval
    sources = [json.loads(line)["sources"] for line in (trials[0] / "evals.jsonl").read_text().splitlines()][0]
    assert {s: sources.count(s) for s in set(sources)} == {"finetome": 8, "sharegpt_english": 8, "ultrachat": 8}

    builds = [
        json.loads(line)["path"] for line in (tmp_path / "cache" / "data" / "builds.log").read_text().splitlines()
    ]
    assert sorted(builds) == sorted(
        str(REPO / "tests" / "data" / f"{n}.jsonl") for n in ("finetome", "sharegpt_english", "ultrachat_train_sft")
    )

    data = {t.name: json.loads((t / "data.json").read_text()) for t in (run / "trials").iterdir()}
    for trial, summary in data.items():
        config = yaml.safe_load((run / "trials" / trial / "config.yaml").read_text())
        rows = {s["name"]: s["train"] for s in summary["sources"]}
        weight = config["data"]["sources"][2]["weight"]
        assert (rows["ultrachat"] == 0) == (weight == 0), (trial, rows, weight)  # weight 0: left out of training
        assert rows["finetome"] <= config["data"]["sources"][0]["limit"]
    md = (report / "index.md").read_text()
    assert "## Data: rows and tokens per source, eval loss per source" in md
    assert "ultrachat rows" in md and "eval finetome" in md and "finetome 8; sharegpt_english 8; ultrachat 8" in md
    assert (report / "slice.png").exists()  # Optuna's slices, data keys included
    best = yaml.safe_load((report / "best.yaml").read_text())
    winner = pd.read_csv(report / "trials.csv").iloc[0]
    assert best["data"]["sources"][2]["weight"] == json.loads(winner["config"])["data"]["sources"][2]["weight"]
    monkeypatch.chdir(tmp_path)  # best.yaml names the same files from any folder
    assert [s["path"] for s in best["data"]["sources"]] == [
        str(REPO / "tests" / "data" / f"{n}.jsonl") for n in ("finetome", "sharegpt_english", "ultrachat_train_sft")
    ]
    assert main(["train", "--config", str(report / "best.yaml"), "--dry-run"]) == 0


def test_the_data_mix_spec_validates_and_shows_the_rows_each_extreme_would_use(capsys):
    """The GPU data-mix spec (three hub datasets) is checked offline: every combination of its data keys, and the
    training rows per source at each corner of the space."""
    assert main(["search", str(REPO / "search" / "specs" / "data-mix.yaml"), "--address=auto", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "search data-mix: local searcher, 48 trials, 12 drawn at random (at the top learning rate and the largest "
        "rank) before a local search around the best" in out
    )
    corners = [line for line in out.splitlines() if line.startswith("  data.sources.")]
    assert len(corners) == 16  # weights and limits of the data keys, smallest and largest of each
    assert (
        "data.sources.finetome.weight=1, data.sources.sharegpt_english.weight=0, data.sources.ultrachat.weight=2, "
        "data.sources.ultrachat.limit=20000: at most finetome all (weight 1), sharegpt_english 0, ultrachat 20,000 "
        "(weight 2) training rows"
    ) in out

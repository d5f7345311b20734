"""Reports from a real smoke search: ranking, files, best.yaml reproduces its trial, partial and failed runs."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fika.cli import main
from fika.search.report import build_report

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search" / "specs" / "smoke.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ranking_matches_trials_csv_and_lists_every_trial_once(smoke_report):
    run, report = smoke_report
    table = pd.read_csv(report / "trials.csv")
    trial_dirs = {p.name for p in (run / "trials").iterdir() if not (p / "confirm.json").exists()}
    assert sorted(table["trial"]) == sorted(trial_dirs) and len(table) == 8
    assert list(table["rank"]) == list(range(1, 9))
    statuses = list(table["status"])
    assert statuses == sorted(statuses, key=["completed", "pruned"].index)  # completed first, then pruned
    completed = table[table["status"] == "completed"]
    assert list(completed["metric"]) == sorted(completed["metric"])
    pruned = table[table["status"] == "pruned"]
    assert list(pruned["steps"]) == sorted(pruned["steps"], reverse=True)
    assert table["baseline"].sum() == 1
    md = (report / "index.md").read_text()
    order = [md.index(f"| {trial} |") for trial in table["trial"]]
    assert order == sorted(order)  # the Markdown table is in the same order


def test_report_files_are_valid(smoke_report):
    _, report = smoke_report
    for name in ("curves.png", "params.png", "importance.png"):
        assert (report / name).read_bytes().startswith(PNG_MAGIC), name

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.images = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])

    page = Collect()
    page.feed((report / "index.html").read_text())
    assert page.tags.count("table") == 1 and page.tags.count("tr") == 9
    assert len(page.images) == 3
    import base64

    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC) for src in page.images)
    md = (report / "index.md").read_text()
    assert "## Seeds (re-runs of the top trials)" in md and "std" in md
    assert "![Loss curves](curves.png)" in md and "confirmation runs" in md


def test_best_yaml_reproduces_the_best_trial(smoke_report, tmp_path):
    run, report = smoke_report
    best = pd.read_csv(report / "trials.csv").iloc[0]
    text = (report / "best.yaml").read_text()
    assert text.startswith("# The best trial") and "train.max_steps=-1 train.epochs=3" in text.splitlines()[2]
    assert main(["train", "--config", str(report / "best.yaml"), f"output.dir={tmp_path}"]) == 0
    again = json.loads((tmp_path / "result.json").read_text())
    assert again["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-4)
    original = yaml.safe_load((run / "trials" / best["trial"] / "config.yaml").read_text())
    reproduced = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert {k: v for k, v in reproduced.items() if k != "output"} == {
        k: v for k, v in original.items() if k != "output"
    }


def test_report_of_a_running_search(smoke_report, tmp_path):
    run, _ = smoke_report
    partial = tmp_path / "smoke"
    shutil.copytree(run, partial)
    running = next(p for p in sorted((partial / "trials").iterdir()) if not (p / "confirm.json").exists())
    (running / "result.json").unlink()  # as while the trial still trains
    lines = (running / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    out = build_report(partial, tmp_path / "report")
    table = pd.read_csv(out / "trials.csv")
    row = table[table["trial"] == running.name].iloc[0]
    assert row["status"] == "running" and row["steps"] == 3
    assert "1 running" in (out / "index.md").read_text()


def test_report_lists_failed_trials_last_with_their_reason(tmp_path):
    import ray

    spec = yaml.safe_load(SMOKE.read_text())
    spec["space"] = {"model.name": {"choice": ["tiny", str(tmp_path / "no-such-model")]}}
    spec.update(searcher="grid", num_samples=1, max_failures=0, baseline=False)
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        assert main(["search", str(path), f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}"]) == 0
    finally:
        ray.shutdown()
    table = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert list(table["status"]) == ["completed", "failed"]
    assert "cannot load a tokenizer" in table["error"].iloc[1]
    assert "failed: " in (tmp_path / "report" / "index.md").read_text()

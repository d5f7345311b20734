"""Reports from a real smoke search: ranking, files, measured claims (paired intervals, seeds, horizon, rung
agreement, edges), best.yaml reproduces its trial, partial, killed and failed runs, and whose report it is."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fika.cli import main
from fika.errors import FikaError
from fika.files import read_json
from fika.folder_lock import LOCK_FILE
from fika.search.report import build_report
from fika.search.report.analysis import edge_values, paired_bootstrap, ranks, spearman
from fika.search.report.rows import TrialRow
from fika.search.report.sections import compute_lines
from fika.search.spec import Param

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_bootstrap_flags_a_real_difference_and_not_an_identical_pair():
    import numpy as np

    rng = np.random.default_rng(1)
    counts = rng.integers(20, 200, size=64).tolist()
    base = [c * (2.0 + rng.normal(0, 0.3)) for c in counts]  # per-token losses around 2 that vary by conversation
    better = [s - c * 0.05 for s, c in zip(base, counts, strict=True)]  # 0.05 lower on every conversation
    paired = paired_bootstrap(better, base, counts)
    assert paired.diff == pytest.approx(-0.05) and paired.significant and paired.high < 0
    same = paired_bootstrap(base, base, counts)
    assert same.diff == 0 and not same.significant
    noisy = [s + c * rng.normal(0, 0.3) for s, c in zip(base, counts, strict=True)]  # noise, no shift
    assert paired_bootstrap(noisy, base, counts).low < 0 < paired_bootstrap(noisy, base, counts).high
    assert (
        paired_bootstrap(better, base, counts, seed=3).text() == paired_bootstrap(better, base, counts, seed=3).text()
    )


def test_rank_correlation_and_edges():
    assert ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    space = {
        "train.learning_rate": Param(choice=[1e-4, 2e-4, 5e-4]),
        "lora.dropout": Param(choice=[0.0, 0.1]),
        "lora.r,lora.alpha": Param(choice=[[8, 8], [32, 64]]),
        "train.weight_decay": Param(uniform=[0.0, 0.1]),
    }
    notes = edge_values(
        space,
        {"train.learning_rate": 5e-4, "lora.dropout": 0.0, "lora.r,lora.alpha": [32, 64], "train.weight_decay": 0.097},
        {"dropout": 0},
    )
    assert notes == [
        "train.learning_rate = 0.0005 is the largest value searched: widen the space above it",
        "lora.r = 32 is the largest value searched: widen the space above it",
        "lora.alpha = 64 is the largest value searched: widen the space above it",
        "train.weight_decay = 0.097 is the largest value searched: widen the space above it",
    ]  # dropout 0 is its floor, not an edge to widen


def test_the_compute_line_splits_the_trials_time_and_counts_the_slots_they_left_idle():
    """Two trials of 100 s and 50 s wall (120 s of training steps, 10 s of evals) in a fit of 80 s on 2 slots: 160
    slot-seconds, 150 of them in a trial; 160 / 120 = 1.33x. A fit without an end (a killed driver) or without
    slots (a cluster) gives no slot figures."""
    rows = [
        TrialRow("a", {}, "completed", tokens_seen=700, wall_time_s=100.0, step_time_s=80.0, eval_time_s=10.0),
        TrialRow("b", {}, "pruned", tokens_seen=300, wall_time_s=50.0, step_time_s=40.0),
    ]
    fit = {"started_at": 1000.0, "ended_at": 1080.0, "slots": 2}
    compute, slots = compute_lines(rows, [fit])
    assert compute == (
        "- compute: 0.04 trial-hours, 1,000 tokens seen; 80% of it training steps, 7% evals, 13% a "
        "trial's start and end (model, trainer, saving)"
    )
    assert slots.startswith("- slots: 2 trials at a time, 0.04 slot-hours, 94% of them in a trial ")
    assert slots.endswith("slot time = 1.33x the training-step time")
    assert len(compute_lines(rows, [fit, {"started_at": 1100.0, "slots": 2}])) == 1  # killed: its end unknown
    assert len(compute_lines(rows, [{**fit, "slots": None}])) == 1
    assert compute_lines([], []) == ["- compute: 0.00 trial-hours, 0 tokens seen"]


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
    assert table["baseline"].sum() == 1 and (table["trainable_params"] > 0).all()
    md = (report / "index.md").read_text()
    order = [md.index(f"| {trial} |") for trial in table["trial"]]
    assert order == sorted(order)  # the Markdown table is in the same order


def test_the_train_loss_column_compares_every_trial_at_the_same_step(smoke_report):
    """Pruned trials stop at the rung: the column shows every trial's train loss at that step, not at its last."""
    run, report = smoke_report
    lines = (report / "index.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| rank |")).split(" | ")
    assert "train loss avg10 @6" in header  # ASHA's rung: the last step the pruned trials reached
    column = header.index("train loss avg10 @6")
    for trial in (p.name for p in (run / "trials").iterdir() if not (p / "confirm.json").exists()):
        cells = next(line for line in lines if f"| {trial} | " in line).split(" | ")
        records = [json.loads(x) for x in (run / "trials" / trial / "metrics.jsonl").read_text().splitlines()]
        at_rung = next(r["train_loss_smooth"] for r in records if r["step"] == 6)
        assert float(cells[column]) == pytest.approx(at_rung, abs=1e-4), trial


def test_the_report_measures_its_claims(smoke_report):
    """Paired intervals against the best, the seeds and horizon sections of the printed confirm commands, the
    rung agreement, the edge warnings, how every trial was drawn and where its time went."""
    run, report = smoke_report
    md = (report / "index.md").read_text()
    decision = next(line for line in md.splitlines() if line.startswith("> Decision: "))  # the first note
    assert "paired over 3 seeds and the held-out conversations, 95% intervals; seed spread (std)" in decision
    assert (" wins (" in decision) or ("cannot be told apart" in decision)
    assert "## Seeds: re-runs of the top trials" in md and "+/-" in md and "| vs the leader [95% CI] |" in md
    assert "## Horizon: does the 12-step order hold at 24 steps?" in md and "Spearman rho" in md
    assert "## What each searched key did" in md and (
        "made no measurable difference at 12 steps" in md or "beyond the eval noise (trials" in md
    )
    pruned = [line for line in md.splitlines() if line.startswith("| ") and line.rstrip().endswith("| pruned |")]
    assert ("; stopped early: " in md) == bool(pruned)  # the per-key lines count the trials ASHA stopped
    assert "## Rung agreement" in md and "rung 6 (train_loss_smooth) vs eval_loss at step 12" in md
    assert "Edge: " in md and "is the largest value searched: widen the space above it" in md
    assert "drawn: 1 baseline, " in md and " tpe" in md  # 3 start-up trials of 8: TPE drew the rest
    assert "Not drawn: fANOVA importances need at least 8 completed trials" in md
    fits = json.loads((run / "run.json").read_text())["fits"]  # the search's fit and the two confirms'
    assert len(fits) == 3 and all(f["ended_at"] > f["started_at"] and f["slots"] >= 1 for f in fits)
    assert "% of it training steps, " in md and "x the training-step time" in md
    header = next(line for line in md.splitlines() if line.startswith("| rank |"))
    assert "vs best [95% CI]" in header and "vs baseline" in header and "trainable" in header
    assert (report / "report.json").exists() and json.loads((report / "report.json").read_text())["best"]["trial"]


def test_report_files_are_valid_and_hold_no_machine_paths(smoke_report):
    run, report = smoke_report
    pictures = [
        "curves.png",
        "pareto.png",
        "history.png",
        "parallel.png",
        "slice.png",
        "intermediate.png",
    ]
    for name in pictures:
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
    assert page.tags.count("table") == 4  # ranking, seeds, horizon, data
    assert len(page.images) == len(pictures)
    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC) for src in page.images)
    body = [line for line in (report / "best.yaml").read_text().splitlines() if not line.startswith("#")]
    for name, text in (
        ("trials.csv", (report / "trials.csv").read_text()),
        ("report.json", (report / "report.json").read_text()),
        ("best.yaml", "\n".join(body)),
    ):
        assert "/tmp/" not in text, name  # paths relative to the run or the report; commands relative to the cwd
    configs = [json.loads(c) for c in pd.read_csv(report / "trials.csv")["config"]]
    assert all(c["output"]["dir"].startswith("trials/") for c in configs)


def test_best_yaml_reproduces_the_best_trial(smoke_report, tmp_path):
    run, report = smoke_report
    best = pd.read_csv(report / "trials.csv").iloc[0]
    text = (report / "best.yaml").read_text()
    assert text.startswith("# The best trial") and "train.num_evals=10 train.checkpoints=true" in text.splitlines()[2]
    assert main(["train", "--config", str(report / "best.yaml"), f"output.dir={tmp_path / 'again'}"]) == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-4)
    original = yaml.safe_load((run / "trials" / best["trial"] / "config.yaml").read_text())
    reproduced = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert {k: v for k, v in reproduced.items() if k != "output"} == {
        k: v for k, v in original.items() if k != "output"
    }


def test_report_of_a_running_and_of_a_killed_search(smoke_report, tmp_path):
    """A search whose driver still holds its folder is running; one whose driver is gone was interrupted, and its
    trials without a result say so (not `running`), with the command that continues it."""
    run, _ = smoke_report
    partial = tmp_path / "smoke"
    shutil.copytree(run, partial)
    info = json.loads((partial / "run.json").read_text())
    del info["finished_at"]
    (partial / "run.json").write_text(json.dumps(info))
    trials = sorted(p for p in (partial / "trials").iterdir() if not (p / "confirm.json").exists())
    running, cut = trials[0], trials[1]
    (running / "result.json").unlink()  # as while the trial still trains
    lines = (running / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    text = (cut / "metrics.jsonl").read_text()  # a writer killed mid-line, and a result.json cut short
    (cut / "metrics.jsonl").write_text(text[: len(text) - 17])
    (cut / "result.json").write_text((cut / "result.json").read_text()[:40])
    (cut / "evals.jsonl").write_text((cut / "evals.jsonl").read_text()[:-30])
    ended = len(trials) - 2

    def lock(pid: int) -> None:
        record = {"holder": "fika search smoke", "pid": pid, "host": socket.gethostname(), "since": time.time()}
        (partial / LOCK_FILE).write_text(json.dumps(record))

    lock(os.getpid())  # this process stands for the driver: alive
    out = build_report(partial, tmp_path / "report")
    table = pd.read_csv(out / "trials.csv")
    row = table[table["trial"] == running.name].iloc[0]
    assert row["status"] == "running" and row["steps"] == 3
    assert table[table["trial"] == cut.name].iloc[0]["status"] == "running"  # its result could not be read
    text = (out / "index.md").read_text()
    assert f"- {len(trials)} of 8 trials so far: " in text and "2 running" in text
    assert f"The search is still running: {ended} of 8 trials have ended, so this ranking is provisional." in text

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock(gone.pid)  # a driver killed with its trials: nothing runs the search any more
    out = build_report(partial, tmp_path / "report")
    table = pd.read_csv(out / "trials.csv")
    assert set(table[table["trial"].isin([running.name, cut.name])]["status"]) == {"interrupted"}
    text = (out / "index.md").read_text()
    assert "2 interrupted" in text and "running" not in text.split("## Ranking")[0].replace(str(tmp_path), "")
    assert f"The search was interrupted: {ended} of 8 trials ended" in text
    assert f"`fika search {partial / 'spec.yaml'} --resume` continues it" in text
    (partial / LOCK_FILE).unlink()  # no record of a driver at all
    assert "The search was interrupted" in (build_report(partial, tmp_path / "report") / "index.md").read_text()


def test_the_refresher_rebuilds_only_when_the_run_changed(smoke_report, tmp_path):
    """A search's report refresher skips a build when no file the report reads (run.json too) changed since the
    last one of at least its kind; a live build (a trial ended) draws the loss curves only, the final one every
    plot."""
    from fika.search.report.live import ReportRefresher

    run = tmp_path / "smoke"
    shutil.copytree(smoke_report[0], run)
    out = tmp_path / "report"
    refresh = ReportRefresher(run, out)
    generated, plots, pages = [], [], []
    steps = [
        (None, False),
        (None, False),
        (None, True),
        (None, False),
        ("draws.jsonl", False),
        ("result.json", False),
        ("run.json", True),
    ]
    for change, final in steps:
        if change == "draws.jsonl":
            with (run / "draws.jsonl").open("a") as f:
                f.write("\n")
        elif change == "run.json":  # a fit's end written after the last trial ended: the slot line needs it
            (run / "run.json").write_text((run / "run.json").read_text() + " ")
        elif change:
            result = sorted(run.glob("trials/*/result.json"))[0]
            result.write_text(result.read_text())  # the same bytes, written again: a new mtime
        refresh.final() if final else refresh()
        refresh.finish()
        generated.append(json.loads((out / "report.json").read_text())["generated_at"])
        plots.append(sorted(p.name for p in out.glob("*.png")))
        pages.append((out / "index.md").read_text())
    assert generated[1] == generated[0] and generated[3] == generated[2]  # nothing changed: not rebuilt
    assert len(set(generated)) == 5  # the final build after a live one of the same files is not skipped
    every_plot = smoke_report[1].glob("*.png")
    assert plots[0] == plots[5] == ["curves.png"] and plots[2] == plots[6] == sorted(p.name for p in every_plot)
    assert len(plots[2]) >= 4  # the smoke search draws the effects, the front and Optuna's views too
    assert "drawn when the search ends" in pages[5] and "Optimization history" not in pages[5]
    assert "Optimization history" in pages[6] and "drawn when the search ends" not in pages[6]
    (run / "run.json").write_text((run / "run.json").read_text() + " ")
    refresh()  # a live build, then the final one asked for while it runs (or folded into it)
    refresh.final()
    refresh.finish()
    assert sorted(p.name for p in out.glob("*.png")) == plots[2]


def test_a_report_folder_belongs_to_one_search(smoke_report, tmp_path):
    run, report = smoke_report
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (other / "run.json").write_text(json.dumps({"id": "another-search"}))
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    with pytest.raises(FikaError, match="holds the report of another search"):
        build_report(other, report)
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before  # nothing changed
    shutil.rmtree(run.parent / "gone", ignore_errors=True)
    gone = tmp_path / "report-of-a-gone-run"
    shutil.copytree(report, gone)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    report_json = json.loads((gone / "report.json").read_text())
    (gone / "report.json").write_text(json.dumps({**report_json, "run": "../no-such-run", "run_id": "old"}))
    build_report(moved, gone)  # its run folder is gone: replaced, with a line saying so
    assert json.loads((gone / "report.json").read_text())["run_id"] != "old"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(FikaError, match="is not a fika report"):
        build_report(run, foreign)


def test_fika_report_writes_where_the_user_says_not_where_the_run_says(smoke_report, tmp_path, monkeypatch):
    run, _ = smoke_report
    copy = tmp_path / "shared" / "smoke"
    shutil.copytree(run, copy)
    spec = yaml.safe_load((copy / "spec.yaml").read_text())
    spec["report_dir"] = str(tmp_path / "elsewhere")  # a shared run folder naming a place outside it
    (copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(copy)]) == 0
    assert (tmp_path / "reports" / "smoke" / "index.html").exists() and not (tmp_path / "elsewhere").exists()


def test_credentials_never_reach_a_report_or_a_space(smoke_report, tmp_path, tiny_adapter):
    run, _ = smoke_report
    copy = tmp_path / "smoke"
    shutil.copytree(run, copy)
    spec = yaml.safe_load((copy / "spec.yaml").read_text())
    spec["optuna_storage"] = "postgresql://fika:s3cret-pass@db.example.com:5432/studies"
    (copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = build_report(copy, tmp_path / "report")
    assert (
        main(
            ["space", "export", "--adapter", str(tiny_adapter), "--report", str(out), "--out", str(tmp_path / "space")]
        )
        == 0
    )
    for folder in (out, tmp_path / "space"):
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix != ".gguf":
                assert b"s3cret-pass" not in path.read_bytes(), path
    assert "postgresql://fika:***@db.example.com" in (out / "index.md").read_text()


def test_report_lists_failed_trials_last_with_their_reason(smoke_report, tmp_path):
    run, _ = smoke_report
    copy = tmp_path / "smoke"
    shutil.copytree(run, copy)
    victim = sorted(p for p in (copy / "trials").iterdir() if not (p / "confirm.json").exists())[0]
    result = json.loads((victim / "result.json").read_text())
    (victim / "result.json").write_text(
        json.dumps({**result, "status": "failed", "error": "RuntimeError: CUDA out of memory"})
    )
    table = pd.read_csv(build_report(copy, tmp_path / "report") / "trials.csv")
    assert table.iloc[-1]["trial"] == victim.name and table.iloc[-1]["status"] == "failed"
    assert "CUDA out of memory" in table.iloc[-1]["error"]
    assert (tmp_path / "report" / "best.yaml").exists()
    for trial in (copy / "trials").iterdir():  # a finished search in which no trial completed
        result = json.loads((trial / "result.json").read_text())
        (trial / "result.json").write_text(json.dumps({**result, "status": "failed", "error": "RuntimeError: no"}))
    text = (build_report(copy, tmp_path / "report") / "index.md").read_text()
    assert "No trial completed, so there is no best config" in text and "completed yet" not in text
    assert not (tmp_path / "report" / "best.yaml").exists()  # the earlier build's best config is gone


def test_a_second_driver_of_a_search_being_confirmed_is_refused(smoke_report, tmp_path, capsys):
    """While `fika confirm` holds a search's folder, a second `fika confirm` of it is refused with one line naming
    the first (its pid), starts no Ray and changes nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    run, _ = smoke_report
    copy = tmp_path / "smoke"
    shutil.copytree(run, copy)
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fika.cli",
            "confirm",
            str(copy),
            "--top",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "first"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while (read_json(copy / ".fika.lock") or {}).get("pid") != first.pid:
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the first confirm never took the folder"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)  # it holds the folder and does nothing more
    try:
        files = {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
        assert main(["confirm", str(copy), "--top", "2", "--seeds", "1", "--out", str(tmp_path / "second")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{copy} is in use by fika confirm (pid {first.pid} on " in err[0], err
        assert {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()} == files
        assert not ray.is_initialized() and not (tmp_path / "second").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

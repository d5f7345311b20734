"""A search's driver killed outright (SIGKILL to it, its Ray and its workers) at many moments of its life, from the
first line it prints to the last byte of its report, each time followed by the README's `fika search SPEC
--resume`: every trial runs to an end exactly once, the study holds exactly the trials that ran with their true
state, and the report counts them right. Never a state that needs the folder deleted.

One search is killed again and again (each `--resume` is itself killed at the next moment), so a resume of a
resumed search is tried as well; tests/driver_killer.py makes each kill land in its window."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .test_search import load_study, trial_results

REPO = Path(__file__).resolve().parents[1]
KILLER = Path(__file__).resolve().parent / "driver_killer.py"
SEARCH = ["search", str(REPO / "search" / "specs" / "smoke.yaml"), "num_samples=8"]

# Each moment: where the driver kills itself (driver_killer.py's plan). In the order of a search's life; a
# later moment is reached by the `--resume` of the search killed at the one before it.
MOMENTS = {
    "its checks passed (the run folder holds only its lock)": {
        "target": "fika.search.driver:preflight",
        "when": "after",
    },
    "Ray started, nothing written": {"target": "fika.search.ray_session:connect_ray", "when": "after"},
    "the data prepared, nothing written": {"target": "fika.search.driver:prepare_search_data", "when": "after"},
    "spec.yaml half-written": {"rename": "spec.yaml"},
    "spec.yaml written, run.json not": {"target": "fika.files:write_atomic", "when": "after", "nth": 1},
    "run.json written, no Tuner": {"target": "fika.search.driver:start_run_folder", "when": "after"},
    "tune/tuner.pkl written, no experiment state": {"target": "fika.search.driver:build_tuner", "when": "after"},
    "the fit recorded in run.json, Tune not started": {"target": "ray.tune.tuner:Tuner.fit", "when": "before"},
    "Tune saving its first state": {"target": "fika.search.searcher:FikaOptunaSearch.save", "when": "before"},
    "the first draw logged, its trial not started": {"target": "fika.files:append_line", "when": "after"},
    "fika's whole copy of Tune's state half-written": {"rename": "tune-state.pkl", "nth": 2},
    "a trial midway": {"target": "fika.search.progress:SearchProgress.on_trial_result", "when": "after", "nth": 5},
    "the study told of an ASHA stop, the trial not yet ended": {
        "target": "fika.search.searcher:tell_final",
        "when": "after",
        "called_with": "stopped",
    },
    "ASHA stopped a trial at its rung": {
        "target": "ray.tune.schedulers.async_hyperband:AsyncHyperBandScheduler.on_trial_result",
        "when": "after",
        "returns": "STOP",
    },
    "a trial ended, the study not told": {"target": "fika.search.searcher:tell_final", "when": "before"},
    "the study told of a trial's end": {"target": "fika.search.searcher:tell_final", "when": "after"},
    "a live report half-written": {"rename": "index.html"},
    "the fit ended, nothing settled": {"target": "fika.search.driver:settle", "when": "before"},
    "settled, not marked finished": {"target": "fika.search.driver:settle", "when": "after"},
    "finished, the final report not begun": {"target": "fika.search.ray_session:end_ray", "when": "before"},
    "the final report half-written": {"arm": "fika.search.report.live:ReportRefresher.final", "rename": "index.md"},
    "the final report written, its line not printed": {
        "target": "fika.search.report.live:ReportRefresher.finish",
        "when": "after",
    },
}


def drive(tmp_path: Path, plan: dict | None, resume: bool) -> subprocess.CompletedProcess:
    """One driver of the search, killed by `plan` (None: run to the end), in its own process group."""
    args = [*SEARCH, f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}", *(["--resume"] if resume else [])]
    command = (
        [sys.executable, str(KILLER), json.dumps(plan), *args] if plan else [sys.executable, "-m", "fika.cli", *args]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, start_new_session=True)


@pytest.mark.slow
def test_a_driver_killed_at_any_moment_resumes_to_every_trial_exactly_once(tmp_path):
    assert len(MOMENTS) >= 20
    run = tmp_path / "smoke"
    for i, (moment, plan) in enumerate(MOMENTS.items()):
        done = drive(tmp_path, plan, resume=i > 0)
        assert done.returncode == -9, (
            f"{moment}: not killed (rc {done.returncode})\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
        if i == 0:
            assert sorted(p.name for p in run.iterdir()) == [".fika.lock"]  # the bug this test was written for
    final = drive(tmp_path, None, resume=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "already finished" in final.stdout  # the last kill came after the search was marked finished

    results = trial_results(run)
    folders = sorted(p.name for p in (run / "trials").iterdir())
    assert sorted(results) == folders and len(folders) == 8, folders  # every trial ended, once: one folder each
    assert {r["status"] for r in results.values()} <= {"completed", "stopped", "failed"}
    configs = [
        json.dumps({k: yaml.safe_load((run / "trials" / t / "config.yaml").read_text())[k] for k in ("lora", "train")})
        for t, r in results.items()
        if r["status"] != "failed"
    ]
    assert len(set(configs)) == len(configs)  # no configuration ran twice
    study = load_study(run, "smoke")  # the study holds exactly the trials that ran, with what happened to them
    expected = {"completed": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL"}
    told = {t.user_attrs.get("tune_trial_id"): t.state.name for t in study.trials}
    trials = "\n".join(f"{t.number} {t.state.name} {t.user_attrs} {t.system_attrs}" for t in study.trials)
    assert told == {t: expected[r["status"]] for t, r in results.items()}, (
        f"{trials}\n{(run / 'draws.jsonl').read_text()}"
    )
    draws = {d["trial"] for d in map(json.loads, (run / "draws.jsonl").read_text().splitlines())}
    assert set(results) <= draws
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    counts = {
        s: sum(1 for r in results.values() if {"stopped": "pruned"}.get(r["status"], r["status"]) == s)
        for s in ("completed", "pruned", "failed")
    }
    assert {s: report["counts"][s] for s in counts} == counts
    summary = (tmp_path / "report" / "index.md").read_text()
    assert re.search(rf"- 8 trials: {counts['completed']} completed", summary), summary[:600]
    assert "finished_at" in json.loads((run / "run.json").read_text())

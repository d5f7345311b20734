"""Packed searches (`resources.pack` > 1) on the tiny model, in a real Ray Tune search: the solo search's trials,
numbers, ranking and study; ASHA stopping a member in the middle of a pack while a waiting trial takes its place.
A killed driver of a packed search resumes as a solo one does: tests/test_search.py."""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import pandas as pd
import yaml

from fika.cli import main
from fika.files import read_jsonl
from tests.test_search import SMOKE, load_study, spawn_search, trial_results, wait_for


def run_smoke(storage: Path, name: str, *overrides: str) -> Path:
    report = storage / f"{name}-report"
    args = ["search", str(SMOKE), f"name={name}", f"storage={storage}", f"report_dir={report}", *overrides]
    assert main(args) == 0
    return storage / name


def by_config(run: Path) -> dict[str, dict]:
    """Each trial's result, keyed by what it trained (its lora and train settings)."""
    keyed = {}
    for trial_id, result in trial_results(run).items():
        config = yaml.safe_load((run / "trials" / trial_id / "config.yaml").read_text())
        keyed[json.dumps({k: config[k] for k in ("lora", "train")}, sort_keys=True)] = {**result, "id": trial_id}
    return keyed


def test_a_packed_search_gives_the_solo_searchs_trials_numbers_ranking_and_study(tmp_path):
    # random draws only (start-up longer than the search) and FIFO: what runs does not depend on timing
    common = ["num_samples=6", "startup_trials=8", "scheduler={kind: fifo}"]
    solo = run_smoke(tmp_path, "solo", *common)
    packed = run_smoke(tmp_path, "packed", *common, "resources.pack=3")
    solo_trials, packed_trials = by_config(solo), by_config(packed)
    assert solo_trials.keys() == packed_trials.keys() and len(solo_trials) == 6
    for key, alone in solo_trials.items():
        together = packed_trials[key]
        assert alone.get("pack_size") is None and together["pack_size"] >= 1, together
        assert together["status"] == alone["status"] == "completed"
        assert abs(together["eval_loss"] - alone["eval_loss"]) < 1e-4, (together["eval_loss"], alone["eval_loss"])
        steps = [
            [r["train_loss"] for r in read_jsonl(run / "trials" / t["id"] / "metrics.jsonl")]
            for run, t in ((solo, alone), (packed, together))
        ]
        assert len(steps[0]) == len(steps[1]) == 12
        assert max(abs(a - b) for a, b in zip(*steps, strict=True)) < 1e-4
    ranks = [
        [by_id[t] for t in pd.read_csv(tmp_path / f"{name}-report" / "trials.csv")["trial"]]
        for name, by_id in (
            ("solo", {t["id"]: k for k, t in solo_trials.items()}),
            ("packed", {t["id"]: k for k, t in packed_trials.items()}),
        )
    ]
    assert ranks[0] == ranks[1]
    assert max(t["pack_size"] for t in packed_trials.values()) >= 2  # trials trained together
    assert "completed (pack of " in (tmp_path / "packed-report" / "index.md").read_text()
    studies = []
    for run, name in ((solo, "solo"), (packed, "packed")):
        studies.append(
            sorted((json.dumps(t.params, sort_keys=True), t.state.name, t.value) for t in load_study(run, name).trials)
        )
    assert [s[:2] for s in studies[0]] == [s[:2] for s in studies[1]]
    assert all(abs(a[2] - b[2]) < 1e-4 for a, b in zip(*studies, strict=True))


def test_asha_stops_a_member_mid_pack_and_a_waiting_trial_takes_its_place(tmp_path):
    # one pack of 2 on the machine's CPUs; 90 steps, rungs at 30 and 60
    run = run_smoke(
        tmp_path,
        "asha",
        "num_samples=8",
        "resources.cpu=2",
        "resources.pack=2",
        "base.train.max_steps=90",
        "scheduler.grace_period=30",
        "confirm={top: 1, seeds: 1}",  # and the best re-run with another seed, packed too
    )
    results = trial_results(run)
    assert len(results) == 8 and {r["status"] for r in results.values()} <= {"completed", "stopped"}, results
    stopped = [r for r in results.values() if r["status"] == "stopped"]
    assert stopped, results
    for trial_id, r in results.items():  # a stopped member trained no step past its rung
        last = [rec["step"] for rec in read_jsonl(run / "trials" / trial_id / "metrics.jsonl")][-1]
        assert last == r["steps"] == (90 if r["status"] == "completed" else r["steps"]) and r["steps"] in (30, 60, 90)
    assert max(r["pack_size"] for r in results.values()) == 2
    # a member left at its rung while another trained on, and a waiting trial joined that one's pack
    took_place = [
        (a, b, c)
        for a in stopped
        for b in results.values()
        for c in results.values()
        if b["started_at"] < a["ended_at"] < b["ended_at"] and a["ended_at"] <= c["started_at"] < b["ended_at"]
    ]
    assert took_place, sorted((r["started_at"], r["ended_at"], r["status"]) for r in results.values())
    (rerun,) = [p for p in (run / "trials").glob("*-seed*") if (p / "result.json").exists()]
    assert json.loads((rerun / "result.json").read_text())["status"] == "completed"
    decision = next(
        line for line in (tmp_path / "asha-report" / "index.md").read_text().splitlines() if "Decision" in line
    )
    assert "is the only completed trial re-run with other seeds (eval_loss " in decision, decision


def test_a_packed_search_on_declared_gpus_packs_the_trials_of_each_gpu(tmp_path):
    """A CPU machine declaring 2 GPUs, packs of 2: a trial holds half a GPU, and shares its pack with the trials of
    its own GPU only."""
    import ray

    from fika.search.driver import SearchHooks, run_search
    from fika.search.spec import load_spec

    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)
    try:
        overrides = ["resources.gpu=1", "resources.cpu=1", "resources.pack=2", "num_samples=6"]
        spec = load_spec(SMOKE, [f"storage={tmp_path}", *overrides, "scheduler={kind: fifo}"])
        run_search(spec, hooks=SearchHooks(log=lambda _: None))
    finally:
        ray.shutdown()
    rows = [json.loads(line) for p in (tmp_path / "smoke" / "tune").rglob("result.json") for line in p.open()]
    device = {row["trial_dir"]: row["cuda_visible_devices"] for row in rows}
    assert set(device.values()) == {"0", "1"}
    results = list(trial_results(tmp_path / "smoke").values())
    assert len(results) == 6 and all(r["status"] == "completed" for r in results)

    def overlap(a: dict, b: dict) -> bool:
        return a is not b and a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]

    on = {id(r): device[r["output_dir"]] for r in results}
    for trio in itertools.combinations(results, 3):  # never three at once on a GPU (a pack holds 2)
        together = all(overlap(a, b) for a, b in itertools.combinations(trio, 2))
        assert not (together and len({on[id(r)] for r in trio}) == 1), trio
    for a in results:  # a trial packed with another overlapped one on its own GPU
        if a["pack_size"] == 2:
            assert any(overlap(a, b) and on[id(b)] == on[id(a)] for b in results), a


def test_a_killed_pack_has_its_trials_retried_in_a_new_one(tmp_path):
    """SIGKILL to a pack's process mid-run: its members' trials fail, are retried in a new pack, and the search ends
    with every trial once."""
    args, process = spawn_search(
        tmp_path,
        "num_samples=4",
        "resources.cpu=2",
        "resources.pack=2",
        "base.train.max_steps=60",
        "scheduler={kind: fifo}",
        "max_failures=1",
    )
    run = tmp_path / "smoke"

    def packs() -> list[int]:
        import psutil

        children = psutil.Process(process.pid).children(recursive=True)
        return [c.pid for c in children if "ray::PackServer" in " ".join(c.cmdline())]

    def midway() -> bool:
        metrics = list((run / "trials").glob("*/metrics.jsonl")) if (run / "trials").exists() else []
        return any(len(p.read_text().splitlines()) > 30 for p in metrics) and bool(packs())

    wait_for(midway, process)
    (victim,) = packs()
    os.kill(victim, signal.SIGKILL)
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    results = trial_results(run)
    assert len(results) == 4 and all(r["status"] == "completed" for r in results.values()), results
    for trial_id in results:  # each ran to its end once, in the new pack (the folder holds one run)
        steps = [r["step"] for r in read_jsonl(run / "trials" / trial_id / "metrics.jsonl")]
        assert steps == list(range(1, 61)), trial_id
    assert "4/4 trials done" in output

"""Real Ray Tune searches on the tiny model: Optuna + ASHA, declared GPUs, several nodes, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fika.cli import main
from fika.search.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search" / "specs" / "smoke.yaml"


def trial_results(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "trials").glob("*/result.json"))]


def load_study(run: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(run / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture
def ray_shutdown():
    import ray

    yield
    ray.shutdown()


def test_smoke_search_runs_optuna_and_asha(tmp_path, ray_shutdown, capsys):
    assert main(["search", str(SMOKE), f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}"]) == 0
    run = tmp_path / "smoke"
    results = trial_results(run)
    assert len(results) == 8
    statuses = [r["status"] for r in results]
    assert "stopped" in statuses and "completed" in statuses  # ASHA pruned some, others ran to the end
    for r in results:
        assert "4" in r["eval_losses"]  # every trial reached the first rung
        if r["status"] == "completed":
            assert sorted(r["eval_losses"], key=int) == ["4", "8", "12"] and r["steps"] == 12
    study = load_study(run, "smoke")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8  # one per Tune trial (a repeated draw is told FAIL and replaced)
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 8  # no configuration ran twice
    assert study.best_value == pytest.approx(min(r["eval_loss"] for r in results))
    # the baseline (the base config's own values) ran first
    first = min(results, key=lambda r: r["started_at"])
    config = yaml.safe_load(Path(first["output_dir"], "config.yaml").read_text())
    assert config["train"]["learning_rate"] == 5e-3 and config["lora"]["r"] == 16 and config["lora"]["dropout"] == 0
    out = capsys.readouterr().out
    assert "8/8 trials done" in out and "best eval_loss" in out


def overlaps(results: list[dict]) -> int:
    """The most trials running at one moment."""
    events = sorted([(r["started_at"], 1) for r in results] + [(r["ended_at"], -1) for r in results])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_declared_gpus_give_each_trial_its_own_device(tmp_path, ray_shutdown):
    """A CPU machine declaring 2 GPUs: trials asking 1 GPU each see distinct devices, 2 at a time at most."""
    import ray

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
    spec = load_spec(
        SMOKE,
        [
            f"storage={tmp_path}",
            f"report_dir={tmp_path / 'report'}",
            "resources.gpu=1",
            "resources.cpu=1",
            "base.train.max_steps=24",
        ],
    )
    from fika.search.tuner import run_search

    grid = run_search(spec, log=lambda _: None)
    rows = [r.metrics for r in grid]
    assert len(rows) == 8 and {row["cuda_visible_devices"] for row in rows} == {"0", "1"}
    results = trial_results(tmp_path / "smoke")
    assert overlaps(results) <= 2
    by_dir = {row["trial_dir"]: row["cuda_visible_devices"] for row in rows}
    for a in results:
        for b in results:
            if a is not b and a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]:
                assert by_dir[a["output_dir"]] != by_dir[b["output_dir"]]


def test_search_on_a_multi_node_cluster(tmp_path, ray_shutdown):
    """A head and two worker nodes on this machine; trials are spread over the nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert (
            main(
                [
                    "search",
                    str(SMOKE),
                    f"storage={tmp_path}",
                    f"report_dir={tmp_path / 'report'}",
                    "--address",
                    cluster.address,
                ]
            )
            == 0
        )
        results = [
            json.loads(line)
            for p in (tmp_path / "smoke" / "tune").rglob("result.json")
            for line in p.read_text().splitlines()
        ]
        assert len({r["node"] for r in results}) == 2
        assert len(trial_results(tmp_path / "smoke")) == 8
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_an_interrupted_search_resumes_without_losing_or_repeating_trials(tmp_path):
    args = [
        sys.executable,
        "-m",
        "fika.cli",
        "search",
        str(SMOKE),
        f"storage={tmp_path}",
        f"report_dir={tmp_path / 'report'}",
        "base.train.max_steps=200",  # trials of a few seconds, so the driver dies while some run
        "scheduler.grace_period=50",
    ]
    env = dict(os.environ)
    driver = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    run = tmp_path / "smoke"
    deadline = time.time() + 240
    while len(trial_results(run)) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert driver.poll() is None, "the search ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)  # a killed driver: no chance to save anything more
    driver.wait()
    finished_before = {r["output_dir"]: r["ended_at"] for r in trial_results(run)}
    assert 2 <= len(finished_before) < 8

    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    results = trial_results(run)
    assert len(results) == 8, sorted(set(r["output_dir"] for r in results) - set(finished_before))
    assert all(r["status"] in ("completed", "stopped") for r in results)
    for r in results:  # a trial that had finished was not run again
        if r["output_dir"] in finished_before:
            assert r["ended_at"] == finished_before[r["output_dir"]]
    study = load_study(run, "smoke")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.lora.dropout.choice=[0.0]", None),
        ("spaces={}", r"spaces: unknown key \(allowed here: name, base, space"),
        (
            "space.lora.dropout.choice=[]",
            "space.lora.dropout.choice: \\[\\] is not allowed: list should have at least 1 item",
        ),
        (
            "space.train.learning_rate={loguniform: [0.001, 0.0001]}",
            "loguniform \\[0.001, 0.0001\\] is not allowed: low must be < high",
        ),
        ("space.train.learning_rate={loguniform: [0, 0.001]}", "low must be > 0"),
        ("resources.gpu=1", "resources.gpu: 1 is not allowed: this machine has no GPU"),
        ("metric=accuracy", "metric: 'accuracy' is not allowed: input should be 'eval_loss' or 'train_loss_smooth'"),
        (
            "space.lora.dropout.choice=[0.0, 1.5]",
            "space.lora.dropout: lora.dropout: 1.5 is not allowed: input should be less than 1",
        ),
        ("searcher=grid", None),
    ],
)
def test_bad_specs_fail_before_ray_starts(tmp_path, capsys, override, message):
    import ray

    if message is None:  # valid: a dry run prints the plan and starts nothing
        assert main(["search", str(SMOKE), override, "--dry-run"]) == 0
        assert "trials" in capsys.readouterr().out
    else:
        if override.startswith("resources.gpu"):
            pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has a GPU")
        assert main(["search", str(SMOKE), f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}", override]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not ray.is_initialized()
    assert not (tmp_path / "smoke" / "tune").exists()


def test_a_space_key_must_be_a_config_key(tmp_path, capsys):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["space"]["train.lr_sched"] = {"choice": ["linear"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["search", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "fika search: error: space.train.lr_sched: train.lr_sched: unknown key (allowed here: learning_rate"
    )


def test_dry_run_counts_the_grid(capsys):
    assert main(["search", str(SMOKE), "searcher=grid", "num_samples=1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid searcher, 108 trials" in out and "rungs at steps [4, 8]" in out


def test_every_shipped_spec_validates_and_says_how_to_run_it():
    for path in sorted((REPO / "search" / "specs").glob("*.yaml")):
        spec = load_spec(path)
        text = path.read_text()
        assert text.startswith("#") and f"fika search search/specs/{path.name}" in text, path
        assert spec.num_trials() >= 6

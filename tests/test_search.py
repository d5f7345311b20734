"""Real Ray Tune searches on the tiny model: Optuna + ASHA, the study's truth, declared GPUs, several nodes,
worker reuse, faults (a trial that raises, a killed worker, a killed driver) and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fika.cli import main
from fika.search.spec import SearchSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search" / "specs" / "smoke.yaml"


def trial_results(run: Path) -> dict[str, dict]:
    results = {}
    for path in sorted((run / "trials").glob("*/result.json")):
        if not (path.parent / "confirm.json").exists():
            results[path.parent.name] = json.loads(path.read_text())
    return results


def load_study(run: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(run / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def tune_results(run: Path) -> list[dict]:
    """Every result Ray Tune recorded (each carries where its trial ran)."""
    return [json.loads(line) for p in (run / "tune").rglob("result.json") for line in p.read_text().splitlines()]


@pytest.fixture
def ray_shutdown():
    import ray

    yield
    ray.shutdown()


def test_the_study_tells_what_the_report_shows(smoke_report):
    """ASHA-stopped trials are PRUNED with their rung values, completed ones COMPLETE; no draw runs twice."""
    run, report = smoke_report
    results = trial_results(run)
    assert len(results) == 8
    statuses = [r["status"] for r in results.values()]
    assert "stopped" in statuses and "completed" in statuses
    # each trial used its one CPU, also in a worker that imported torch before Ray gave it the trial (2 threads)
    assert {r["cpu_threads"] for r in results.values()} == {1}
    for r in results.values():
        if r["status"] == "completed":
            assert r["steps"] == 12 and sorted(r["eval_losses"], key=int) == ["12"]  # rungs decide on train loss
    study = load_study(run, "smoke")
    states = {t.user_attrs["tune_trial_id"]: t for t in study.trials if "tune_trial_id" in t.user_attrs}
    assert set(states) == set(results)
    for trial_id, r in results.items():
        trial = states[trial_id]
        assert trial.state.name == {"completed": "COMPLETE", "stopped": "PRUNED"}[r["status"]], trial_id
        if r["status"] == "stopped":
            assert (
                trial.intermediate_values and trial.value == trial.intermediate_values[max(trial.intermediate_values)]
            )
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    repeats = [t for t in study.trials if "fika_repeat_of" in t.user_attrs]
    assert all(t.state.name == "FAIL" for t in repeats)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == len(done) == 8
    import pandas as pd

    table = pd.read_csv(report / "trials.csv")
    assert (table["status"] == "completed").sum() == len([t for t in done if t.state.name == "COMPLETE"])
    assert (table["status"] == "pruned").sum() == len([t for t in done if t.state.name == "PRUNED"])
    draws = [json.loads(line) for line in (run / "draws.jsonl").read_text().splitlines()]
    kinds = [d["drawn"] for d in draws if d["trial"] in results]
    assert kinds[0] == "baseline" and "random" in kinds and "tpe" in kinds  # startup 3 of 8 trials
    baseline = next(d["trial"] for d in draws if d["drawn"] == "baseline")  # drawn first: the base config's values
    config = yaml.safe_load((run / "trials" / baseline / "config.yaml").read_text())
    assert config["train"]["learning_rate"] == 5e-3 and config["lora"]["r"] == 16 and config["lora"]["dropout"] == 0


def test_declared_gpus_give_each_trial_its_own_device(tmp_path, ray_shutdown):
    """A CPU machine declaring 2 GPUs: trials asking 1 GPU each see distinct devices, 2 at a time at most."""
    import ray

    from fika.search.driver import SearchHooks, run_search

    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)
    spec = load_spec(SMOKE, [f"storage={tmp_path}", "resources.gpu=1", "resources.cpu=1", "num_samples=6"])
    run_search(spec, hooks=SearchHooks(log=lambda _: None))
    assert ray.is_initialized()  # an instance the search did not start is left running
    rows = [r for r in tune_results(tmp_path / "smoke") if r.get("done")]
    assert len(rows) >= 3 and {row["cuda_visible_devices"] for row in rows} <= {"0", "1"}
    results = list(trial_results(tmp_path / "smoke").values())
    devices = {}
    for row in tune_results(tmp_path / "smoke"):
        devices[row["trial_dir"]] = row["cuda_visible_devices"]
    for a in results:
        for b in results:
            if a is not b and a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]:
                assert devices[a["output_dir"]] != devices[b["output_dir"]]


def test_search_on_a_multi_node_cluster(tmp_path):
    """A head and two worker nodes on this machine; trials are spread over the nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        args = ["search", str(SMOKE), f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}", "num_samples=6"]
        # trials of ~4 s, none stopped: a node whose worker starts seconds after the other's (under the load of the
        # whole suite, up to ~6 s) still gets trials; with ~1.5 s trials one node once ran all six
        args += ["base.train.max_steps=144", "scheduler.kind=fifo"]
        assert main([*args, "--address", cluster.address]) == 0
        assert len({r["node"] for r in tune_results(tmp_path / "smoke")}) == 2
        assert len(trial_results(tmp_path / "smoke")) == 6
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_an_actor_that_tune_drops_before_its_first_step_trains_nothing(tmp_path, ray_shutdown):
    """Tune may create an actor for a pending trial, then run that trial on a worker that freed up first and drop
    the new actor. Such an actor must not start the trial: in a resumed search one started a completed trial
    again and overwrote its results. The trial starts at the first step(), and ends at stop()."""
    import ray
    from ray import tune

    from fika.search.trainable import FikaTrainable

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    spec = load_spec(SMOKE, [f"storage={tmp_path}"])
    trainable = tune.with_parameters(FikaTrainable, spec=spec.model_dump(mode="json"), run_dir=str(tmp_path / "smoke"))
    params = {
        "train.learning_rate": 1e-3,
        "train.lr_scheduler": "linear",
        "lora.r,lora.alpha": "[8, 8]",
        "lora.dropout": 0.0,
    }
    dropped = trainable(config=params)
    dropped.stop()
    assert not (tmp_path / "smoke").exists()  # created and dropped: nothing ran, nothing was written
    used = trainable(config=params)
    assert not (tmp_path / "smoke").exists()
    first = used.train()
    assert first["step"] == 1 and (tmp_path / "smoke" / "trials" / "default" / "config.yaml").exists()
    assert sys.modules.get("bitsandbytes", "absent") is not None  # only a Ray actor's process hides libraries
    used.stop()
    assert json.loads((tmp_path / "smoke" / "trials" / "default" / "result.json").read_text())["status"] == "stopped"


def test_a_search_worker_hides_the_libraries_its_trials_do_not_use():
    import torch

    from fika.search.trainable import unused_libraries

    cpu = not torch.cuda.is_available()
    assert unused_libraries(load_spec(SMOKE, [])) == (["wandb", "bitsandbytes"] if cpu else ["wandb"])
    assert unused_libraries(load_spec(SMOKE, ["base.model.load_in_4bit=true", "base.train.report_to=[wandb]"])) == []
    assert "wandb" not in unused_libraries(load_spec(SMOKE, ["trackers=[wandb]"]))  # its logger runs in Ray actors
    searched = yaml.safe_load(SMOKE.read_text())
    searched["space"]["model.load_in_4bit"] = {"choice": [False, True]}
    assert unused_libraries(SearchSpec.model_validate(searched)) == ["wandb"]


def test_a_local_searchs_first_trials_run_in_the_workers_ray_started_with_their_libraries(tmp_path, ray_shutdown):
    """The Ray a search starts has one worker per CPU import the trial's libraries (without the ones its trials do
    not use) while the driver reads the data; the first trials' actors run in those processes, not in new ones."""
    import psutil
    import ray
    import torch
    from ray import tune

    from fika.search.internals import actors_in_prestarted_workers
    from fika.search.ray_session import connect_ray

    spec = load_spec(SMOKE, [f"storage={tmp_path}", "resources.cpu=1", "num_samples=256"])
    if torch.cuda.is_available() or (os.cpu_count() or 1) > spec.num_trials():
        pytest.skip("the workers import in advance without CUDA, and when each will run a trial")

    class Probe(tune.Trainable):
        def setup(self, config: dict) -> None:
            self.facts = {
                "pid": os.getpid(),
                "preloaded": "fika.search.worker" in sys.modules and "trl" in sys.modules,
                "hidden": sys.modules.get("wandb", "absent") is None,
            }

        def step(self) -> dict:
            return {**self.facts, "done": True}

    def idle_workers() -> set[int]:
        return {p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0] == "ray::IDLE"}

    assert not ray.is_initialized()
    connect_ray(spec, None)
    assert "RAY_preload_python_modules" not in os.environ  # only Ray's own processes were started with it
    deadline = time.time() + 60
    while len(idle_workers()) < 2 and time.time() < deadline:  # Ray starts them as the driver reads the data
        time.sleep(0.2)
    prestarted = idle_workers()
    with actors_in_prestarted_workers():
        results = tune.Tuner(
            tune.with_resources(Probe, {"cpu": 1}),
            param_space={"a": tune.grid_search([1, 2])},
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
        ).fit()
    facts = [result.metrics for result in results]
    assert [f["preloaded"] and f["hidden"] for f in facts] == [True, True]
    pids = {f["pid"] for f in facts}
    assert len(pids) == 2 and pids <= prestarted


def test_a_reused_worker_reports_each_trials_own_peak(tmp_path, ray_shutdown):
    """Two trials of different ranks, one after the other in one worker process: two peaks, the larger rank's larger."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(searcher="grid", num_samples=1, baseline=False, max_concurrent=1, scheduler={"kind": "fifo"})
    spec["space"] = {"lora.r,lora.alpha": {"choice": [[8, 8], [1024, 1024]]}}
    path = tmp_path / "ranks.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert (
        main(["search", str(path), f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}", "resources.cpu=2"]) == 0
    )
    results = sorted(trial_results(tmp_path / "smoke").values(), key=lambda r: r["started_at"])
    pids = {r["pid"] for r in tune_results(tmp_path / "smoke")}
    assert len(pids) == 1  # the same process ran both trials
    small, large = results
    assert small["trainable_params"] < large["trainable_params"]
    assert large["peak_memory_mb"] > small["peak_memory_mb"] + 20  # not the worker's lifetime peak


def test_a_grid_with_its_baseline_runs_every_configuration_once(tmp_path, ray_shutdown):
    """The baseline's configuration is one of the grid's: it runs once, as part of the grid (a queued point would
    have taken Tune's one pass over the grid, and only the point would have run)."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(searcher="grid", num_samples=1, scheduler={"kind": "fifo"})
    spec["base"]["train"]["max_steps"] = 4
    spec["space"] = {"train.learning_rate": {"choice": [1.0e-3, 5.0e-3]}, "lora.dropout": {"choice": [0.0, 0.1]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["search", str(path), f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}"]) == 0
    configs = [
        yaml.safe_load((tmp_path / "smoke" / "trials" / t / "config.yaml").read_text())
        for t in trial_results(tmp_path / "smoke")
    ]
    assert len({(c["train"]["learning_rate"], c["lora"]["dropout"]) for c in configs}) == len(configs) == 4
    assert "(baseline)" in (tmp_path / "report" / "index.md").read_text()


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path, ray_shutdown, smoke_report, capsys):
    """One trial raises (LoRA on a layer peft cannot adapt); the others complete; the report lists it last.
    Its report folder held the report of a search whose run folder is gone: replaced, said once."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(searcher="grid", num_samples=1, max_failures=0, baseline=False, scheduler={"kind": "fifo"})
    spec["space"] = {"lora.target_modules": {"choice": [["q_proj", "v_proj"], ["norm"]]}}
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(spec))
    shutil.copytree(smoke_report[1], tmp_path / "report")
    stale = json.loads((tmp_path / "report" / "report.json").read_text())
    (tmp_path / "report" / "report.json").write_text(json.dumps({**stale, "run": "../gone", "run_id": "old"}))
    assert main(["search", str(path), f"storage={tmp_path}", f"report_dir={tmp_path / 'report'}"]) == 0
    assert capsys.readouterr().err.count("report: replacing") == 1
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert list(table["status"]) == ["completed", "failed"]
    assert "not supported" in table["error"].iloc[1]
    assert "failed: " in (tmp_path / "report" / "index.md").read_text()


def spawn_search(tmp_path: Path, *extra: str, env: dict | None = None) -> tuple[list[str], subprocess.Popen]:
    args = [
        sys.executable,
        "-m",
        "fika.cli",
        "search",
        str(SMOKE),
        f"storage={tmp_path}",
        f"report_dir={tmp_path / 'report'}",
        *extra,
    ]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, whatever ran the tests:
    try:  # a driver started while Ctrl-C is ignored would ignore it too
        process = subprocess.Popen(
            args,
            env=env or dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, before)
    return args, process


def wait_for(condition, process: subprocess.Popen, timeout: float = 240, every_s: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the search ended first:\n{process.stdout.read()[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(every_s)


@pytest.mark.parametrize("pack", [1, 2])
def test_a_killed_worker_is_retried_and_nothing_else_is_lost(tmp_path, pack):
    """SIGKILL to one trial's worker process mid-trial: Ray retries the trial, the search finishes, all 6 report.
    In a packed search the worker is the trial's relay: its member, left in the pack, makes way for the retry."""
    args, process = spawn_search(
        tmp_path,
        "num_samples=6",
        "base.train.max_steps=120",
        "scheduler.grace_period=40",
        "max_failures=1",
        f"resources.pack={pack}",
    )
    run = tmp_path / "smoke"
    rows: list[dict] = []

    def running_trial() -> bool:
        """A trial past 10 steps that has not ended (a reused worker may run another trial than its first)."""
        for path in (run / "tune").rglob("result.json") if (run / "tune").exists() else []:
            lines = path.read_text().splitlines()
            try:
                last = json.loads(lines[-1]) if len(lines) > 10 else None
            except ValueError:  # a line being written
                last = None
            if last is None:
                continue
            trial = Path(last["trial_dir"])
            if not (trial / "result.json").exists() and not (trial / "pruned.json").exists():
                rows.append(last)
                return True
        return False

    wait_for(running_trial, process, every_s=0.01)
    row = rows[-1]
    victim = row["trial_dir"]
    os.kill(row["pid"], signal.SIGKILL)
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    results = trial_results(run)
    assert len(results) == 6 and all(r["status"] in ("completed", "stopped") for r in results.values()), results
    assert Path(victim).name in results  # the killed trial ran again and ended
    assert "6/6 trials done" in output


def test_a_stopped_trial_whose_worker_died_before_its_result_is_recorded_as_stopped(tmp_path):
    """The scheduler stopped a trial at its rung (`pruned.json`), and its worker was killed before it wrote its
    result: the search's end records it `stopped` at that step from its own records, not failed."""
    from fika.search.report.rows import load_row
    from fika.search.run_folder import record_stopped
    from fika.search.spec import load_spec

    folder = tmp_path / "trials" / "abc"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("train: {seed: 1}\n")
    records = [
        {
            "step": s,
            "train_loss": 5 - s / 20,
            "train_loss_smooth": 5 - s / 20,
            "tokens_seen": 256 * s,
            "elapsed_s": s / 10,
            "step_time_s": 0.01,
            "max_steps": 120,
        }
        for s in range(1, 44)
    ]
    records[19] |= {"eval_loss": 4.5, "eval_time_s": 0.2}
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "pruned.json").write_text(json.dumps({"step": 50}))
    assert not record_stopped(folder) and not (folder / "result.json").exists()  # no record at that step
    (folder / "pruned.json").write_text(json.dumps({"step": 40}))
    assert record_stopped(folder)
    result = json.loads((folder / "result.json").read_text())
    assert result["status"] == "stopped" and result["steps"] == 40 and result["max_steps"] == 120
    assert result["eval_losses"] == {"20": 4.5} and result["tokens_seen"] == 256 * 40 and result["train_loss"] == 3
    row = load_row(folder, load_spec(SMOKE), running=False)
    assert row.status == "pruned" and row.steps == 40 and row.eval_loss == 4.5


def a_trial_is_midway(run: Path) -> bool:
    metrics = (run / "trials").glob("*/metrics.jsonl")
    midway = any(len(p.read_text().splitlines()) > 30 and not (p.parent / "result.json").exists() for p in metrics)
    return midway and len(trial_results(run)) >= 1


KILL_POINTS = {  # when to stop the driver, and how often to look (tests/test_kill.py kills it at many more moments)
    "during a trial": (a_trial_is_midway, 0.05),
    "by Ctrl-C during a trial": (a_trial_is_midway, 0.05),  # SIGINT to the driver, Ray and the workers
    "by SIGTERM during a trial": (a_trial_is_midway, 0.05),  # to the driver alone (`kill`, a preempting scheduler)
    "during a packed trial": (a_trial_is_midway, 0.05),  # resources.pack 2: the packs end with the driver's Ray
    "by SIGTERM during a packed trial": (a_trial_is_midway, 0.05),  # the relays stop their members, as interrupted
}


def driver_files(run: Path) -> dict[str, bytes]:
    """What a search's driver writes: everything in its folder but the trials' own (the workers write those)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.relative_to(run).parts[0] != "trials"
    }


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_driver_resumes_every_trial_exactly_once(tmp_path, point, capsys):
    import ray

    extra = [
        "base.train.max_steps=60",
        "scheduler.grace_period=20",
        *(["resources.pack=2"] if "packed" in point else []),
    ]
    args, process = spawn_search(tmp_path, *extra)
    run = tmp_path / "smoke"
    when, every_s = KILL_POINTS[point]
    wait_for(lambda: when(run), process, every_s=every_s)
    os.killpg(process.pid, signal.SIGSTOP)  # the driver holds still, and holds its lock
    files = driver_files(run)
    assert main(["search", *args[4:], "--resume"]) == 2  # a second driver of a running search is refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run} is in use by fika search smoke (pid {process.pid} on " in err[0], err
    assert driver_files(run) == files and not ray.is_initialized()
    os.killpg(process.pid, signal.SIGCONT)
    if point.startswith("by "):  # the driver ends as a killed one would, and says how to go on
        if point.startswith("by Ctrl-C"):
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == (130 if point.startswith("by Ctrl-C") else 143), output[-3000:]
        assert "search smoke: interrupted; the trials that ended are kept, and `fika search ... --resume`" in output
        assert "finished_at" not in json.loads((run / "run.json").read_text())
        # Tune saved its state with the live trials; one stopped then says it was interrupted (not pruned)
        assert {r["status"] for r in trial_results(run).values()} <= {"completed", "stopped", "interrupted"}
    else:
        os.killpg(process.pid, signal.SIGKILL)  # driver, Ray and workers: nothing gets to save anything more
        process.wait()
    before = {k: r for k, r in trial_results(run).items() if r["status"] != "interrupted"}  # those run again
    folders_before = {p.name for p in (run / "trials").glob("*/")}
    for state in (run / "tune").glob("*_state-*.json"):  # as if the kill cut Ray's copy of its state short
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    for state in (run / "tune").glob("searcher-state-*.pkl"):
        state.write_bytes(b"")

    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = trial_results(run)
    assert folders_before <= set(results)  # every trial of the first run ended, once
    for trial_id, r in before.items():  # a trial that had ended was not run again
        assert results[trial_id]["ended_at"] == r["ended_at"]
    assert all(r["status"] in ("completed", "stopped", "failed") for r in results.values())
    if point.startswith("by "):  # a driver that could stop its trials loses none of them
        assert all(r["status"] in ("completed", "stopped") for r in results.values()), results
    stopped = {k: r["steps"] for k, r in results.items() if r["status"] == "stopped"}
    assert set(stopped.values()) <= {20, 40}, stopped  # by ASHA, at a rung
    assert len(results) == 8, sorted(results)
    ran = [r for r in results.values() if r["status"] != "failed"]
    configs = []
    for trial_id, r in results.items():
        if r["status"] != "failed":
            config = yaml.safe_load((run / "trials" / trial_id / "config.yaml").read_text())
            configs.append(json.dumps({k: config[k] for k in ("lora", "train")}, sort_keys=True))
    assert len(set(configs)) == len(ran)  # no parameters ran twice
    study = load_study(run, "smoke")
    told = {t.user_attrs.get("tune_trial_id"): t.state.name for t in study.trials}  # the study tells the truth
    expected = {"completed": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL"}
    assert told == {trial_id: expected[r["status"]] for trial_id, r in results.items()}  # and holds no other
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert "8/8 trials done" in done.stdout, done.stdout[-3000:]  # the progress counts the first run too
    # A fit killed before its end keeps none, and then the report gives no slot figures.
    fits = json.loads((run / "run.json").read_text())["fits"]
    assert len(fits) == 2 and fits[1]["ended_at"] > fits[1]["started_at"] > fits[0]["started_at"]
    assert ("- slots: " in (tmp_path / "report" / "index.md").read_text()) == ("ended_at" in fits[0])


def test_the_same_search_twice_reports_again_and_a_changed_one_is_refused(smoke_report, capsys):
    run, report = smoke_report
    storage = run.parent
    assert main(["search", str(SMOKE), f"storage={storage}", f"report_dir={report}"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["search", str(SMOKE), f"storage={storage}", f"report_dir={report}", "num_samples=9", "seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_samples 8 -> 9; seed 0 -> 1" in err[0] and "pick another name" in err[0]


def test_an_unfinished_search_asks_for_resume(tmp_path, capsys):
    import ray

    run = tmp_path / "smoke"
    (run / "trials").mkdir(parents=True)
    spec = load_spec(SMOKE, [f"storage={tmp_path}"])
    from fika.search.run_folder import spec_yaml

    (run / "spec.yaml").write_text(spec_yaml(spec))
    assert main(["search", str(SMOKE), f"storage={tmp_path}"]) == 2
    assert "is unfinished (0 of 8 trials ended): add --resume" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_dry_run_counts_the_grid_and_estimates_memory(capsys):
    assert main(["search", str(SMOKE), "searcher=grid", "num_samples=1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid searcher, 108 trials" in out and "rungs at steps [6] on train_loss_smooth" in out
    assert "memory of the largest trial (r 16, batch 2) on cuda" in out and "such trials per GPU" in out
    space = "space={train.learning_rate: {choice: [1.0e-3, 5.0e-3]}, lora.dropout: {choice: [0.0, 0.1]}}"
    assert main(["search", str(SMOKE), space, "num_samples=5", "--dry-run"]) == 0  # optuna runs no config twice
    assert "optuna searcher, 4 trials (num_samples 5, but the space holds 4 configurations" in capsys.readouterr().out


def llama_1b_config(folder: Path) -> Path:
    """A model folder holding only the published Llama-3.2-1B config: enough for the memory estimate."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ).save_pretrained(folder)
    return folder


def test_a_spec_whose_largest_trial_exceeds_the_gpu_is_refused(tmp_path, capsys):
    """The estimate before launch: a Llama-3.2-1B trial of the grid at batch 16 x 2048 does not fit 8 GiB."""
    import ray

    model = llama_1b_config(tmp_path / "llama")
    args = ["search", "grid", f"base.model.name={model}", f"storage={tmp_path}", "--address=auto"]
    assert main([*args, "resources.gpu_memory_gb=8", "base.train.batch_size=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resources.gpu: 1 is not allowed: the largest trial needs about" in err[0], err
    assert "r 64" not in err[0] and "4-bit" in err[0]
    assert not ray.is_initialized() and not (tmp_path / "grid" / "tune").exists()
    assert main(["search", "grid", f"base.model.name={model}", "--address=auto", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory of the largest trial (r 64, batch 2) on cuda" in out and "4-bit" in out


def test_every_shipped_spec_validates_and_says_how_to_run_it():
    for path in sorted((REPO / "search" / "specs").glob("*.yaml")):
        spec = load_spec(path)
        text = path.read_text()
        assert text.startswith("#") and f"fika search search/specs/{path.name}" in text, path
        assert spec.num_trials() >= 6


def test_a_trial_estimated_close_to_its_share_is_warned_about(capsys):
    from fika.memory import GIB
    from fika.search.plan import ESTIMATE_LOW, check_memory, largest_trial

    need = largest_trial(load_spec(SMOKE), "cuda")[1].total / GIB
    for gib, warned in ((need * (1 + ESTIMATE_LOW / 2), True), (need / (1 - ESTIMATE_LOW) * 1.01, False)):
        check_memory(load_spec(SMOKE, ["resources.gpu=1", f"resources.gpu_memory_gb={gib}"]))
        out = capsys.readouterr().out
        assert ("may run out of memory" in out) is warned, (gib, out)


def test_the_rung_subset_defaults_to_16_or_the_whole_eval_set():
    assert load_spec("demo", ["scheduler.rung_metric=eval_subset"]).quick_evals() == ([20], 8)
    assert load_spec("demo", ["scheduler.rung_metric=eval_subset", "base.data.eval_size=40"]).quick_evals() == (
        [20],
        16,
    )
    assert load_spec("demo", ["scheduler.rung_metric=eval_subset", "scheduler.rung_eval_size=5"]).quick_evals()[1] == 5
    from fika.search.run_folder import spec_yaml

    assert "rung_eval_size: 8" in spec_yaml(load_spec("demo"))  # the run folder records the size it used


def test_trials_read_a_relative_data_path_from_the_drivers_folder(tmp_path, monkeypatch):
    """A worker that starts in another folder (a cluster node's Ray; here a Ray started from elsewhere) reads a
    spec's relative data path as the driver that validated it did."""
    import ray

    elsewhere, project = tmp_path / "ray-started-here", tmp_path / "project"
    elsewhere.mkdir()
    project.mkdir()
    turns = [
        [{"from": "human", "value": f"What is {i} + {i}?"}, {"from": "gpt", "value": f"{2 * i}."}] for i in range(80)
    ]
    (project / "chats.jsonl").write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns))
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        monkeypatch.chdir(project)
        assert (
            main(
                [
                    "search",
                    str(SMOKE),
                    "num_samples=2",
                    "base.data={sources: [{path: chats.jsonl}], eval_size: 4}",
                    f"storage={tmp_path}",
                    f"report_dir={tmp_path / 'report'}",
                ]
            )
            == 0
        )
    finally:
        ray.shutdown()
    results = trial_results(tmp_path / "smoke")
    assert len(results) == 2 and {r["status"] for r in results.values()} <= {"completed", "stopped"}, results


def test_a_search_saved_with_relative_data_paths_still_resumes(tmp_path, monkeypatch):
    """A search saved by an earlier fika holds its local data paths as written, and none of the keys added since;
    `fika search` now records paths absolute, and the saved spec still matches from the folder it ran in (and only
    there), its missing keys read as their defaults."""
    from fika.config import ConfigError
    from fika.search.run_folder import folder_state, spec_yaml
    from fika.sources import resolve_local_paths

    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "tests" / "data" / "finetome.jsonl", tmp_path / "data" / "chat.jsonl")
    monkeypatch.chdir(tmp_path)
    spec = load_spec(str(SMOKE), ["base.data.sources=[{path: data/chat.jsonl}]", f"storage={tmp_path}"])
    run = tmp_path / "smoke"
    run.mkdir()
    saved = yaml.safe_load(spec_yaml(spec))  # as an earlier fika saved it: the path as written, no later keys
    del saved["warm_start"], saved["confirm"]
    (run / "spec.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (run / "run.json").write_text("{}")
    resolved = spec.model_copy(
        update={"base": spec.base.model_copy(update={"data": resolve_local_paths(spec.base.data)})}
    )
    assert resolved.base.data.sources[0].path == str(tmp_path / "data" / "chat.jsonl")
    assert folder_state(resolved, run, resume=True) == "restart"  # the same spec; no Tune state: a new fit over it
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # from another folder, the saved path names another file
    with pytest.raises(ConfigError, match="with another spec"):
        folder_state(resolved, run, resume=True)


def test_the_dry_run_makes_every_check_the_real_run_makes_before_ray(tmp_path, monkeypatch):
    """One list of checks (fika.search.checks.BEFORE_RAY), run by `--dry-run` and by the real run's preflight alike;
    the dry run says what it leaves to the real run."""
    import contextlib

    import ray

    import fika.search
    from fika.search import checks
    from fika.search.driver import preflight
    from fika.search.run_folder import run_dir

    ran: list[tuple[str, bool]] = []

    def recorded(check):
        def run(spec, directory, dry_run):
            ran.append((check.__name__, dry_run))
            return check(spec, directory, dry_run)

        return run

    monkeypatch.setattr(checks, "BEFORE_RAY", tuple(recorded(c) for c in checks.BEFORE_RAY))
    out = fika.search.dry_run(SMOKE, {"storage": str(tmp_path)})
    assert "run: a new search in" in out and "not: that a trial fits a node of the Ray cluster (needs Ray)" in out
    dry = list(ran)
    ran.clear()
    spec = load_spec(SMOKE, {"storage": str(tmp_path)})
    with contextlib.ExitStack() as hold:
        assert preflight(spec, run_dir(spec), False, hold) == "new"
    expected = [
        "check_storage",
        "check_cluster_address",
        "check_optuna_storage",
        "check_local_gpu",
        "check_trial_memory",
        "check_cache",
        "check_space_data",
        "check_warm_start",
    ]
    assert [n for n, d in dry if d] == expected and [n for n, d in ran if not d] == expected
    assert not ray.is_initialized()

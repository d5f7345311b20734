"""Experiment trackers with the real libraries and no network: TensorBoard, MLflow (a local store) and W&B
(offline), for a search (Ray Tune's logger callbacks) and for `fika train` (transformers' report_to)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fika.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search" / "specs" / "smoke.yaml"


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for events in folder.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return scalars


def test_a_search_reports_to_tensorboard_mlflow_and_wandb(tmp_path, monkeypatch):
    import mlflow
    import ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [
        "search",
        str(SMOKE),
        f"storage={tmp_path}",
        f"report_dir={tmp_path / 'report'}",
        "num_samples=3",
        "scheduler={kind: fifo}",
        "trackers=[tensorboard, mlflow, wandb]",
    ]
    try:
        assert main(args) == 0
    finally:
        ray.shutdown()
    run = tmp_path / "smoke"
    scalars = tensorboard_scalars(run / "tune")
    assert any(tag.endswith("train_loss") for tag in scalars) and any(tag.endswith("eval_loss") for tag in scalars)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["smoke"])
    assert len(runs) == 3 and runs["metrics.eval_loss"].notna().all() and runs["metrics.train_loss"].notna().all()
    offline = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))  # one offline run per trial
    assert len(offline) == 3
    missing = [
        f"{r.parent.name}: {k} ({wandb_run_log(r)})"
        for r in offline
        for k in (b"eval_loss", b"train_loss")
        if k not in r.read_bytes()
    ]
    assert not missing, missing


def wandb_run_log(run_file: Path) -> str:
    """What an offline W&B run's own log says: how many results its Ray logging actor handed to wandb (a config
    update precedes each `wandb.log`), and its last line. Tells a result that never reached the actor from one that
    wandb did not write."""
    log = run_file.parent / "logs" / "debug.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    results = sum("config_cb" in line for line in lines)
    return f"{results} results handed to wandb; its log ends: {lines[-1] if lines else 'no debug.log'}"


def test_a_missing_tracker_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """A tracker that is not installed (here hidden, as `sys.modules[name] = None` makes Python see it) is refused
    before any compute, for a search and for one run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert main(["search", str(SMOKE), "trackers=[mlflow]"]) == 2
    assert main(["train", "model.name=tiny", "train.report_to=[tensorboard, mlflow]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fika search: error: trackers: mlflow is not installed; pip install 'fika[mlflow]'",
        "fika train: error: train.report_to: mlflow is not installed; pip install 'fika[mlflow]'",
    ]
    assert not list(tmp_path.iterdir())


def test_fika_train_reports_to_tensorboard_and_mlflow(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "full-run")
    mlflow.set_tracking_uri(uri)  # the process-wide URI an earlier test may have set
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model.name=tiny",
                "data.sources.0.limit=100",
                "data.eval_size=4",
                "train.max_steps=8",
                "train.report_to=[tensorboard, mlflow]",
                f"output.dir={out}",
            ]
        )
        == 0
    )
    scalars = tensorboard_scalars(out / "tracking")
    assert any("loss" in tag for tag in scalars) and len(next(v for k, v in scalars.items() if "loss" in k)) >= 8
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["full-run"])
    assert len(runs) == 1 and runs["metrics.loss"].notna().all()


@pytest.mark.parametrize("command", ["train", "search"])
def test_a_tracker_that_would_fail_mid_run_is_refused_before_any_compute(tmp_path, monkeypatch, capsys, command):
    """An MLflow server that does not answer (MLflow retries for minutes, then fails the run), and W&B without a
    login: one line naming the key, the password masked, nothing created, no Ray started."""
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://fika:s3cret@127.0.0.1:1")
    for name in ("WANDB_API_KEY", "WANDB_MODE", *(f"{p}_proxy" for p in ("http", "https", "all"))):
        monkeypatch.delenv(name, raising=False)  # a machine without a W&B login, reaching MLflow directly
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    key = "train.report_to" if command == "train" else "trackers"
    for tracker, message in (
        (
            "mlflow",
            "the MLflow server at MLFLOW_TRACKING_URI=http://fika:***@127.0.0.1:1 cannot "
            "be reached (Connection refused)",
        ),
        ("wandb", "wandb has no API key on this machine"),
    ):
        args = (
            ["train", "model.name=tiny", f"train.report_to=[{tracker}]"]
            if command == "train"
            else ["search", str(SMOKE), f"trackers=[{tracker}]"]
        )
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fika {command}: error: {key}: {message}"), err
        assert "s3cret" not in err[0]
    assert not list(tmp_path.iterdir()) and not ray.is_initialized()

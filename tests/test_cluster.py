"""The cluster recipes parse and say what they run: Ray cluster launcher, KubeRay RayJob, SLURM."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "search" / "cluster"


def test_the_kuberay_rayjob_runs_fika_on_a_shared_volume():
    (job,) = list(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("fika search ") and "--address auto" in spec["entrypoint"]
    assert "storage=/shared/" in spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod mounts the same claim at the same path
        (container,) = pod["containers"]
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"] and container["image"]
        assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "fika-shared"}}]
    worker = cluster["workerGroupSpecs"][0]
    gpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["rayStartParams"]["num-gpus"] == gpus


def test_the_ray_cluster_launcher_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text()))
    validate_config(config)
    assert any("fika" in c for c in config["setup_commands"])


def test_the_slurm_script_is_valid_bash_that_runs_fika():
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm.sh")], check=True)
    assert 'fika search "$@" --address' in (CLUSTER / "slurm.sh").read_text()

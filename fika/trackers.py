"""Experiment trackers (TensorBoard, MLflow, W&B): refused before any compute when they would fail once a run
has started (not installed, no login, a server that does not answer)."""

from __future__ import annotations

import importlib.util
import os
import socket

from fika.errors import FikaError
from fika.masking import mask_secrets


def check_reporting(key: str, trackers: list[str]) -> None:
    """Refuses, before any compute, a tracker that would fail once the run has started: one that is not
    installed, W&B without a login, an MLflow server that cannot be reached."""
    for tracker in trackers:
        if tracker != "tensorboard" and importlib.util.find_spec(tracker) is None:
            raise FikaError(f"{key}: {tracker} is not installed; pip install 'fika[{tracker}]'")
    if "wandb" in trackers:
        check_wandb(key)
    if "mlflow" in trackers:
        check_mlflow(key)


def check_mlflow(key: str) -> None:
    """Refuses an MLflow tracking server (MLFLOW_TRACKING_URI, http or https) that does not answer: MLflow would
    retry for minutes once the run has started, then fail it. Local stores (a folder, SQLite) need no check."""
    from urllib.parse import urlparse
    from urllib.request import getproxies

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or getproxies():  # behind a proxy: cannot tell
        return
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), 5).close()
    except OSError as err:
        raise FikaError(
            f"{key}: the MLflow server at MLFLOW_TRACKING_URI={mask_secrets(uri)} cannot be reached "
            f"({err.strerror or err}); start it, or unset MLFLOW_TRACKING_URI to log locally"
        ) from None


def check_wandb(key: str) -> None:
    """Refuses W&B reporting that would stop at a login prompt, or fail, once the run has started: no API key on
    this machine (WANDB_API_KEY, or the W&B host in ~/.netrc, which `wandb login` writes) and not offline."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host or ""):
            return
    except netrc.NetrcParseError:  # a file this check cannot read (say, too open to Python) may still serve W&B
        return
    except OSError:
        pass
    raise FikaError(
        f"{key}: wandb has no API key on this machine; run `wandb login`, set WANDB_API_KEY, or set "
        "WANDB_MODE=offline to log locally"
    )

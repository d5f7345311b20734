"""Reaching the Hugging Face hub: the offline switch (huggingface_hub's own), a quick reachability probe, and
whether a model is already in the local cache."""

from __future__ import annotations

import os
import socket

_REACHABLE: bool | None = None


def hub_offline() -> bool:
    """Whether the user asked for the local Hugging Face cache only (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (one probe per process), so that a hub id without
    network fails in seconds instead of after the hub client's retries. False when HF_HUB_OFFLINE is set."""
    global _REACHABLE
    if hub_offline():
        return False
    if _REACHABLE is None:
        from urllib.parse import urlparse

        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
                _REACHABLE = True
        except OSError:
            _REACHABLE = False
    return _REACHABLE


def hub_cached(repo: str, revision: str | None) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str)
    except Exception:  # an id the hub client cannot parse is simply not cached
        return False

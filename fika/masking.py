"""Credentials never reach a file or a line fika writes: URL passwords and Hugging Face tokens are masked."""

from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s/]+)@")
_TOKENS = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def mask_secrets(text: str) -> str:
    """The text with URL passwords (`postgresql://user:***@host`) and Hugging Face tokens masked."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _TOKENS.sub("hf_***", text)

"""Conversations as training tokens: rendered with the chat template, cut to the model's length after the last
assistant turn that fits, labelled on the assistant replies (and their end-of-turn token) only."""

from __future__ import annotations

import hashlib
import json

from fika.sources import Dropped


def chat_tokens(tokenizer, conversations: list[list[dict]], keep: int) -> list[tuple[list[int], list[int]]]:
    """The first `keep` token ids and assistant-token mask of each conversation, rendered with the chat template.

    One batch: the fast tokenizer encodes it in parallel (with the cut, 2-4x faster than one whole encoding
    per conversation), and only the kept tokens become Python lists and masks. A batch the template rejects
    is encoded one conversation at a time, so that the error names the one at fault.
    """

    def encode(batch):
        out = tokenizer.apply_chat_template(
            batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **cut_at(tokenizer, keep)
        )
        return list(zip(out["input_ids"], out["assistant_masks"], strict=True))

    try:
        encoded = encode(conversations)
    except Exception:  # noqa: BLE001 - raised again below, by the conversation at fault
        encoded = [pair for messages in conversations for pair in encode([messages])]
    return [(list(ids), list(mask)) for ids, mask in encoded]


def cut_at(tokenizer, keep: int) -> dict:
    """Tokenizer arguments that keep the first `keep` tokens (a right-side cut is a prefix of the full encoding;
    a tokenizer set to cut on the left is not cut)."""
    return {"truncation": True, "max_length": keep} if tokenizer.truncation_side == "right" else {}


def fit_to_length(ids: list[int], mask: list[int], max_length: int, overlong: str) -> tuple[dict, bool]:
    """Token ids and labels (-100 outside assistant replies) of a conversation's first tokens (all of them, or
    `max_length + 1` when it is longer); True if it was cut.

    A conversation longer than `max_length` is cut after the last assistant turn that fits; if none fits,
    inside the first assistant reply; with no assistant token in the window (or `overlong: drop`) it is
    dropped as `too_long`.
    """
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "drop":
            raise Dropped("too_long")
        turn_ends = [j + 1 for j in range(max_length) if mask[j] and not mask[j + 1]]
        cut = turn_ends[-1] if turn_ends else max_length
        ids, mask = ids[:cut], mask[:cut]
    if not any(mask):
        raise Dropped("too_long" if truncated else "no_assistant")
    labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels}, truncated


def assistant_turns(labels: list[int]) -> int:
    """How many assistant replies (runs of labelled tokens) a tokenized conversation holds."""
    return sum(1 for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100))


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes tokens: its vocab and rules, specials and template."""
    if hasattr(tokenizer, "backend_tokenizer"):
        rules = json.loads(tokenizer.backend_tokenizer.to_str())
        # not the truncation and padding it keeps from its last call: settings of that call, not of the tokenizer
        vocab = json.dumps({k: v for k, v in rules.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        vocab = str(tokenizer.get_vocab())
    parts = [vocab, str(tokenizer.chat_template), str(tokenizer.all_special_tokens)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

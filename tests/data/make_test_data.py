"""Writes the three small data files of the CPU data-mix search, one per hub schema, from real conversations.

  python tests/data/make_test_data.py      # rewrites finetome.jsonl, sharegpt_english.jsonl, ultrachat_train_sft.jsonl

The conversations come from the built-in ShareGPT V3 (English, 2 to 6 turns, turns cut to 600 characters),
split into three disjoint sets of 200 and written in the schemas of mlabonne/FineTome-100k (from/value),
theblackcat102/sharegpt-english (user/text) and HuggingFaceH4/ultrachat_200k (messages, role/content).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fika.sources import builtin_sharegpt_path, read_sharegpt_v3

HERE = Path(__file__).resolve().parent
ROWS = 200


def english(text: str) -> bool:
    return bool(text) and sum(c.isascii() for c in text) / len(text) > 0.98


def conversations() -> list[list[tuple[str, str]]]:
    records, _ = read_sharegpt_v3(builtin_sharegpt_path())
    picked = []
    for record in records:
        turns = [(t.get("from"), (t.get("value") or "").strip()[:600]) for t in record.get("conversations") or []]
        roles = [r for r, _ in turns]
        if not 2 <= len(turns) <= 6 or roles[0] != "human" or roles[-1] != "gpt" or set(roles) - {"human", "gpt"}:
            continue
        if all(english(text) for _, text in turns):
            picked.append(turns)
        if len(picked) == 3 * ROWS:
            return picked
    return picked


def main() -> None:
    sets = conversations()
    finetome, english_, ultrachat = sets[:ROWS], sets[ROWS : 2 * ROWS], sets[2 * ROWS :]
    with open(HERE / "finetome.jsonl", "w") as f:
        for turns in finetome:
            row = {"conversations": [{"from": r, "value": t} for r, t in turns], "source": "sharegpt", "score": 4.5}
            f.write(json.dumps(row) + "\n")
    with open(HERE / "sharegpt_english.jsonl", "w") as f:
        for turns in english_:
            f.write(json.dumps({"conversations": [{"user": r, "text": t} for r, t in turns], "lang": "en"}) + "\n")
    with open(HERE / "ultrachat_train_sft.jsonl", "w") as f:
        for turns in ultrachat:
            messages = [{"role": "user" if r == "human" else "assistant", "content": t} for r, t in turns]
            prompt = messages[0]["content"]
            row = {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

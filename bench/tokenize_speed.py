"""Times tokenizing a source: fika's batched chat-template pass against one whole encoding per conversation.

  python bench/tokenize_speed.py                       # built-in ShareGPT, SmolLM2 and tiny tokenizers, length 128
  python bench/tokenize_speed.py --lengths 128 2048 --need 500

Both read the same seeded order until `need` usable conversations are kept; the table says whether they kept
exactly the same rows (ids, labels, drops by reason and position).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from fika.chat_tokens import assistant_turns, fit_to_length
from fika.config import DataSource, ModelConfig
from fika.model import load_tokenizer
from fika.source_cache import ROWS_FILE, load_rows, read_source
from fika.source_rows import open_source
from fika.sources import STANDARDIZERS, Dropped, load_source, repair


def one_encoding_per_conversation(source: DataSource, tokenizer, max_length: int, need: int) -> list[tuple]:
    rows, _, _ = load_source(source)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    out, kept, read = [], 0, 0
    for i in order:
        if kept >= need:
            break
        read += 1
        try:
            messages, _ = repair(STANDARDIZERS["sharegpt"][1](rows[i]["conversations"]))
            full = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
            example, truncated = fit_to_length(full["input_ids"], full["assistant_masks"], max_length, "truncate")
        except Dropped as drop:
            out.append((read, drop.reason))
            continue
        kept += 1
        out.append((read, example["input_ids"], example["labels"], truncated, assistant_turns(example["labels"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["builtin:smollm2-135m-instruct", "tiny"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128])
    parser.add_argument("--need", type=int, default=2000)
    args = parser.parse_args()
    source = DataSource(path="builtin:sharegpt")
    print("| tokenizer | length | usable rows | one encoding per conversation s | fika s | speed-up | same rows |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for model in args.models:
        tokenizer = load_tokenizer(ModelConfig(name=model))
        for length in args.lengths:
            began = time.perf_counter()
            reference = one_encoding_per_conversation(source, tokenizer, length, args.need)
            slow = time.perf_counter() - began
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / ROWS_FILE
                meta = read_source(open_source(source, 0), tokenizer, length, "truncate", args.need, out)
                fast = time.perf_counter() - began
                rows = load_rows(Path(folder)).to_list()
            got = sorted(
                [(r["read_pos"], r["input_ids"], r["labels"], r["truncated"], r["n_assistant"]) for r in rows]
                + meta["drops"]
            )
            print(
                f"| {model} | {length} | {len(rows):,} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x | "
                f"{'yes' if got == reference else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

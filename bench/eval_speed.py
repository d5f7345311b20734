"""Times the held-out eval: fika's (labelled positions only, length-sorted batches, chunked head) against the
plain way (full logits over every position, batches of 8 in dataset order), on the same conversations.

  python bench/eval_speed.py                          # SmolLM2-135M, 32 conversations, lengths 128 and 256
  python bench/eval_speed.py --threads 1              # as a 1-CPU search trial runs it

Both give the same per-token loss (tests/test_trial.py checks it to 1e-5); this prints the seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from fika.config import load_config
from fika.data import prepare_data
from fika.evaluate import evaluate
from fika.model import load_base_model, load_tokenizer


def plain_eval(model, dataset, pad_id: int, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            width = max(len(x) for x in rows["input_ids"])
            ids = torch.full((len(rows), width), pad_id)
            labels = torch.full((len(rows), width), -100)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
                ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")  # fmt: skip
            total += loss.item()
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| length | conversations | plain eval s | fika eval s | speed-up | loss (plain) | loss (fika) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        config = load_config(None, [f"model.max_seq_length={length}", "data.sources.0.limit=200",
                                    f"data.eval_size={args.eval_size}"])  # fmt: skip
        tokenizer = load_tokenizer(config.model)
        mix = prepare_data(config.data, tokenizer, length)
        model = load_base_model(config.model, tokenizer).eval()
        timings = {"plain": [], "fika": []}
        for _ in range(args.repeat):
            began = time.perf_counter()
            plain = plain_eval(model, mix.eval, tokenizer.pad_token_id)
            timings["plain"].append(time.perf_counter() - began)
            began = time.perf_counter()
            fast = evaluate(model, mix.eval, tokenizer.pad_token_id).loss
            timings["fika"].append(time.perf_counter() - began)
        a, b = min(timings["plain"]), min(timings["fika"])
        print(f"| {length} | {len(mix.eval)} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {plain:.5f} | {fast:.5f} |")


if __name__ == "__main__":
    main()

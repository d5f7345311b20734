"""Times the held-out eval: fika's (labelled positions only, length-sorted batches, chunked head) against the
plain way (full logits over every position, batches of 8 in dataset order), on the same conversations.

  python bench/eval_speed.py                          # SmolLM2-135M, 32 conversations, lengths 128 and 256
  python bench/eval_speed.py --threads 1              # as a 1-CPU search trial runs it
  python bench/eval_speed.py --shapes llama-3.2-1b --lengths 2048 --eval-size 256 --batch-tokens 4096 16384
                                                      # GPU: a real shape in 4-bit, as the grid spec evaluates

Both give the same per-token loss (tests/test_trial.py checks it to 1e-5); this prints the seconds, one fika
column per `--batch-tokens` (the padded tokens per eval batch; a trial uses 4096). `--shapes` builds randomly
initialised models of real sizes (see bench/trial_speed.py) and loads them as a trial does (4-bit on CUDA).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from trial_speed import SHAPES, build_shape

from fika.config import load_config
from fika.data import prepare_data
from fika.evaluate import evaluate
from fika.model import device_kind, load_base_model, load_tokenizer


def plain_eval(model, dataset, pad_id: int, batch_size: int = 8) -> float:
    device = next(model.parameters()).device
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
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += loss.item()
            count += int((labels[:, 1:] != -100).sum())
            del logits, loss
    return total / count


def timed(fn, *args):
    """(seconds, value) of one call of `fn(*args)`, waiting for the GPU's queue to drain."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    value = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--shapes", nargs="*", default=[], choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fika_columns = [f"fika eval s ({b:,} tokens)" for b in args.batch_tokens]
    print(f"device: {device_kind()}")
    print(
        "| model | length | conversations | tokens | plain eval s |",
        " | ".join(fika_columns),
        "| speed-up | loss (plain) | loss (fika) |",
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * len(fika_columns) + "---:|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        models = [(s, [f"model.name={build_shape(s, Path(root))}", "model.chat_template=chatml"]) for s in args.shapes]
        for label, model_keys in models or [("smollm2-135m", [])]:
            for length in args.lengths:
                config = load_config(
                    None,
                    [
                        *model_keys,
                        f"model.max_seq_length={length}",
                        f"data.sources.0.limit={max(200, 4 * args.eval_size)}",
                        f"data.eval_size={args.eval_size}",
                    ],
                )
                tokenizer = load_tokenizer(config.model)
                mix = prepare_data(config.data, tokenizer, length)
                model = load_base_model(config.model, tokenizer).eval()
                plain_s, fika_s = [], {b: [] for b in args.batch_tokens}
                for _ in range(args.repeat):
                    seconds, plain = timed(plain_eval, model, mix.eval, tokenizer.pad_token_id)
                    plain_s.append(seconds)
                    for b in args.batch_tokens:
                        seconds, fast = timed(evaluate, model, mix.eval, tokenizer.pad_token_id, b)
                        fika_s[b].append(seconds)
                tokens = sum(len(x) for x in mix.eval["input_ids"])
                best = min(min(s) for s in fika_s.values())
                cells = " | ".join(f"{min(fika_s[b]):.2f}" for b in args.batch_tokens)
                print(
                    f"| {label} | {length} | {len(mix.eval)} | {tokens:,} | {min(plain_s):.2f} | {cells} | "
                    f"{min(plain_s) / best:.2f}x | {plain:.5f} | {fast.loss:.5f} |",
                    flush=True,
                )
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

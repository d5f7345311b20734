"""Times K trials trained one after another (`run_trial`, the base model loaded once) against the same K trials in
one pack (`fika.pack.Pack`), and prints a table: makespan, training tokens per second of the whole machine, and
the packed speed-up.

  python bench/pack_speed.py                         # tiny and SmolLM2-135M, K = 1, 2, 4
  python bench/pack_speed.py --only tiny --ks 1 4    # one model, some pack sizes

The K trials differ in seed and learning rate and share batch size (2 x 1), rank (16) and length, so the
packed batch holds 2K rows. Each trial ends with one eval of 8 conversations (packed too). Solo and packed runs
alternate `--repeats` times and the fastest of each is kept: on a shared machine the slowest runs measure the
neighbours.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fika.config import load_config
from fika.model import load_base_model, load_tokenizer
from fika.pack import Pack, train_packed
from fika.trial import run_trial

SETTINGS = {
    "tiny": (["model.name=tiny", "model.max_seq_length=256", "data.sources.0.limit=400"], 30),
    "smollm2": (["model.max_seq_length=128", "data.sources.0.limit=400"], 6),
}


def trial_configs(overrides: list[str], steps: int, k: int, folder: Path) -> list:
    common = [*overrides, "data.eval_size=8", f"train.max_steps={steps}", "train.warmup_steps=1"]
    common += ["train.batch_size=2", "train.gradient_accumulation=1", "train.logging_steps=1"]
    return [
        load_config(
            None, [*common, f"train.seed={i}", f"train.learning_rate={2e-4 * (i + 1)}", f"output.dir={folder / str(i)}"]
        )
        for i in range(k)
    ]


def time_solo(configs: list, base, tokenizer) -> tuple[float, int]:
    began = time.perf_counter()
    results = [run_trial(c, base_model=base, keep_loaded=True) for c in configs]
    return time.perf_counter() - began, sum(r.tokens_seen for r in results)


def time_packed(configs: list, base, tokenizer) -> tuple[float, int]:
    began = time.perf_counter()
    pack = Pack(configs[0].model, base_model=base, tokenizer=tokenizer)
    for config in configs:
        pack.add(config)
    results = train_packed(pack)
    return time.perf_counter() - began, sum(r.tokens_seen for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--ks", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    print(
        "| model | K | steps per trial | solo makespan s | packed makespan s | solo tokens/s | packed tokens/s | speed-up |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.only:
        overrides, steps = SETTINGS[name]
        model = load_config(None, overrides).model
        tokenizer = load_tokenizer(model)
        base = load_base_model(model, tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            run_trial(trial_configs(overrides, 2, 1, Path(tmp) / "warm")[0], base_model=base, keep_loaded=True)
            for k in args.ks:
                solo, packed = [], []
                for repeat in range(args.repeats):
                    folder = Path(tmp) / f"{k}-{repeat}"
                    solo.append(time_solo(trial_configs(overrides, steps, k, folder / "solo"), base, tokenizer))
                    packed.append(time_packed(trial_configs(overrides, steps, k, folder / "packed"), base, tokenizer))
                (solo_s, tokens), (packed_s, packed_tokens) = min(solo), min(packed)
                assert tokens == packed_tokens
                print(
                    f"| {name} | {k} | {steps} | {solo_s:.1f} | {packed_s:.1f} | {tokens / solo_s:,.0f} | "
                    f"{tokens / packed_s:,.0f} | {solo_s / packed_s:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

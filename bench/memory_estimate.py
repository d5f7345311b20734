"""The memory estimate `--dry-run` prints, against the peak a real trial reaches (CPU: resident set size).

  python bench/memory_estimate.py            # the tiny model and SmolLM2-135M at a few lengths, batches and ranks

Each trial runs a few steps in its own process (a clean baseline) and reports its peak; the table shows the
estimate, the measured peak and the error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CONFIGS = [
    ("tiny", ["model.name=tiny", "model.max_seq_length=256", "train.batch_size=2"]),
    (
        "tiny, r 256",
        ["model.name=tiny", "model.max_seq_length=256", "train.batch_size=2", "lora.r=256", "lora.alpha=256"],
    ),
    ("SmolLM2, len 128, batch 2", ["model.max_seq_length=128", "train.batch_size=2"]),
    ("SmolLM2, len 256, batch 2", ["model.max_seq_length=256", "train.batch_size=2"]),
    (
        "SmolLM2, len 256, batch 4, r 64",
        ["model.max_seq_length=256", "train.batch_size=4", "lora.r=64", "lora.alpha=64"],
    ),
    ("SmolLM2, len 512, batch 4", ["model.max_seq_length=512", "train.batch_size=4"]),
]
COMMON = ["data.sources.0.limit=200", "data.eval_size=8", "train.max_steps=6", "train.warmup_steps=1",
          "train.gradient_accumulation=1", "train.eval_steps=[6]", "output.save_adapter=false"]  # fmt: skip

RUN_ONE = """
import json, sys
from fika.config import load_config
from fika.memory import estimate_memory
from fika.trial import run_trial
config = load_config(None, sys.argv[1:])
estimate = estimate_memory(config, "cpu")
result = run_trial(config)
print(json.dumps({"estimate_mb": estimate.total / 2**20, "parts": {k: v / 2**20 for k, v in estimate.parts.items()},
                  "peak_mb": result.peak_memory_mb}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    print("| trial | estimate MB | measured peak MB | error | largest parts of the estimate |")
    print("|---|---:|---:|---:|---|")
    for name, overrides in CONFIGS:
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, "-c", RUN_ONE, *COMMON, *overrides, f"output.dir={out}/run"],
                                  capture_output=True, text=True, check=True)  # fmt: skip
        row = json.loads(done.stdout.strip().splitlines()[-1])
        parts = sorted(row["parts"].items(), key=lambda kv: -kv[1])[:3]
        error = (row["estimate_mb"] - row["peak_mb"]) / row["peak_mb"]
        print(
            f"| {name} | {row['estimate_mb']:,.0f} | {row['peak_mb']:,.0f} | {100 * error:+.0f}% | "
            + ", ".join(f"{k} {v:,.0f}" for k, v in parts)
            + " |"
        )


if __name__ == "__main__":
    main()

"""The memory estimate `--dry-run` prints, against the peak a real trial reaches (CPU: resident set size).

  python bench/memory_estimate.py            # the tiny model and SmolLM2-135M at a few lengths, batches and ranks
  python bench/memory_estimate.py --shapes llama-3.2-1b llama-3.2-3b   # GPU: real model shapes, full rows

Each trial runs a few steps in its own process (a clean baseline) and reports its peak; the table shows the
estimate, the measured peak and the error. On a GPU the measured peak is torch's peak allocation plus the
CUDA context (the estimate's `runtime` part), as `nvidia-smi` would show it for the trial's process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

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
COMMON = [
    "data.sources.0.limit=200",
    "data.eval_size=8",
    "train.max_steps=6",
    "train.warmup_steps=1",
    "train.gradient_accumulation=1",
    "train.eval_steps=[6]",
    "output.save_adapter=false",
]

RUN_ONE = """
import json, sys
from fika.config import load_config
from fika.memory import CUDA_RUNTIME, estimate_memory
from fika.model import device_kind
from fika.trial import run_trial
config = load_config(None, sys.argv[1:])
device = device_kind()
estimate = estimate_memory(config, device)
result = run_trial(config)
context = CUDA_RUNTIME / 2**20 if device == "cuda" else 0  # torch's peak does not count the CUDA context
print(json.dumps({"estimate_mb": estimate.total / 2**20, "parts": {k: v / 2**20 for k, v in estimate.parts.items()},
                  "peak_mb": result.peak_memory_mb + context}))
"""


def full_rows_file(root: Path) -> str:
    """ShareGPT conversations whose reply is longer than any max_seq_length here: every row is cut to full length,
    the worst case the estimate assumes (real data leaves most rows shorter)."""
    reply = "the model reads every token of this reply and learns to write it again. " * 200
    rows = [
        {"conversations": [{"from": "human", "value": f"Write reply {i}."}, {"from": "gpt", "value": reply}]}
        for i in range(400)
    ]
    path = root / "full_rows.json"
    path.write_text(json.dumps(rows))
    return str(path)


def gpu_configs(shapes: list[str], root: Path) -> list[tuple[str, list[str]]]:
    """4-bit and bf16 trials of real model shapes at the lengths, batches and ranks a GPU search uses."""
    from trial_speed import build_shape

    configs = []
    data = f"data.sources.0.path={full_rows_file(root)}"
    for shape in shapes:
        model = [f"model.name={build_shape(shape, root)}", "model.chat_template=chatml", data]
        length = {n: f"model.max_seq_length={n}" for n in (1024, 2048)}
        configs += [
            (f"{shape} 4-bit, len 2048, batch 1", [*model, length[2048], "train.batch_size=1"]),
            (f"{shape} 4-bit, len 2048, batch 2", [*model, length[2048], "train.batch_size=2"]),
            (
                f"{shape} 4-bit, len 2048, batch 4, r 64",
                [*model, length[2048], "train.batch_size=4", "lora.r=64", "lora.alpha=64"],
            ),
            (f"{shape} 4-bit, len 1024, batch 8", [*model, length[1024], "train.batch_size=8"]),
            (
                f"{shape} 4-bit, len 1024, batch 2, no checkpointing",
                [*model, length[1024], "train.batch_size=2", "train.gradient_checkpointing=false"],
            ),
            (
                f"{shape} bf16, len 2048, batch 2",
                [*model, "model.load_in_4bit=false", length[2048], "train.batch_size=2"],
            ),
        ][: 6 if shape == shapes[0] else 3]
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=[], help="real model shapes on a GPU instead of the CPU set")
    args = parser.parse_args()
    print("| trial | estimate MB | measured peak MB | error | largest parts of the estimate |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as root:
        configs = gpu_configs(args.shapes, Path(root)) if args.shapes else CONFIGS
        for name, overrides in configs:
            with tempfile.TemporaryDirectory() as out:
                done = subprocess.run(
                    [sys.executable, "-c", RUN_ONE, *COMMON, *overrides, f"output.dir={out}/run"],
                    capture_output=True,
                    text=True,
                )
            if done.returncode:
                print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | | | |", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            parts = sorted(row["parts"].items(), key=lambda kv: -kv[1])[:3]
            error = (row["estimate_mb"] - row["peak_mb"]) / row["peak_mb"]
            print(
                f"| {name} | {row['estimate_mb']:,.0f} | {row['peak_mb']:,.0f} | {100 * error:+.0f}% | "
                + ", ".join(f"{k} {v:,.0f}" for k, v in parts)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()

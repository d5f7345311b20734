"""Sixteen QLoRA trials on one GPU, five ways: prints the makespan, the training tokens per second of the whole GPU
and the peak memory of each way.

  python bench/gpu_search.py                    # GPU: Llama-3.2-1B shape (random weights), 4-bit, 16 trials x 60 steps
  python bench/gpu_search.py --smoke            # the same code on a CPU: tiny shape, 4 trials x 6 steps
  python bench/gpu_search.py --ways packed8 packed4 shared4 --json out.json   # some ways; rows also as JSON

| way | what |
| --- | --- |
| usual | one trial at a time, the base model loaded (and quantized) for every trial, as a notebook loop does (no Ray) |
| solo | a fika search (Ray Tune, FIFO, the grid below): one trial at a time, its worker keeps the base model loaded |
| sharedN | the same search with N trials at once on the GPU, each in its own worker (`resources.gpu: 1/N`) |
| packedK | the same search with a pack of K trials on one loaded base model (`resources.pack: K`); a waiting trial joins
  the pack when one ends |

The trials are the grid of rank (8, 16, 32, 64, alpha = r) x learning rate (1e-4, 2e-4, 5e-4, 1e-3), LoRA dropout
0.05, at the notebook's batch 2 x accumulation 4, on synthetic ShareGPT conversations (made here, seeded) of up to
`--length` byte tokens. Ways run in the order given and print their row as they end, so a run cut short keeps the
rows it finished. Memory is the largest peak of one trial (`peak_memory_mb`: CUDA's allocated bytes, or the
resident set on a CPU; a packed trial's peak is its pack's); for sharedN the sum of the N largest.

On a lent GPU machine without a package registry, carry the packages its image lacks as wheels (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import yaml
from trial_speed import SHAPES, build_shape

from fika.config import dump_config, load_config
from fika.result import load_result
from fika.trial import TrialInputs, run_trial

WORDS = [
    "the",
    "a",
    "model",
    "trains",
    "on",
    "data",
    "and",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "code",
    "math",
    "science",
    "history",
    "language",
]


def write_conversations(path: Path, count: int, length: int, seed: int = 0) -> Path:
    """ShareGPT-format conversations of random words, a human turn and an answer up to about `length` characters."""
    rng = random.Random(seed)

    def text(limit: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(limit // 12, limit // 5)))

    with path.open("w") as f:
        for i in range(count):
            turns = [{"from": "human", "value": text(length // 4)}, {"from": "gpt", "value": text(length)}]
            f.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")
    return path


RANKS, RATES = (8, 16, 32, 64), (1e-4, 2e-4, 5e-4, 1e-3)


def trial_configs(model_dir: str, data: Path, out: Path, trials: int, steps: int, length: int) -> list:
    """The first `trials` points of the grid, each with its own output folder."""
    configs = []
    for i in range(trials):
        r, lr = RANKS[i % 4], RATES[(i // 4) % 4]
        overrides = [
            f"model.name={model_dir}",
            "model.chat_template=chatml",
            "model.load_in_4bit=true",
            f"model.max_seq_length={length}",
            f"data.sources=[{{path: {data}, name: synthetic}}]",
            "data.eval_size=16",
            f"train.max_steps={steps}",
            f"train.warmup_steps={min(5, steps - 1)}",
            "train.batch_size=2",
            "train.gradient_accumulation=4",
            f"lora.r={r}",
            f"lora.alpha={r}",
            "lora.dropout=0.05",
            f"train.learning_rate={lr}",
            f"output.dir={out / f'trial{i}'}",
        ]
        configs.append(load_config(None, overrides))
    return configs


def run_usual(configs: list) -> list:
    return [run_trial(c) for c in configs]


def run_search(way: str, configs: list, gpu: bool) -> list:
    """The trials as a fika search on Ray Tune (see the module docstring): solo, sharedN or packedK."""
    import fika.search

    folder = Path(configs[0].output.dir).parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(dump_config(configs[0]))
    n = len(configs)
    pairs = [[r, r] for r in RANKS[: min(4, n)]]
    rates = list(RATES[: max(1, (n + 3) // 4)])
    at_once = int(way.removeprefix("shared")) if way.startswith("shared") else 1
    pack = int(way.removeprefix("packed")) if way.startswith("packed") else 1
    cpu = 2 if not gpu and at_once == 1 else 1
    spec = {
        "name": way,
        "base": str(folder / "base.yaml"),
        "space": {"lora.r,lora.alpha": {"choice": pairs}, "train.learning_rate": {"choice": rates}},
        "searcher": "grid",
        "num_samples": 1,
        "baseline": False,
        "scheduler": {"kind": "fifo"},
        "resources": {"cpu": cpu, "gpu": (1 / at_once) if gpu else 0, "pack": pack},
        "storage": str(folder / "runs"),
        "report_dir": str(folder / "report"),
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    fika.search.run(str(folder / "spec.yaml"))
    return [load_result(p) for p in sorted((folder / "runs" / way / "trials").glob("*/"))]


def run_way(way: str, configs: list, gpu: bool) -> list:
    return run_usual(configs) if way == "usual" else run_search(way, configs, gpu)


def measure(way: str, configs: list, gpu: bool) -> dict:
    began = time.perf_counter()
    results = run_way(way, configs, gpu)
    makespan = time.perf_counter() - began
    statuses = sorted({r.status for r in results})
    peaks = [r.peak_memory_mb for r in results]
    memory = sum(sorted(peaks)[-int(way.removeprefix("shared")) :]) if way.startswith("shared") else max(peaks)
    tokens = sum(r.tokens_seen for r in results)
    return {
        "way": way,
        "trials": len(results),
        "statuses": ",".join(statuses),
        "makespan_s": round(makespan, 1),
        "tokens_per_s": round(tokens / makespan),
        "peak_memory_mb": round(memory),
        "memory_kind": results[0].memory_kind,
        "median_s_per_step": sorted(r.seconds_per_step or 0 for r in results)[len(results) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 4 trials of 6 steps, ways for 2 CPU cores")
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--length", type=int, default=1024, help="model.max_seq_length (byte tokens)")
    parser.add_argument("--ways", nargs="*", default=["packed8", "packed4", "shared4", "solo", "usual"])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--deadline-s", type=float, help="start no way after this many seconds (a device call's limit)")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.trials, args.steps, args.length = "tiny-llama", 4, 6, 256
        args.ways = ["packed4", "packed2", "shared2", "solo", "usual"]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device}, torch {torch.__version__}; {args.trials} trials of {args.steps} steps, {args.shape} in 4-bit")
    print("| way | trials | statuses | makespan s | tokens/s | peak memory MB | kind | median s/step |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_shape(args.shape, root)
        data = write_conversations(root / "conversations.jsonl", 50 * args.trials + 100, args.length)
        TrialInputs(
            trial_configs(model_dir, data, root, 1, args.steps, args.length)[0]
        ).mix()  # tokenized once, untimed
        for way in args.ways:
            if args.deadline_s and time.perf_counter() - started > args.deadline_s:
                print(f"| {way} | skipped: past --deadline-s {args.deadline_s:.0f} |", flush=True)
                continue
            configs = trial_configs(model_dir, data, root / way, args.trials, args.steps, args.length)
            rows.append(measure(way, configs, device != "cpu"))
            print("| " + " | ".join(str(v) for v in rows[-1].values()) + " |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Sixteen QLoRA trials on one GPU, five ways: prints the makespan, the training tokens per second of the whole GPU
and the peak memory of each way.

  python bench/gpu_search.py                    # GPU: Llama-3.2-1B shape (random weights), 4-bit, 16 trials x 60 steps
  python bench/gpu_search.py --smoke            # the same code on a CPU: tiny shape, 4 trials x 6 steps
  python bench/gpu_search.py --ways packed8 packed4 shared4 --json out.json   # some ways; rows also as JSON

| way | what |
| --- | --- |
| usual | one trial at a time, the base model loaded (and quantized) for every trial, as a notebook loop does |
| solo | fika's search worker: one trial at a time, the base model loaded once (`run_trial(keep_loaded=True)`) |
| sharedN | N processes share the GPU, each training its share of the trials as `solo` does (`resources.gpu: 1/N`) |
| packedK | one process, one base model, a pack of K trials (`fika.pack`); a waiting trial joins when one ends |

The trials are a grid of rank (8, 16, 32, 64) x learning rate (1e-4, 2e-4, 5e-4, 1e-3), half of them with dropout
0.05, each with its own seed, at the notebook's batch 2 x accumulation 4, on synthetic ShareGPT conversations
(made here, seeded) of up to `--length` byte tokens. Ways run in the order given and print their row as they end,
so a run cut short keeps the rows it finished. Memory is the largest peak of one trial (`peak_memory_mb`: CUDA's
allocated bytes, or the resident set on a CPU); for sharedN the sum over its processes.

On a lent GPU machine without a package registry, carry the packages its image lacks as wheels (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trial_speed import SHAPES, build_shape

from fika.config import dump_config, load_config
from fika.pack import Pack
from fika.trial import TrialInputs, run_trial

SHAPES["tiny-llama"] = dict(  # the smoke test's shape: seconds on a CPU
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
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


def trial_configs(model_dir: str, data: Path, out: Path, trials: int, steps: int, length: int) -> list:
    """`trials` points of the grid, each with its own seed and output folder."""
    configs = []
    for i in range(trials):
        r, lr = (8, 16, 32, 64)[i % 4], (1e-4, 2e-4, 5e-4, 1e-3)[(i // 4) % 4]
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
            f"lora.dropout={0.05 if i % 2 else 0.0}",
            f"train.learning_rate={lr}",
            f"train.seed={i}",
            f"output.dir={out / f'trial{i}'}",
        ]
        configs.append(load_config(None, overrides))
    return configs


def run_usual(configs: list) -> list:
    return [run_trial(c) for c in configs]


def run_solo(configs: list) -> list:
    return [run_trial(c, keep_loaded=True) for c in configs]


def run_shared(configs: list, processes: int) -> list:
    """`processes` workers at once, each training every `processes`-th trial in its own process."""
    from fika.result import load_result

    folder = Path(configs[0].output.dir).parent / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    workers = []
    for w in range(processes):
        paths = []
        for i, config in enumerate(configs[w::processes]):
            paths.append(folder / f"worker{w}-{i}.yaml")
            paths[-1].write_text(dump_config(config))
        workers.append(subprocess.Popen([sys.executable, __file__, "--worker", *map(str, paths)]))
    if any(worker.wait() for worker in workers):
        raise RuntimeError("a shared worker failed")
    return [load_result(Path(c.output.dir)) for c in configs]


def run_packed(configs: list, size: int) -> list:
    """One pack of at most `size` trials; a waiting trial joins at the next micro-step after one ends."""
    pack = Pack(configs[0].model, activation_checkpointing=configs[0].train.gradient_checkpointing)
    waiting, results = list(configs), []
    while waiting or pack.members:
        while waiting and len(pack.members) < size:
            pack.add(waiting.pop(0))
        results += pack.step()
    return results


def run_way(way: str, configs: list) -> list:
    if way == "usual":
        return run_usual(configs)
    if way == "solo":
        return run_solo(configs)
    if way.startswith("shared"):
        return run_shared(configs, int(way.removeprefix("shared")))
    return run_packed(configs, int(way.removeprefix("packed")))


def measure(way: str, configs: list) -> dict:
    began = time.perf_counter()
    results = run_way(way, configs)
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
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)  # a sharedN process: its trials' configs
    args = parser.parse_args()
    if args.worker:
        run_solo([load_config(path) for path in args.worker])
        return
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
            rows.append(measure(way, configs))
            print("| " + " | ".join(str(v) for v in rows[-1].values()) + " |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

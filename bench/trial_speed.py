"""Times one trial per setting and prints a table: time to first step, seconds per step, tokens/s, peak memory.

  python bench/trial_speed.py                               # CPU: tiny and SmolLM2-135M at two lengths
  python bench/trial_speed.py --shapes llama-3.2-1b llama-3.2-3b --steps 10   # GPU: 4-bit QLoRA and bf16 LoRA

`--head all` times trl's own CPU choice for its fused LM head (every position projected) instead of fika's
(labelled positions only); `--threads 1` times a trial as a 2-at-a-time search on 2 cores runs it; `--only TEXT`
keeps the CPU settings that contain TEXT (`--only max_seq_length=128`).

`--shapes` builds randomly initialised models of real sizes (Llama-3.2-1B/3B, SmolLM2-1.7B, Qwen2.5-1.5B; no
download: speed and memory do not depend on the weights) and trains them through the real trial path, in
4-bit (two accumulations) and unquantized bf16, instead of the CPU settings. `--data` trains on a local
ShareGPT file instead of the built-in data.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fika.config import load_config
from fika.model import build_tiny_tokenizer, device_kind, tiny_llama_config
from fika.trial import run_trial


def tiny_shape() -> dict:
    """The shape of fika's `tiny` test model (fika.model.tiny_llama_config), with a 512-token vocabulary and tied
    embeddings like the Llama-3.2 shapes."""
    config = tiny_llama_config(512)
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    return {key: getattr(config, key) for key in keys} | {"tie_word_embeddings": True}


SHAPES = {  # from the published configs (as Llama blocks: Qwen2's q/k/v biases are left out)
    "tiny-llama": tiny_shape(),  # fika's `tiny` test model: seconds on a CPU (`bench/gpu_search.py --smoke`)
    "llama-3.2-1b": dict(
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        vocab_size=128_256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        vocab_size=49_152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151_936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}

CPU_SETTINGS = [
    ("tiny", ["model.name=tiny", "model.max_seq_length=256", "train.gradient_accumulation=1"]),
    ("smollm2-135m", ["model.max_seq_length=128", "train.gradient_accumulation=1"]),
    ("smollm2-135m", ["model.max_seq_length=256", "train.gradient_accumulation=1"]),
    ("smollm2-135m", ["model.max_seq_length=256", "train.gradient_accumulation=4"]),
]


def build_shape(name: str, root: Path) -> str:
    """A local model dir of a real model shape with random weights and a ChatML byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, rope_theta=500_000.0, **SHAPES[name])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = root / name
    model.save_pretrained(out)
    build_tiny_tokenizer().save_pretrained(out)
    del model
    return str(out)


def measure(label: str, overrides: list[str], steps: int, data: str | None = None) -> dict:
    source = [f"data.sources.0.path={data}"] if data else []
    config = load_config(
        None,
        [
            "data.eval_size=16",
            f"train.max_steps={steps}",
            f"train.eval_steps=[{steps}]",
            "output.save_adapter=false",
            *source,
            *overrides,
        ],
    )
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        result = run_trial(
            config.model_copy(update={"output": config.output.model_copy(update={"dir": tmp})}), records.append
        )
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(records, records[1:], strict=False)]
    per_step = statistics.median(times[:-1] or times)  # the last step also evaluates
    tokens_per_step = records[-1]["tokens_seen"] / len(records)
    return {
        "setting": label,
        "device": result.device,
        "len": config.model.max_seq_length,
        "batch x accum": f"{config.train.batch_size} x {config.train.gradient_accumulation}",
        "first step s": f"{result.time_to_first_step_s:.1f}",
        "s/step": f"{per_step:.2f}",
        "tokens/s": f"{tokens_per_step / per_step:,.0f}",
        f"{result.memory_kind} peak MB": f"{result.peak_memory_mb:,.0f}",
        "trainable": f"{result.trainable_params:,}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--shapes", nargs="*", default=[], choices=sorted(SHAPES))
    parser.add_argument("--data", help="a local ShareGPT file to train on (default: the built-in data)")
    parser.add_argument(
        "--head",
        choices=["labelled", "all"],
        default="labelled",
        help="positions trl's fused LM head projects on a CPU (all: trl's own choice)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: every core)")
    parser.add_argument("--only", default="", help="the CPU settings whose label or overrides contain this text")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.head == "all":
        import fika.trial

        fika.trial.score_labelled_positions_only = lambda: None
    settings = [] if args.shapes else [s for s in CPU_SETTINGS if args.only in " ".join([s[0], *s[1]])]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for shape in args.shapes:
            model = [
                f"model.name={build_shape(shape, Path(root))}",
                "model.chat_template=chatml",
                "model.max_seq_length=2048",
            ]
            for accumulation in (4, 8):
                settings.append((f"{shape} 4-bit", [*model, f"train.gradient_accumulation={accumulation}"]))
            settings.append((f"{shape} bf16", [*model, "model.load_in_4bit=false", "train.gradient_accumulation=4"]))
        for label, overrides in settings:
            rows.append(measure(label, overrides, args.steps, args.data))
            print(rows[-1], flush=True)
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    print(f"device: {device_kind()}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(headers, widths, strict=True)))


if __name__ == "__main__":
    main()

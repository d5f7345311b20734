"""One LoRA trial: trl's SFTTrainer on a peft model, observed step by step. Knows nothing of Ray.

`run_trial(config, report)` calls `report(record)` after every logged step with the step, the train loss,
its mean over the last 10 steps, learning rate, grad norm, tokens seen and elapsed seconds; at each eval
step the record also holds `eval_loss`, the per-token loss on the fixed held-out set. A non-finite loss
stops the run as `diverged`; a `report` that returns True stops it as `stopped` (an early-stopping
scheduler's decision, made by the caller). The output dir receives `config.yaml` (resolved) at the start,
`metrics.jsonl` line by line as steps arrive, and `result.json` at the end (also when the trial fails).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fika.config import TrialConfig, dump_config

SMOOTHING_WINDOW = 10
Report = Callable[[dict], None]


@dataclass
class TrialResult:
    """What one trial produced; written to `result.json`."""

    status: str = "running"  # completed | diverged | stopped | failed
    steps: int = 0
    max_steps: int = 0
    train_loss: float | None = None
    train_loss_smooth: float | None = None
    eval_loss: float | None = None
    eval_losses: dict[int, float] = field(default_factory=dict)
    tokens_seen: int = 0
    started_at: float = 0.0  # unix time
    ended_at: float = 0.0
    wall_time_s: float = 0.0
    time_to_first_step_s: float | None = None
    peak_memory_mb: float = 0.0
    memory_kind: str = "rss"
    trainable_params: int = 0
    total_params: int = 0
    device: str = "cpu"
    data_fingerprint: str = ""
    output_dir: str = ""
    adapter_dir: str | None = None
    merged_dir: str | None = None
    error: str | None = None


def write_atomic(path: Path, content: str | bytes) -> None:
    """Writes a file so that a reader sees the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    tmp.replace(path)


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak GPU memory allocated by torch, or the process's peak resident set size on a CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "gpu"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"


def evaluate_loss(model, dataset, collator, batch_size: int = 8) -> float:
    """Per-token cross-entropy over every labelled token of `dataset`, independent of batching."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += loss.item()
            count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def scheduler_kwargs(config: TrialConfig) -> dict:
    """`cosine_with_restarts` needs its cycle count passed explicitly (with 1 it is plain cosine)."""
    if config.train.lr_scheduler == "cosine_with_restarts":
        return {"num_cycles": config.train.num_cycles}
    return {}


def make_callback(trial: TrialRun):
    """A transformers TrainerCallback that feeds the TrialRun's observers (built lazily: heavy imports)."""
    from transformers import TrainerCallback

    class Observer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trial.result.max_steps = state.max_steps
            trial.eval_steps.add(state.max_steps)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if trial.result.time_to_first_step_s is None:
                trial.result.time_to_first_step_s = round(time.perf_counter() - trial.started, 3)
            if state.global_step in trial.eval_steps:
                control.should_log = True
                trial.pending_eval = evaluate_loss(model, trial.eval_dataset, trial.collator)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and trial.observe(state.global_step, logs):
                control.should_training_stop = True

    return Observer()


class TrialRun:
    """The state of one running trial: result, loss window, eval schedule, metrics file."""

    def __init__(self, config: TrialConfig, report: Report | None, out: Path):
        self.report = report
        self.out = out
        self.result = TrialResult(output_dir=str(out), started_at=time.time())
        self.started = time.perf_counter()
        self.losses: list[float] = []
        self.eval_steps = set(config.train.eval_steps)
        self.pending_eval: float | None = None
        self.eval_dataset = None
        self.collator = None
        self.metrics = (out / "metrics.jsonl").open("w")

    def observe(self, step: int, logs: dict) -> bool:
        """Records one logged step, reports it, and returns True when training must stop (diverged)."""
        loss = float(logs["loss"])
        self.losses.append(loss)
        smooth = sum(self.losses[-SMOOTHING_WINDOW:]) / len(self.losses[-SMOOTHING_WINDOW:])
        record = {
            "step": step,
            "train_loss": loss,
            "train_loss_smooth": smooth,
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_seen": int(logs.get("num_tokens", 0)),
            "elapsed_s": round(time.perf_counter() - self.started, 3),
            "max_steps": self.result.max_steps,
        }
        if self.pending_eval is not None:
            record["eval_loss"] = self.pending_eval
            self.result.eval_losses[step] = self.pending_eval
            self.result.eval_loss = self.pending_eval
            self.pending_eval = None
        grad_norm = record["grad_norm"]
        diverged = not all(
            math.isfinite(x) for x in (loss, record.get("eval_loss", 0.0), grad_norm if grad_norm is not None else 0.0)
        )
        self.result.steps = step
        self.result.train_loss, self.result.train_loss_smooth = loss, smooth
        self.result.tokens_seen = record["tokens_seen"]
        if diverged:
            self.result.status = record["status"] = "diverged"
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        stop = self.report is not None and bool(self.report(record))
        if stop and not diverged:
            self.result.status = "stopped"
        return diverged or stop

    def finish(self, status: str, error: str | None = None) -> TrialResult:
        """Fills in the totals and writes `result.json`."""
        self.metrics.close()
        if status == "failed" or self.result.status == "running":
            self.result.status = status
        self.result.error = error
        self.result.wall_time_s = round(time.perf_counter() - self.started, 3)
        self.result.ended_at = time.time()
        self.result.peak_memory_mb, self.result.memory_kind = peak_memory_mb(self.result.device)
        write_atomic(self.out / "result.json", json.dumps(asdict(self.result), indent=1))
        return self.result


def training_args(config: TrialConfig, out: Path, device: str):
    """The SFTConfig of a trial: no checkpoints, no trainer-side eval (fika evaluates), data prepared by fika."""
    from trl import SFTConfig

    from fika.model import compute_dtype

    optimizer = config.train.optimizer if device == "cuda" else "adamw_torch"
    dtype = compute_dtype()
    return SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=config.train.max_steps,
        num_train_epochs=config.train.epochs,
        per_device_train_batch_size=config.train.batch_size,
        gradient_accumulation_steps=config.train.gradient_accumulation,
        learning_rate=config.train.learning_rate,
        lr_scheduler_type=config.train.lr_scheduler,
        lr_scheduler_kwargs=scheduler_kwargs(config),
        warmup_steps=config.train.warmup_steps,
        weight_decay=config.train.weight_decay,
        optim=optimizer,
        max_grad_norm=config.train.max_grad_norm,
        activation_checkpointing=config.train.gradient_checkpointing and device == "cuda",
        seed=config.train.seed,
        data_seed=config.train.seed,
        logging_steps=config.train.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach fika's divergence check, not be averaged away
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=device == "cuda" and str(dtype) == "torch.bfloat16",
        fp16=device == "cuda" and str(dtype) == "torch.float16",
        use_cpu=device == "cpu",
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized once by fika.data, read from its cache
        max_length=None,
        dataloader_num_workers=0,
    )


def run_trial(
    config: TrialConfig, report: Report | None = None, base_model=None, keep_base_model: bool = False
) -> TrialResult:
    """Trains one LoRA trial and returns its result; the tokenized mix is loaded from the cache (or built).

    `base_model` is an already loaded base model of `config.model`; `keep_base_model=True` loads it once per process and keeps it for
    the next trial (a search worker). Either way the LoRA layers are removed again when the trial ends,
    leaving the base weights as they were.
    """
    import torch
    from peft import get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from fika.data import prepare_data
    from fika.model import device_kind, kept_base_model, load_base_model, load_tokenizer, lora_config

    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", dump_config(config))
    trial = TrialRun(config, report, out)
    trial.result.device = device = device_kind()
    model = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        tokenizer = load_tokenizer(config.model)
        mix = prepare_data(config.data, tokenizer, config.model.max_seq_length)
        trial.result.data_fingerprint = mix.fingerprint
        train_dataset, eval_dataset = mix.train, mix.eval
        if not config.train.assistant_only_loss:  # the collator then trains on every token
            train_dataset, eval_dataset = train_dataset.remove_columns("labels"), eval_dataset.remove_columns("labels")
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
        trial.eval_dataset, trial.collator = eval_dataset, collator

        set_seed(config.train.seed)
        if base_model is not None:
            base = base_model
        else:
            base = (kept_base_model if keep_base_model else load_base_model)(config.model, tokenizer)
        model = get_peft_model(base, lora_config(config.lora))
        trial.result.trainable_params, trial.result.total_params = model.get_nb_trainable_parameters()
        trainer = SFTTrainer(
            model=model,
            args=training_args(config, out, device),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            data_collator=collator,
            callbacks=[make_callback(trial)],
        )
        trainer.remove_callback(PrinterCallback)  # fika reports steps itself
        trainer.train()
        if trial.result.status == "running" and config.output.save_adapter:
            adapter_dir = out / "adapter"
            model.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            write_atomic(adapter_dir / "fika.yaml", dump_config(config))  # the base model and template, for serving
            trial.result.adapter_dir = str(adapter_dir)
            if config.output.save_merged:
                trial.result.merged_dir = str(save_merged(config, adapter_dir, out / "merged"))
    except Exception as err:
        trial.finish("failed", f"{type(err).__name__}: {err}")
        raise
    finally:
        if model is not None:
            model.unload()  # the base model loses its LoRA layers, ready for the next trial
    return trial.finish("completed")


def save_merged(config: TrialConfig, adapter_dir: Path, out: Path) -> Path:
    """Merges the adapter into an unquantized copy of the base model (merging into 4-bit weights loses precision)."""
    from peft import PeftModel

    from fika.model import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, tokenizer, quantize=False)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

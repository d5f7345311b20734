"""One LoRA run: trl's SFTTrainer on a peft model, observed step by step. Knows nothing of Ray.

`run_trial(config, report)` calls `report(record)` after every logged step with the step, the train loss,
its mean over the last 10 steps, learning rate, grad norm, tokens seen, the step's own time and elapsed
seconds; at each eval step the record also holds `eval_loss`, the per-token loss on the fixed held-out set
(fika.evaluate). A non-finite loss stops the run as `diverged`; a `report` that returns True stops it as
`stopped` (an early-stopping scheduler's decision, made by the caller); an `interrupted` callable that returns
True (the user's Ctrl-C or a scheduler's SIGTERM, seen by the caller) ends it after the current step as
`interrupted`, with a checkpoint of that step when checkpoints are on, so `resume=True` loses nothing.

The output dir is created only once the tokenizer and the data are ready, and receives `config.yaml`
(resolved), `data.json` (rows and tokens per source), `metrics.jsonl` and `evals.jsonl` (each eval's loss
per held-out conversation) line by line as steps arrive, and `result.json` at the end (also on failure).
A long run (`train.checkpoints: true`) saves a checkpoint at every eval step and continues after a kill
with `run_trial(config, resume=True)`: same data order, no step counted twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fika.common import (
    FikaError,
    exclusive_folder,
    folder_written_whole,
    kept,
    out_of_space,
    read_json,
    read_jsonl,
    write_atomic,
)
from fika.config import TrialConfig, dump_config

SMOOTHING_WINDOW = 10
OUTPUT_FILES = ("config.yaml", "data.json", "metrics.jsonl", "evals.jsonl", "result.json")
OUTPUT_DIRS = ("adapter", "merged", "checkpoints", "trainer", "tracking")
FAULT_ENV = "FIKA_FAIL_AT_STEP"  # fault injection for tests: raise a simulated out-of-memory error at that step
Report = Callable[[dict], bool | None]


@dataclass
class TrialResult:
    """What one trial produced; written to `result.json`."""

    status: str = "running"  # completed | diverged | stopped | interrupted | failed
    steps: int = 0
    max_steps: int = 0
    train_loss: float | None = None
    train_loss_smooth: float | None = None
    eval_loss: float | None = None
    eval_losses: dict[int, float] = field(default_factory=dict)
    eval_per_source: dict[str, float] = field(default_factory=dict)
    tokens_seen: int = 0
    started_at: float = 0.0  # unix time
    ended_at: float = 0.0
    wall_time_s: float = 0.0
    time_to_first_step_s: float | None = None
    step_time_s: float = 0.0  # training steps only: no eval, no start-up
    eval_time_s: float = 0.0
    seconds_per_step: float | None = None  # median training step
    peak_memory_mb: float = 0.0
    memory_kind: str = "rss"
    trainable_params: int = 0
    total_params: int = 0
    device: str = "cpu"
    cpu_threads: int = 0  # torch's intra-op threads
    quantized: bool = False
    data_fingerprint: str = ""
    output_dir: str = ""
    adapter_dir: str | None = None
    merged_dir: str | None = None
    resumed_from: int | None = None
    error: str | None = None


def load_result(directory: Path) -> TrialResult | None:
    """The result.json of a run folder, or None when it is missing or cut short."""
    data = read_json(Path(directory) / "result.json")
    if not isinstance(data, dict):
        return None
    known = {k: v for k, v in data.items() if k in TrialResult.__dataclass_fields__}
    result = TrialResult(**known)
    result.eval_losses = {int(k): v for k, v in result.eval_losses.items()}
    return result


def write_failed_result(directory: Path, error: str) -> None:
    """Records a run that failed outside `run_trial` (before it started, or cut short by a killed process)."""
    result = TrialResult(status="failed", output_dir=str(directory), error=error, ended_at=time.time())
    write_atomic(Path(directory) / "result.json", json.dumps(asdict(result), indent=1))


# --- memory ---------------------------------------------------------------------------------------------


def reset_peak_memory(device: str) -> None:
    """Starts a new peak for this trial: the CUDA allocator's, or the process's resident-set high-water mark."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets VmHWM, so a reused worker does not inherit an earlier trial's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak GPU memory allocated by torch, or the peak resident set since `reset_peak_memory`."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "gpu"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss (process lifetime)"


# --- the eval schedule and the step observer ----------------------------------------------------------


def eval_schedule(config: TrialConfig, max_steps: int) -> set[int]:
    """The steps with a full eval: every `eval_every`, `num_evals` evenly spaced, or `eval_steps`; and the last."""
    t = config.train
    if t.eval_every:
        steps = set(range(t.eval_every, max_steps + 1, t.eval_every))
    elif t.num_evals:
        steps = {max(1, round(max_steps * (i + 1) / t.num_evals)) for i in range(t.num_evals)}
    elif t.eval_steps is not None:
        steps = {s for s in t.eval_steps if s <= max_steps}
    else:
        steps = {round(max_steps / 3), round(2 * max_steps / 3)} - {0}
    return steps | {max_steps}


def scheduler_kwargs(config: TrialConfig) -> dict:
    """`cosine_with_restarts` needs its cycle count passed explicitly (with 1 it is plain cosine)."""
    if config.train.lr_scheduler == "cosine_with_restarts":
        return {"num_cycles": config.train.num_cycles}
    return {}


class TrialRun:
    """The state of one running trial: result, loss window, evals, timings, metrics files, checkpoints."""

    def __init__(
        self,
        config: TrialConfig,
        report: Report | None,
        out: Path,
        quick_evals: tuple[list[int], int] | None,
        interrupted: Callable[[], bool] | None = None,
    ):
        self.config, self.report, self.out, self.interrupted = config, report, out, interrupted
        self.result = TrialResult(output_dir=str(out), started_at=time.time())
        self.started = time.perf_counter()
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.eval_steps: set[int] = set()
        self.quick_steps, self.quick_size = quick_evals or ([], 0)
        self.pending: dict = {}
        self.step_began = 0.0
        self.eval_dataset = None
        self.pad_token_id = 0
        self.checkpoint_evals: dict[int, float] = {}
        self.fail_at = int(os.environ.get(FAULT_ENV, "0") or 0)

    def open_files(self, resume_step: int | None) -> None:
        """Opens metrics.jsonl and evals.jsonl: new, or cut back to a checkpoint's step when resuming."""
        for name in ("metrics.jsonl", "evals.jsonl"):
            path = self.out / name
            if resume_step is None:
                path.write_text("")
            else:
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.metrics = (self.out / "metrics.jsonl").open("a")
        self.evals = (self.out / "evals.jsonl").open("a")

    def restore(self, step: int) -> None:
        """Picks up the loss window, evals and timings of a resumed run from its metrics."""
        records = read_jsonl(self.out / "metrics.jsonl")
        self.losses = [r["train_loss"] for r in records]
        self.step_times = [r.get("step_time_s", 0.0) for r in records]
        for r in records:
            if "eval_loss" in r:
                self.result.eval_losses[r["step"]] = r["eval_loss"]
                self.result.eval_loss = r["eval_loss"]
                self.result.eval_per_source = r.get("eval_per_source", {})
                self.checkpoint_evals[r["step"]] = r["eval_loss"]
        self.result.resumed_from = step
        self.result.step_time_s = sum(self.step_times)
        self.result.eval_time_s = sum(r.get("eval_time_s", 0.0) for r in records)

    def run_eval(self, model, step: int, rows: list[int] | None = None):
        from fika.evaluate import evaluate

        began = time.perf_counter()
        result = evaluate(model, self.eval_dataset, self.pad_token_id, rows=rows)
        spent = time.perf_counter() - began
        self.result.eval_time_s += spent
        return result, spent

    def step_end(self, model, step: int) -> None:
        """Times the step just trained, then runs the evals due at this step (full, or a scheduler's subset)."""
        self.step_times.append(time.perf_counter() - self.step_began)
        self.result.step_time_s += self.step_times[-1]
        if self.result.time_to_first_step_s is None:
            self.result.time_to_first_step_s = round(time.perf_counter() - self.started, 3)
        if self.fail_at and step >= self.fail_at:
            raise RuntimeError(f"CUDA out of memory (simulated by {FAULT_ENV}={self.fail_at})")
        if step in self.eval_steps:
            result, spent = self.run_eval(model, step)
            self.evals.write(json.dumps(result.record(step)) + "\n")
            self.evals.flush()
            self.pending.update(eval_loss=result.loss, eval_per_source=result.per_source(), eval_time_s=round(spent, 3))
        elif step in self.quick_steps:
            from fika.evaluate import subset_rows

            result, spent = self.run_eval(model, step, subset_rows(self.eval_dataset["source"], self.quick_size))
            self.pending.update(eval_loss_subset=result.loss, eval_time_s=round(spent, 3))

    def observe(self, step: int, logs: dict, tokens_seen: int) -> bool:
        """Records one logged step, reports it, and returns True when training must stop."""
        loss = float(logs["loss"])
        self.losses.append(loss)
        window = self.losses[-SMOOTHING_WINDOW:]
        record = {
            "step": step,
            "train_loss": loss,
            "train_loss_smooth": sum(window) / len(window),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_seen": tokens_seen,
            "step_time_s": round(self.step_times[-1], 4) if self.step_times else None,
            "elapsed_s": round(time.perf_counter() - self.started, 3),
            "max_steps": self.result.max_steps,
            **self.pending,
        }
        self.pending = {}
        if "eval_loss" in record:
            self.result.eval_losses[step] = self.result.eval_loss = record["eval_loss"]
            self.result.eval_per_source = record["eval_per_source"]
        grad_norm = record["grad_norm"]
        values = (loss, record.get("eval_loss", 0.0), grad_norm if grad_norm is not None else 0.0)
        diverged = not all(math.isfinite(x) for x in values)
        self.result.steps = step
        self.result.train_loss, self.result.train_loss_smooth = loss, record["train_loss_smooth"]
        self.result.tokens_seen = tokens_seen
        if diverged:
            self.result.status = record["status"] = "diverged"
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        stop = self.report is not None and bool(self.report(record))
        if self.result.status == "running" and self.interrupted_at(step):  # asked to end, not a decision on it
            self.result.status = "interrupted"
        elif stop and self.result.status == "running" and step < self.result.max_steps:  # after its last: completed
            self.result.status = "stopped"
        return self.result.status != "running"

    def interrupted_at(self, step: int) -> bool:
        """Whether the run is asked to end after `step` (never after its last: it completes)."""
        return self.interrupted is not None and step < self.result.max_steps and self.interrupted()

    def saved(self, checkpoint: Path, step: int) -> None:
        """Marks a checkpoint complete (fika_state.json is written last) and keeps the last K and the best."""
        self.metrics.flush()
        self.evals.flush()
        write_atomic(checkpoint / "fika_state.json", json.dumps({"step": step, "eval_loss": self.result.eval_loss}))
        self.checkpoint_evals[step] = self.result.eval_losses.get(step, math.inf)
        done = sorted(complete_checkpoints(checkpoint.parent))
        keep = set(done[-self.config.train.keep_checkpoints :])
        scored = [s for s in done if math.isfinite(self.checkpoint_evals.get(s, math.inf))]
        if scored:
            keep.add(min(scored, key=lambda s: self.checkpoint_evals[s]))
        for s in done:
            if s not in keep:
                shutil.rmtree(checkpoint.parent / f"checkpoint-{s}", ignore_errors=True)

    def finish(self, status: str, error: str | None = None) -> TrialResult:
        """Fills in the totals and writes `result.json`."""
        for f in (getattr(self, "metrics", None), getattr(self, "evals", None)):
            if f is not None:
                f.close()
        if status == "failed" or self.result.status == "running":
            self.result.status = status
        self.result.error = error
        self.result.wall_time_s = round(time.perf_counter() - self.started, 3)
        self.result.ended_at = time.time()
        self.result.step_time_s = round(self.result.step_time_s, 3)
        self.result.eval_time_s = round(self.result.eval_time_s, 3)
        if self.step_times:
            self.result.seconds_per_step = round(statistics.median(self.step_times), 4)
        self.result.peak_memory_mb, self.result.memory_kind = peak_memory_mb(self.result.device)
        with contextlib.suppress(OSError):  # the trainer's folder stays only when it holds checkpoints
            (self.out / "checkpoints").rmdir()
        write_atomic(self.out / "result.json", json.dumps(asdict(self.result), indent=1))
        return self.result


def make_callback(trial: TrialRun, on_start: Callable[[int], None] | None):
    """A transformers TrainerCallback that feeds the TrialRun (built lazily: heavy imports)."""
    from transformers import TrainerCallback

    class Observer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trial.result.max_steps = state.max_steps
            trial.eval_steps = eval_schedule(trial.config, state.max_steps)
            if on_start is not None:
                on_start(state.max_steps)

        def on_step_begin(self, args, state, control, **kwargs):
            trial.step_began = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            trial.step_end(model, state.global_step)
            if state.global_step in trial.eval_steps:
                control.should_log = True
                control.should_save = trial.config.train.checkpoints
            if trial.result.status == "running" and trial.interrupted_at(state.global_step):
                trial.result.status = "interrupted"
                control.should_log = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and trial.observe(state.global_step, logs, state.num_input_tokens_seen):
                control.should_training_stop = True
                if trial.result.status == "interrupted":  # a whole step: its state is saved as is
                    control.should_save = trial.config.train.checkpoints

        def on_save(self, args, state, control, **kwargs):
            trial.saved(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    return Observer()


def complete_checkpoints(folder: Path) -> list[int]:
    """The steps of the checkpoints in `folder` that were written to the end (they hold fika_state.json)."""
    steps = []
    for path in folder.glob("checkpoint-*"):
        if (path / "fika_state.json").exists() and path.name.removeprefix("checkpoint-").isdigit():
            steps.append(int(path.name.removeprefix("checkpoint-")))
    return sorted(steps)


def training_args(config: TrialConfig, out: Path, device: str):
    """The SFTConfig of a trial: fika evaluates and checkpoints itself; data prepared by fika."""
    from trl import SFTConfig

    from fika.model import compute_dtype

    optimizer = config.train.optimizer if device == "cuda" else "adamw_torch"
    dtype = compute_dtype()
    if "tensorboard" in config.train.report_to:  # transformers' TensorBoard callback reads its folder from here
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tracking")
    # transformers 5.2x renamed gradient_checkpointing (now a deprecated alias); earlier 5.x know only the old name.
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in SFTConfig.__dataclass_fields__
        else "gradient_checkpointing"
    )
    checkpointing = {name: config.train.gradient_checkpointing and device == "cuda"}
    return SFTConfig(
        output_dir=str(out / "checkpoints"),
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
        **checkpointing,
        seed=config.train.seed,
        data_seed=config.train.seed,
        logging_steps=config.train.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach fika's divergence check, not be averaged away
        include_num_input_tokens_seen="non_padding",  # kept in checkpoints, so a resumed run counts on
        save_strategy="no",  # fika asks for a save at its eval steps when train.checkpoints is on
        save_only_model=False,
        eval_strategy="no",
        report_to=list(config.train.report_to) or "none",
        run_name=out.name,
        disable_tqdm=True,
        bf16=device == "cuda" and str(dtype) == "torch.bfloat16",
        fp16=device == "cuda" and str(dtype) == "torch.float16",
        use_cpu=device == "cpu",
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized once by fika.data, read from its cache
        max_length=None,
        dataloader_num_workers=0,
    )


def score_labelled_positions_only() -> None:
    """Makes trl's fused LM head project only the labelled positions on a CPU, as it does where Triton runs.

    trl's SFTTrainer computes the loss through a chunked LM head that skips the positions without a label on
    Triton devices, and projects every position elsewhere (so that XLA or Neuron compilers see fixed shapes).
    A CPU runs eagerly: there the skipped projections are waste, 8-15% of a SmolLM2 step at length 128 (its
    head is a quarter of the step). The losses and gradients are the same.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "__name__", "") == "compact_on_cpu":
        return

    def compact_on_cpu(device) -> bool:
        return device.type == "cpu" or original(device)

    trl_utils._use_triton = compact_on_cpu


def holds_a_run(out: Path) -> bool:
    """Whether `out` is the folder of a fika run: its config.yaml is a run's resolved config (every section)."""
    import yaml

    try:
        config = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and {"model", "lora", "train", "data", "output"} <= config.keys()


def check_output_dir(out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuses to write into a file, or into the folder of an earlier run unless asked to (`--overwrite`)."""
    if out.exists() and not out.is_dir():
        raise FikaError(f"output.dir: {str(out)!r} is a file; give a folder")
    earlier = [name for name in OUTPUT_FILES + OUTPUT_DIRS if (out / name).exists()]
    if resume:
        if not (out / "config.yaml").exists():
            raise FikaError(f"--resume: {str(out)!r} holds no run to resume (no config.yaml)")
        return
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if others and not holds_a_run(out):  # --overwrite would delete files that are not a run's
        listed = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise FikaError(f"output.dir: {str(out)!r} is not empty and holds no fika run (it holds {listed}); give a new "
                        "or empty folder")  # fmt: skip
    if earlier and not overwrite:
        result = load_result(out)
        what = f"{'an' if result.status[0] in 'aeiou' else 'a'} {result.status} run" if result else "an unfinished run"
        raise FikaError(
            f"output.dir: {str(out)!r} already holds {what}; pass --overwrite to replace it, --resume to continue "
            "it, or choose another output.dir"
        )
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise FikaError(f"output.dir: {str(out)!r} cannot be written (no permission on {parent})")


def clear_outputs(out: Path) -> None:
    """Removes what an earlier run wrote into `out` (for `--overwrite`); other files stay."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def import_trial_libraries() -> None:
    """Imports torch, transformers, peft and trl (once per process) with the garbage collector paused, then
    moves every object alive into the collector's permanent generation (`gc.freeze`).

    Those libraries leave about 600,000 objects that live as long as the process. Collecting while they are
    created costs about 1.2 s of a 7.5 s import on one CPU core, and every full collection afterwards would
    scan them all again (accelerate runs one whenever a training starts: 0.35 s; creating peft's layers
    triggers more): about 0.7 s of every later trial's start on a search worker.
    """
    import gc

    if "trl" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from trl import SFTTrainer  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def run_trial(
    config: TrialConfig,
    report: Report | None = None,
    base_model=None,
    keep_loaded: bool = False,
    resume: bool = False,
    quick_evals: tuple[list[int], int] | None = None,
    on_start: Callable[[int], None] | None = None,
    overwrite: bool = False,
    interrupted: Callable[[], bool] | None = None,
) -> TrialResult:
    """Trains one LoRA run and returns its result; the tokenized mix is loaded from the cache (or built).

    `base_model` is an already loaded base model of `config.model`; `keep_loaded=True` keeps the tokenizer, the
    tokenized mix and the base model loaded in this process for the next trial (a search worker). Either way
    the LoRA layers are removed again when the run ends, leaving the base weights as they were. `resume=True`
    continues from the last complete checkpoint in the output dir. `quick_evals` = (steps, size): cheaper evals
    on a stratified subset of the eval set, for a scheduler's rungs. `on_start(max_steps)` is called before the
    first step. `overwrite=True` first removes what an earlier run wrote there. `interrupted()` is asked after
    every step (see the module docstring). While it runs, the output dir is locked: a second run into it is
    refused (it would overwrite or interleave this one's files).
    """
    out = Path(config.output.dir).expanduser()
    with exclusive_folder(out, "output.dir", "a training run"):
        if overwrite:
            clear_outputs(out)
        try:
            return train_in_folder(
                config, out, report, base_model, keep_loaded, resume, quick_evals, on_start, interrupted
            )
        except Exception as err:
            then = "free space or pick another output.dir, then run it again (--overwrite replaces it)"
            full = out_of_space(err, out, "output.dir", then)
            if full is None:
                raise
            raise full from None


def train_in_folder(
    config: TrialConfig,
    out: Path,
    report: Report | None,
    base_model,
    keep_loaded: bool,
    resume: bool,
    quick_evals: tuple[list[int], int] | None,
    on_start: Callable[[int], None] | None,
    interrupted: Callable[[], bool] | None,
) -> TrialResult:
    """The body of `run_trial`, in its locked output dir `out`."""
    import_trial_libraries()
    import torch
    from peft import get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from fika.data import prepare_data
    from fika.model import device_kind, load_base_model, load_tokenizer, lora_config, wants_4bit

    keep = kept if keep_loaded else lambda _kind, _key, load: load()
    model_key = config.model.model_dump_json()
    tokenizer = keep("tokenizer", model_key, lambda: load_tokenizer(config.model))
    mix = keep("mix", model_key + config.data.model_dump_json(),
               lambda: prepare_data(config.data, tokenizer, config.model.max_seq_length))  # fmt: skip
    checkpoint = None
    if resume:
        steps = complete_checkpoints(out / "checkpoints")
        checkpoint = out / "checkpoints" / f"checkpoint-{steps[-1]}" if steps else None
    write_atomic(out / "config.yaml", dump_config(config))
    write_atomic(out / "data.json", json.dumps(mix.summary(), indent=1))
    trial = TrialRun(config, report, out, quick_evals, interrupted)
    trial.open_files(int(checkpoint.name.split("-")[1]) if checkpoint else 0 if resume else None)
    if checkpoint is not None:
        trial.restore(int(checkpoint.name.split("-")[1]))
    trial.result.device = device = device_kind()
    trial.result.cpu_threads = torch.get_num_threads()
    trial.result.quantized = wants_4bit(config.model)
    trial.result.data_fingerprint = mix.fingerprint
    reset_peak_memory(device)
    model = None
    try:
        train_dataset, eval_dataset = mix.train, mix.eval
        if not config.train.assistant_only_loss:  # the collator then trains on every token
            train_dataset = train_dataset.remove_columns("labels")
            eval_dataset = eval_dataset.map(lambda row: {"labels": row["input_ids"]})
        trial.eval_dataset, trial.pad_token_id = eval_dataset, tokenizer.pad_token_id
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

        set_seed(config.train.seed)
        base = (
            base_model
            if base_model is not None
            else keep("base model", model_key, lambda: load_base_model(config.model, tokenizer))
        )
        model = get_peft_model(base, lora_config(config.lora))
        score_labelled_positions_only()
        trial.result.trainable_params, trial.result.total_params = model.get_nb_trainable_parameters()
        trainer = SFTTrainer(
            model=model,
            args=training_args(config, out, device),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            data_collator=collator,
            callbacks=[make_callback(trial, on_start)],
        )
        trainer.remove_callback(PrinterCallback)  # fika reports steps itself
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if trial.result.status == "running" and config.output.save_adapter:
            adapter_dir = out / "adapter"
            with folder_written_whole(adapter_dir) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                write_atomic(tmp / "fika.yaml", dump_config(config))  # the base model and template, for serving
            trial.result.adapter_dir = str(adapter_dir)
            if config.output.save_merged:
                trial.result.merged_dir = str(save_merged(config, adapter_dir, out / "merged"))
    except Exception as err:
        with contextlib.suppress(OSError):  # a full disk may refuse the result too: the error raised says why
            trial.finish("failed", f"{type(err).__name__}: {str(err)[:500]}")
        raise
    finally:
        if model is not None:
            model.unload()  # the base model loses its LoRA layers, ready for the next trial
        if device == "cuda":
            torch.cuda.empty_cache()
    return trial.finish("completed")


def save_merged(config: TrialConfig, adapter_dir: Path, out: Path) -> Path:
    """Merges the adapter into an unquantized copy of the base model (merging into 4-bit weights loses precision)."""
    from peft import PeftModel

    from fika.model import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, tokenizer, quantize=False)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    with folder_written_whole(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def format_result(result: TrialResult) -> str:
    """The summary `fika train` prints at the end of a run."""
    evals = ", ".join(f"{step}: {loss:.4f}" for step, loss in sorted(result.eval_losses.items())) or "none"
    train = (
        f"{result.train_loss:.4f} (mean of the last 10 steps {result.train_loss_smooth:.4f})"
        if result.train_loss is not None
        else "none"
    )
    lines = [
        f"status      {result.status}" + (f" ({result.error})" if result.error else ""),
        f"steps       {result.steps}/{result.max_steps} on {result.device}"
        + (" (4-bit)" if result.quantized else "")
        + (f", torch threads {result.cpu_threads}" if result.device == "cpu" and result.cpu_threads else "")
        + (f", resumed at step {result.resumed_from}" if result.resumed_from else ""),
        f"train loss  {train}",
        f"eval loss   {evals}",
        f"tokens seen {result.tokens_seen:,}",
        f"time        {result.wall_time_s:.1f} s: first step after {result.time_to_first_step_s or 0:.1f} s, "
        f"{result.seconds_per_step or 0:.2f} s/step, evals {result.eval_time_s:.1f} s",
        f"peak memory {result.peak_memory_mb:,.0f} MB ({result.memory_kind})",
        f"parameters  {result.trainable_params:,} trainable of {result.total_params:,}",
        f"outputs     {result.output_dir}" + (f" (adapter: {result.adapter_dir})" if result.adapter_dir else ""),
    ]
    return "\n".join(lines)

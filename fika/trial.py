"""One LoRA run: trl's SFTTrainer on a peft model, observed step by step. Knows nothing of Ray.

`run_trial(config, report)` calls `report(record)` after every logged step with the step, the train loss,
its mean over the last 10 steps, learning rate, grad norm, tokens seen, the step's own time and elapsed
seconds; at each eval step the record also holds `eval_loss`, the per-token loss on the fixed held-out set
(fika.evaluate). A non-finite loss stops the run as `diverged`; a `report` that returns True stops it as
`stopped` (an early-stopping scheduler's decision, made by the caller); an `interrupted` hook that returns
True (the user's Ctrl-C or a scheduler's SIGTERM, seen by the caller) ends it after the current step as
`interrupted`, with a checkpoint of that step when checkpoints are on, so `resume=True` loses nothing
(fika.observe.TrialHooks).

The output dir is created only once the tokenizer and the data are ready, and receives `config.yaml`
(resolved), `data.json` (rows and tokens per source), `metrics.jsonl` and `evals.jsonl` (each eval's loss
per held-out conversation) line by line as steps arrive, and `result.json` at the end (also on failure).
A long run (`train.checkpoints: true`) saves a checkpoint at every eval step and continues after a kill
with `run_trial(config, resume=True)`: same data order, no step counted twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fika.config import TrialConfig, dump_config
from fika.errors import error_text
from fika.files import folder_written_whole, write_atomic
from fika.folder_lock import exclusive_folder
from fika.observe import Report, TrialHooks, TrialRun, complete_checkpoints, make_callback, reset_peak_memory
from fika.output_dir import clear_outputs
from fika.paths import out_of_space
from fika.result import TrialResult

_KEPT: dict[str, tuple[str, Any]] = {}


def kept(kind: str, key: str, load: Callable[[], Any]) -> Any:
    """What `load()` returns, loaded once per process and kept for later calls with the same `kind` and `key`.

    A search worker runs trial after trial: its tokenizer, tokenized mix and base model stay loaded (trials
    leave the base weights as they were: the LoRA layers are removed again). One value per kind: a new key frees
    the old value before loading its own.
    """
    if kind not in _KEPT or _KEPT[kind][0] != key:
        _KEPT.pop(kind, None)
        _KEPT[kind] = (key, load())
    return _KEPT[kind][1]


class TrialInputs:
    """What a run trains from: the tokenizer, the tokenized mix and the base model of its config, loaded when
    first asked for; kept in this process for the next trial when `keep_loaded` (a search worker)."""

    def __init__(self, config: TrialConfig, keep_loaded: bool = False, base_model=None, tokenizer=None):
        self.config, self.base_model, self.loaded_tokenizer = config, base_model, tokenizer
        self.keep_loaded = keep_loaded
        self.keep = kept if keep_loaded else lambda _kind, _key, load: load()
        self.model_key = config.model.model_dump_json()

    def tokenizer(self):
        from fika.model import load_tokenizer

        if self.loaded_tokenizer is not None:
            return self.loaded_tokenizer
        return self.keep("tokenizer", self.model_key, lambda: load_tokenizer(self.config.model))

    def mix(self):
        from fika.data import prepare_data

        tokenizer, config = self.tokenizer(), self.config
        key = self.model_key + config.data.model_dump_json()
        return self.keep("mix", key, lambda: prepare_data(config.data, tokenizer, config.model.max_seq_length))

    def base(self):
        from fika.model import load_base_model

        if self.base_model is not None:
            return self.base_model
        tokenizer = self.tokenizer()
        return self.keep("base model", self.model_key, lambda: load_base_model(self.config.model, tokenizer))


def run_trial(
    config: TrialConfig,
    report: Report | None = None,
    *,
    hooks: TrialHooks | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_loaded: bool = False,
    base_model=None,
) -> TrialResult:
    """Trains one LoRA run and returns its result; the tokenized mix is loaded from the cache (or built).

    `report` is the hook called after every step (or give all hooks as `hooks`). `resume=True` continues from
    the last complete checkpoint in the output dir; `overwrite=True` first removes what an earlier run wrote
    there. `base_model` is an already loaded base model of `config.model`; `keep_loaded=True` keeps the tokenizer,
    the tokenized mix and the base model loaded in this process for the next trial (a search worker). Either way
    the LoRA layers are removed again when the run ends, leaving the base weights as they were. While it runs,
    the output dir is locked: a second run into it is refused (it would overwrite or interleave this one's files).
    """
    hooks = hooks or TrialHooks(report=report)
    out = Path(config.output.dir).expanduser()
    with exclusive_folder(out, "output.dir", "a training run"):
        if overwrite:
            clear_outputs(out)
        try:
            return train_in_folder(config, out, hooks, TrialInputs(config, keep_loaded, base_model), resume)
        except Exception as err:
            then = "free space or pick another output.dir, then run it again (--overwrite replaces it)"
            full = out_of_space(err, out, "output.dir", then)
            if full is None:
                raise
            raise full from None


def return_freed_memory() -> None:
    """Hands the heap memory a trial freed back to the system (glibc's `malloc_trim`; elsewhere nothing). glibc
    keeps it otherwise: a search worker that runs trial after trial grew by about 60 MB a trial."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def train_in_folder(config: TrialConfig, out: Path, hooks: TrialHooks, inputs: TrialInputs, resume: bool):
    """The body of `run_trial`, in its locked output dir `out`: start (or resume) the trial's files, train, save."""
    import_trial_libraries()
    import torch

    trial, checkpoint = start_trial(config, out, hooks, inputs, resume)
    model = None
    try:
        model, trainer = build_trainer(config, out, trial, inputs)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if trial.result.status == "running" and config.output.save_adapter:
            save_adapter(config, out, trial, model, inputs.tokenizer())
    except Exception as err:
        with contextlib.suppress(OSError):  # a full disk may refuse the result too: the error raised says why
            trial.finish("failed", error_text(err))
        raise
    finally:
        if model is not None:
            model.unload()  # the base model loses its LoRA layers, ready for the next trial
        if trial.result.device == "cuda":
            torch.cuda.empty_cache()
        if inputs.keep_loaded:
            return_freed_memory()
    return trial.finish("completed")


def start_trial(
    config: TrialConfig, out: Path, hooks: TrialHooks, inputs: TrialInputs, resume: bool, fresh_peak: bool = True
):
    """Loads the data, writes the run's config and data summary, opens its metrics files (cut back to the last
    complete checkpoint when resuming); returns the observed run and that checkpoint (or None). `fresh_peak=False`
    keeps the peak memory measured so far (a pack's trials share one process)."""
    import torch

    from fika.model import device_kind, wants_4bit

    mix = inputs.mix()
    checkpoint = None
    if resume:
        steps = complete_checkpoints(out / "checkpoints")
        checkpoint = out / "checkpoints" / f"checkpoint-{steps[-1]}" if steps else None
    write_atomic(out / "config.yaml", dump_config(config))
    write_atomic(out / "data.json", json.dumps(mix.summary(), indent=1))
    trial = TrialRun(config, out, hooks)
    step = int(checkpoint.name.split("-")[1]) if checkpoint else None
    trial.open_files(step if checkpoint else 0 if resume else None)
    if step is not None:
        trial.restore(step)
    trial.result.device = device_kind()
    trial.result.cpu_threads = torch.get_num_threads()
    trial.result.quantized = wants_4bit(config.model)
    trial.result.data_fingerprint = mix.fingerprint
    if fresh_peak:
        reset_peak_memory(trial.result.device)
    return trial, checkpoint


def build_trainer(config: TrialConfig, out: Path, trial: TrialRun, inputs: TrialInputs):
    """The peft model (LoRA layers on the base) and trl's SFTTrainer that trains it, observed by `trial`."""
    from peft import get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from fika.model import lora_config

    tokenizer = inputs.tokenizer()
    train_dataset, eval_dataset = trial_datasets(config, inputs.mix())
    trial.eval_dataset, trial.pad_token_id = eval_dataset, tokenizer.pad_token_id
    set_seed(config.train.seed)
    model = get_peft_model(inputs.base(), lora_config(config.lora))
    score_labelled_positions_only()
    trial.result.trainable_params, trial.result.total_params = model.get_nb_trainable_parameters()
    trainer = SFTTrainer(
        model=model,
        args=training_args(config, out, trial.result.device),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
        callbacks=[make_callback(trial)],
    )
    trainer.remove_callback(PrinterCallback)  # fika reports steps itself
    return model, trainer


def trial_datasets(config: TrialConfig, mix):
    """The train and eval datasets of a trial's mix; without `assistant_only_loss` every token is a label."""
    train_dataset, eval_dataset = mix.train, mix.eval
    if not config.train.assistant_only_loss:  # the collator then trains on every token
        train_dataset = train_dataset.remove_columns("labels")
        eval_dataset = eval_dataset.map(lambda row: {"labels": row["input_ids"]})
    return train_dataset, eval_dataset


def save_adapter(config: TrialConfig, out: Path, trial: TrialRun, model, tokenizer) -> None:
    """Writes the adapter whole (with the tokenizer and the run's config, for serving), and a merged model when
    asked for."""
    adapter_dir = out / "adapter"
    with folder_written_whole(adapter_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_atomic(tmp / "fika.yaml", dump_config(config))  # the base model and template, for serving
    trial.result.adapter_dir = str(adapter_dir)
    if config.output.save_merged:
        trial.result.merged_dir = str(save_merged(config, adapter_dir, out / "merged"))


def scheduler_kwargs(config: TrialConfig) -> dict:
    """`cosine_with_restarts` needs its cycle count passed explicitly (with 1 it is plain cosine)."""
    if config.train.lr_scheduler == "cosine_with_restarts":
        return {"num_cycles": config.train.num_cycles}
    return {}


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

"""TrialConfig: the validated recipe of one LoRA trial, read from YAML with dotted `key=value` overrides.

Defaults reproduce the Unsloth conversational notebook (r 16, alpha 16, dropout 0, all linear layers,
batch 2 x accumulation 4, warmup 5, 60 steps, lr 2e-4 linear, weight decay 0.01, adamw_8bit, seed 3407,
loss on assistant turns only). With no config file, fika uses the embedded default `fika/default.yaml`:
the same recipe sized for a CPU (built-in SmolLM2-135M-Instruct, built-in ShareGPT data, short sequences).
An empty config file is refused: it is almost always a mistake, and its meaning (the notebook defaults at
2048 tokens, or the embedded default?) would be a guess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fika.errors import ConfigError, shorten
from fika.overrides import apply_overrides, source_name
from fika.paths import PACKAGE_DIR
from fika.validation import format_validation_error
from fika.yaml_files import read_yaml

DEFAULT_CONFIG = PACKAGE_DIR / "default.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = Field("builtin:smollm2-135m-instruct", min_length=1)
    """A hub id, a local directory, `builtin:smollm2-135m-instruct` (offline default) or `tiny` (tests)."""
    revision: str | None = None
    max_seq_length: int = Field(2048, gt=0, le=1_048_576)
    load_in_4bit: bool | Literal["auto"] = "auto"
    """4-bit NF4 QLoRA (bitsandbytes): `auto` = on CUDA only (a CPU trial runs in fp32, which is faster
    there); `true` = also on a CPU (slow, but the same code path as a GPU); `false` = never."""
    chat_template: Literal["auto", "chatml", "llama3"] = "auto"
    """Template with `{% generation %}` markers, so that the loss can cover assistant turns only."""
    trust_remote_code: bool = False
    """Run Python code that ships with a hub model. Only ever from your own config or command line."""


class LoraConfig(Section):
    r: int = Field(16, gt=0, le=4096)
    alpha: float = Field(16.0, gt=0)
    alpha_ratio: float | None = Field(None, gt=0)
    """Tied alpha: when set, alpha = alpha_ratio * r, replacing any `alpha` given (searching r then keeps the
    update scale alpha / r fixed instead of mixing rank with step size)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False
    """rsLoRA: scale by alpha / sqrt(r) instead of alpha / r."""

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or not all(value)):
            raise ValueError(f"{shorten(value)} is not allowed: give module names such as q_proj, or all-linear")
        return value

    @model_validator(mode="after")
    def _tie_alpha(self) -> LoraConfig:
        if self.alpha_ratio is None:
            return self
        object.__setattr__(self, "alpha", self.alpha_ratio * self.r)
        return self


class TrainConfig(Section):
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant", "constant_with_warmup"] = "linear"
    num_cycles: int = Field(3, ge=1)
    """Hard restarts of cosine_with_restarts. With 1 cycle it is exactly cosine, so the default is 3."""
    warmup_steps: int = Field(5, ge=0)
    max_steps: int = Field(60, ge=-1)
    """Optimizer steps; -1 trains for `epochs` instead (the full run)."""
    epochs: float = Field(1.0, gt=0, le=10_000)
    batch_size: int = Field(2, gt=0, le=65_536)
    gradient_accumulation: int = Field(4, gt=0, le=65_536)
    weight_decay: float = Field(0.01, ge=0, le=10)
    optimizer: Literal["adamw_8bit", "paged_adamw_8bit", "adamw_torch"] = "adamw_8bit"
    """8-bit AdamW needs CUDA (bitsandbytes); on a CPU it falls back to adamw_torch."""
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    """Recompute activations to save GPU memory (as the notebook does); a CPU trial never does (30% slower)."""
    seed: int = Field(3407, ge=0, lt=2**32)
    assistant_only_loss: bool = True
    eval_steps: list[int] | None = Field(None, max_length=10_000)
    """Steps at which the held-out eval loss is computed (default: a third and two thirds of the run, as 20 and
    40 of 60 steps); the last step of the run is always added."""
    eval_every: int | None = Field(None, gt=0)
    """Evaluate every N steps instead of at `eval_steps` (the last step is always evaluated)."""
    num_evals: int | None = Field(None, gt=0, le=1000)
    """Evaluate N times at evenly spaced steps instead of at `eval_steps`: for runs sized by epochs."""
    checkpoints: bool = False
    """Save a checkpoint (adapter, optimizer, scheduler, data position) at every eval step, keeping the last
    `keep_checkpoints` and the best by eval loss; `fika train --resume DIR` continues from the last one."""
    keep_checkpoints: int = Field(2, ge=1)
    logging_steps: int = Field(1, gt=0)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Experiment trackers for this run, through transformers' `report_to` (off by default)."""

    @field_validator("eval_steps")
    @classmethod
    def _check_eval_steps(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(step <= 0 for step in value):
            raise ValueError(f"{shorten(value)} is not allowed: eval steps must be positive")
        return sorted(set(value))

    @model_validator(mode="after")
    def _check_steps(self) -> TrainConfig:
        problems = []
        if self.max_steps == 0:
            problems.append("max_steps: 0 is not allowed: give a positive step count, or -1 to train for `epochs`")
        if self.eval_every is not None and self.num_evals is not None:
            problems.append("eval_every: give eval_every or num_evals, not both")
        if self.max_steps > 0:
            late = [s for s in self.eval_steps or [] if s > self.max_steps]
            if late and self.eval_every is None and self.num_evals is None:
                problems.append(
                    f"eval_steps: {late} is not allowed: beyond max_steps {self.max_steps} (they would never run)"
                )
            if self.max_steps > 1 and self.warmup_steps >= self.max_steps:
                problems.append(
                    f"warmup_steps: {self.warmup_steps} is not allowed: it must be below max_steps {self.max_steps}"
                )
            if self.max_steps > 1 and self.logging_steps >= self.max_steps:
                problems.append(
                    f"logging_steps: {self.logging_steps} is not allowed: it must be below max_steps {self.max_steps}"
                )
            if self.eval_every is not None and self.eval_every > self.max_steps:
                problems.append(f"eval_every: {self.eval_every} is not allowed: beyond max_steps {self.max_steps}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


BUILTIN_SHAREGPT = "builtin:sharegpt"


class DataSource(Section):
    path: str = Field(BUILTIN_SHAREGPT, min_length=1)
    """A hub id, a local file (.json, .jsonl, .parquet) or dataset folder, or `builtin:sharegpt`."""
    name: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$")
    """How a search names this source (`data.sources.ultrachat.weight`); default: from the path."""
    format: Literal["auto", "sharegpt", "sharegpt_english", "messages"] = "auto"
    split: str = "train"
    limit: int | None = Field(None, ge=0)
    """Train on at most this many conversations of this source (the first ones of a seeded order)."""
    weight: float | None = Field(None, ge=0, le=1e6)
    """Relative share of this source in the training mix; 0 leaves it out of training (give a weight to every
    source or to none)."""
    min_tokens: int | None = Field(None, ge=0)
    """Filters for this source; unset ones take the mix-wide value of `data` (see DataConfig)."""
    max_tokens: int | None = Field(None, gt=0)
    min_assistant_turns: int | None = Field(None, ge=0)
    dedupe: bool | None = None

    @field_validator("path")
    @classmethod
    def _check_builtin(cls, path: str) -> str:
        if path.startswith("builtin:") and path != BUILTIN_SHAREGPT:
            raise ValueError(f"{path!r} is not allowed: unknown built-in data (the built-in is {BUILTIN_SHAREGPT})")
        return path

    def label(self, index: int) -> str:
        """The source's name: its `name`, else one made from its path (`mlabonne/FineTome-100k` -> finetome_100k)."""
        return source_name(self.path, self.name, index)


class DataConfig(Section):
    sources: list[DataSource] = Field(default_factory=lambda: [DataSource()], min_length=1, max_length=64)
    eval_size: int = Field(64, gt=0, le=100_000)
    """Held-out conversations: split evenly over the sources (or over `eval_sources`), the first ones of each
    source's seeded order, before any training row, limit, weight or filter, so that every trial of a search
    is scored on the same conversations."""
    eval_sources: list[DataSource] | None = Field(None, min_length=1, max_length=64)
    """Draw the eval set from these sources instead of the training sources."""
    seed: int = Field(3407, ge=0, lt=2**32)
    overlong: Literal["truncate", "drop"] = "truncate"
    """Conversations longer than model.max_seq_length: cut after the last assistant turn that fits, or drop."""
    dedupe: bool = True
    """Drop exact repeats of a conversation (within the mix, and of any eval conversation)."""
    min_tokens: int = Field(0, ge=0)
    """Drop training conversations shorter than this (in tokens, after truncation)."""
    max_tokens: int | None = Field(None, gt=0)
    """Drop training conversations longer than this (in tokens, after truncation)."""
    min_assistant_turns: int = Field(1, ge=0)
    """Drop training conversations with fewer assistant replies than this."""

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("sources: give a weight to every source or to none")
        if all(weighted) and not any(s.weight for s in self.sources):
            raise ValueError("sources: every weight is 0; at least one source must train")
        if all(s.limit == 0 for s in self.sources):
            raise ValueError("sources: every limit is 0; at least one source must train")
        names = [s.label(i) for i, s in enumerate(self.sources)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"sources: the name {repeated[0]!r} is used twice; set `name:` on each source")
        return self

    def source_names(self) -> list[str]:
        return [s.label(i) for i, s in enumerate(self.sources)]


class OutputConfig(Section):
    dir: str = Field("outputs/trial", min_length=1)
    save_adapter: bool = True
    save_merged: bool = False


class TrialConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


def build_config(raw: dict, overrides: list[str] | None = None, prefix: str = "") -> TrialConfig:
    """Validates a raw mapping (plus overrides) into a TrialConfig, or raises ConfigError."""
    raw = apply_overrides(raw, overrides, defaults=TrialConfig().model_dump(mode="json"))
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, TrialConfig, prefix)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrialConfig:
    """Loads a TrialConfig from YAML (the embedded default when `path` is None) with dotted overrides."""
    return build_config(read_yaml(path or DEFAULT_CONFIG), overrides)


def dump_config(config: TrialConfig) -> str:
    """The resolved config as YAML, loadable again by `load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

"""TrialConfig: the validated recipe of one LoRA trial, read from YAML with dotted `key=value` overrides.

Defaults reproduce the Unsloth conversational notebook (r 16, alpha 16, dropout 0, all linear layers,
batch 2 x accumulation 4, warmup 5, 60 steps, lr 2e-4 linear, weight decay 0.01, adamw_8bit, seed 3407,
loss on assistant turns only). With no config file, fika uses the embedded default `fika/default.yaml`:
the same recipe sized for a CPU (built-in SmolLM2-135M-Instruct, built-in ShareGPT data, short sequences).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


class FikaError(Exception):
    """A user-facing error: the CLI prints its message (one line per problem) and exits with code 2."""


class ConfigError(FikaError):
    """A config that fails validation: unknown key, wrong type or a value out of range."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "builtin:smollm2-135m-instruct"
    """A hub id, a local directory, `builtin:smollm2-135m-instruct` (offline default) or `tiny` (tests)."""
    revision: str | None = None
    max_seq_length: int = Field(2048, gt=0)
    load_in_4bit: bool = True
    """4-bit NF4 QLoRA through bitsandbytes; applies on CUDA only (a CPU trial always runs in fp32)."""
    chat_template: Literal["auto", "chatml", "llama3"] = "auto"
    """Template with `{% generation %}` markers, so that the loss can cover assistant turns only."""
    trust_remote_code: bool = False


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    alpha_ratio: float | None = Field(None, gt=0)
    """Tied alpha: when set, alpha = alpha_ratio * r, replacing any `alpha` given (searching r then keeps the
    update scale alpha / r fixed instead of mixing rank with step size)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False
    """rsLoRA: scale by alpha / sqrt(r) instead of alpha / r."""

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
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(2, gt=0)
    gradient_accumulation: int = Field(4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["adamw_8bit", "paged_adamw_8bit", "adamw_torch"] = "adamw_8bit"
    """8-bit AdamW needs CUDA (bitsandbytes); on a CPU it falls back to adamw_torch."""
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    """Recompute activations to save GPU memory (as the notebook does); a CPU trial never does (30% slower)."""
    seed: int = 3407
    assistant_only_loss: bool = True
    eval_steps: list[int] = Field(default_factory=lambda: [20, 40, 60])
    """Steps at which the held-out eval loss is computed; the last step of the run is always added."""
    logging_steps: int = Field(1, gt=0)

    @field_validator("max_steps")
    @classmethod
    def _check_max_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 is not allowed: give a positive step count, or -1 to train for `epochs`")
        return value

    @field_validator("eval_steps")
    @classmethod
    def _check_eval_steps(cls, value: list[int]) -> list[int]:
        if any(step <= 0 for step in value):
            raise ValueError(f"{value} is not allowed: eval steps must be positive")
        return sorted(set(value))


class DataSource(Section):
    path: str = "builtin:sharegpt"
    """A hub id, a local file (.json, .jsonl, .parquet) or directory, or `builtin:sharegpt` (offline default)."""
    format: Literal["auto", "sharegpt", "sharegpt_english", "messages"] = "auto"
    split: str = "train"
    limit: int | None = Field(None, gt=0)
    """Keep at most this many conversations of this source (read in a seeded random order)."""
    weight: float | None = Field(None, gt=0)
    """Relative share of this source in the training mix (give a weight to every source or to none)."""


class DataConfig(Section):
    sources: list[DataSource] = Field(default_factory=lambda: [DataSource()], min_length=1)
    eval_size: int = Field(64, gt=0)
    """Held-out conversations, fixed by `seed`, taken before the training rows are sampled."""
    seed: int = 3407
    overlong: Literal["truncate", "drop"] = "truncate"
    """Conversations longer than model.max_seq_length: cut after the last assistant turn that fits, or drop."""
    dedupe: bool = True

    @model_validator(mode="after")
    def _check_weights(self) -> DataConfig:
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("give a weight to every source or to none")
        return self


class OutputConfig(Section):
    dir: str = "outputs/trial"
    save_adapter: bool = True
    save_merged: bool = False


class TrialConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Parses `a.b.c=value` strings; values are read as YAML (`5e-4`, `true`, `[8, 16]`)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. lora.r=32")
        parsed.append((key.split("."), yaml.safe_load(value) if value else None))
    return parsed


def set_dotted(raw: dict, key: str, value: Any) -> dict:
    """Sets a dotted key in a nested dict, creating sections; numeric parts index lists (`data.sources.0.limit`).

    A mapping key that itself holds dots (a search space's `lora.dropout`) is matched whole, longest first.
    """
    parts = key.split(".")
    node: Any = raw
    i = 0
    while True:
        if isinstance(node, list):
            if not parts[i].isdigit() or int(parts[i]) >= len(node):
                raise ConfigError(f"{key}: no list item {parts[i]!r} at {'.'.join(parts[: i + 1])}")
            index: Any = int(parts[i])
            i += 1
        elif isinstance(node, dict):
            j = next((j for j in range(len(parts), i + 1, -1) if ".".join(parts[i:j]) in node), i + 1)
            index, i = ".".join(parts[i:j]), j
            if i < len(parts) and not isinstance(node.get(index), (dict, list)):
                node[index] = {}
        else:
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not a section")
        if i == len(parts):
            node[index] = value
            return raw
        node = node[index]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies `key=value` overrides to a nested dict."""
    for parts, value in parse_overrides(overrides):
        set_dotted(raw, ".".join(parts), value)
    return raw


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping, turning a missing file or bad YAML into a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: the dotted key, the value given and what is allowed."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "config"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(model, e["loc"][:-1]))
            lines.append(f"{key}: unknown key (allowed here: {allowed})")
        elif e["type"] == "value_error":
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{key}: {e['input']!r} is not allowed: {e['msg'][0].lower()}{e['msg'][1:]}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section found at `loc` (list indices and dict keys skipped)."""
    for part in loc:
        if part in model.model_fields:
            model = _section_type(model.model_fields[part].annotation) or model
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section class inside an annotation such as `X`, `list[X]`, `dict[str, X]` or `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def build_config(raw: dict, overrides: list[str] | None = None) -> TrialConfig:
    """Validates a raw mapping (plus overrides) into a TrialConfig, or raises ConfigError."""
    raw = apply_overrides(raw, overrides or [])
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, TrialConfig)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrialConfig:
    """Loads a TrialConfig from YAML (the embedded default when `path` is None) with dotted overrides."""
    return build_config(read_yaml(path or DEFAULT_CONFIG), overrides)


def dump_config(config: TrialConfig) -> str:
    """The resolved config as YAML, loadable again by `load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def cache_root() -> Path:
    """Where fika keeps converted models and tokenized data: $FIKA_CACHE, else ~/.cache/fika."""
    import os

    root = os.environ.get("FIKA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fika"
    return Path(root)

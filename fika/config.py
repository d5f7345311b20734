"""TrialConfig: the validated recipe of one LoRA trial, read from YAML with dotted `key=value` overrides.

Defaults reproduce the Unsloth conversational notebook (r 16, alpha 16, dropout 0, all linear layers,
batch 2 x accumulation 4, warmup 5, 60 steps, lr 2e-4 linear, weight decay 0.01, adamw_8bit, seed 3407,
loss on assistant turns only). With no config file, fika uses the embedded default `fika/default.yaml`:
the same recipe sized for a CPU (built-in SmolLM2-135M-Instruct, built-in ShareGPT data, short sequences).
An empty config file is refused: it is almost always a mistake, and its meaning (the notebook defaults at
2048 tokens, or the embedded default?) would be a guess.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fika.common import PACKAGE_DIR, FikaError, shorten

DEFAULT_CONFIG = PACKAGE_DIR / "default.yaml"
MAX_YAML_VALUES = 100_000  # an alias bomb expands far beyond any real config


class ConfigError(FikaError):
    """A config that fails validation: unknown key, wrong type or a value out of range."""


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
        if self.name:
            return self.name
        stem = self.path.removeprefix("builtin:").rstrip("/").split("/")[-1]
        stem = re.sub(r"\.(jsonl?|parquet)(\.gz)?$", "", stem.lower())
        slug = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")
        return slug if slug and slug[0].isalpha() else f"source{index}"


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


# --- YAML ---------------------------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML would keep the later one)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, what: str) -> Any:
    """Parses YAML text strictly: duplicate keys and alias bombs are refused with one line naming `what`."""
    try:
        value = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{what} is not valid YAML: {problem}{where}") from None
    if count_values(value) > MAX_YAML_VALUES:
        raise ConfigError(f"{what}: more than {MAX_YAML_VALUES:,} values once YAML aliases are expanded")
    return value


def count_values(value: Any, budget: int = MAX_YAML_VALUES + 1) -> int:
    """How many values a parsed YAML document holds with aliases expanded (counting stops past `budget`)."""
    count, stack = 0, [value]
    while stack and count < budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping; a missing, binary, empty or malformed file is a ConfigError naming it."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give a YAML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (a binary or UTF-16 file?)") from None
    raw = load_yaml_text(text, f"config file {str(path)!r}")
    if raw is None:
        raise ConfigError(
            f"config file {str(path)!r} is empty; give at least one section, or leave out --config for the embedded default"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


# --- dotted overrides ---------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parses `a.b.c=value` strings; values are read as YAML (`5e-4`, `true`, `[8, 16]`)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {shorten(item)}: expected key=value with a dotted key, e.g. lora.r=32")
        parsed.append((key, load_yaml_text(value, f"override {shorten(item)}") if value else None))
    return parsed


def list_index(node: list, part: str) -> int | None:
    """The index a key part names in a list: a number, or the `name` of a data source (`ultrachat`)."""
    if part.isdigit():
        return int(part) if int(part) < len(node) else None
    for i, item in enumerate(node):
        if isinstance(item, dict) and source_label(item, i) == part:
            return i
    return None


def source_label(raw: dict, index: int) -> str:
    """A data source's name from its raw mapping (its `name:`, else one made from its path)."""
    try:
        return DataSource.model_construct(**raw).label(index)
    except Exception:
        return str(raw.get("name") or f"source{index}")


def set_dotted(raw: dict, key: str, value: Any) -> dict:
    """Sets a dotted key in a nested dict, creating sections; list items by index or source name.

    A mapping whose keys hold dots (a search space: `lora.dropout`) is matched by its keys, longest first, and a
    new key in it takes the rest of the dotted key whole (`space.train.warmup_steps={choice: [0, 5]}`).
    """
    parts = key.split(".")
    node: Any = raw
    i = 0
    while True:
        if isinstance(node, list):
            index: Any = list_index(node, parts[i])
            if index is None:
                names = ", ".join(source_label(s, j) if isinstance(s, dict) else str(j) for j, s in enumerate(node))
                raise ConfigError(
                    f"{key}: no list item {parts[i]!r} at {'.'.join(parts[: i + 1])} (there are {len(node)}: {names})"
                )
            i += 1
        elif isinstance(node, dict):
            j = next((j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in node), None)
            if j is None:
                j = len(parts) if any("." in str(k) for k in node) else i + 1
            index, i = ".".join(parts[i:j]), j
            if i < len(parts) and not isinstance(node.get(index), (dict, list)):
                if node.get(index) is not None:
                    raise ConfigError(f"{key}: {'.'.join(parts[:i])} is {shorten(node[index])}, not a section")
                node[index] = {}
        else:
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not a section")
        if i == len(parts):
            node[index] = value
            return raw
        node = node[index]


def get_dotted(tree: Any, key: str, default: Any = None) -> Any:
    """The value at a dotted key of nested dicts and lists (list items by index or source name), else `default`."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and list_index(node, part) is not None:
            node = node[list_index(node, part)]
        else:
            return default
    return node


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies `key=value` overrides to a nested dict."""
    for key, value in parse_overrides(overrides):
        set_dotted(raw, key, value)
    return raw


# --- validation ---------------------------------------------------------------------------------------


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: the dotted key, the value given (bounded) and what is allowed."""
    lines = []
    unions: dict[str, list[str]] = {}  # a value that matches no member of a union: one line, every option
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not is_type_tag(p)]
        key = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "config"
        message = e["msg"].removeprefix("Value error, ")
        if len(loc) < len(e["loc"]) and e["type"] not in ("extra_forbidden", "missing", "value_error"):
            if key not in unions:
                lines.append((key, shorten(e["input"])))
            unions.setdefault(key, []).append(message[0].lower() + message[1:])
            continue
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(model, e["loc"][:-1]))
            lines.append(f"{key}: unknown key (allowed here: {allowed})")
        elif e["type"] == "missing":
            lines.append(f"{key}: required")
        elif e["type"] == "value_error":
            for line in message.splitlines():  # a model check may name several fields, one per line
                head, sep, rest = line.partition(": ")
                if sep and head.split(".")[0] in _fields_at(model, e["loc"]):
                    lines.append(f"{key + '.' if loc else prefix}{head}: {rest}")
                else:
                    lines.append(f"{key}: {line}")
        else:
            lines.append(f"{key}: {shorten(e['input'])} is not allowed: {message[0].lower()}{message[1:]}")
    text = [f"{line[0]}: {line[1]} is not allowed: {', or '.join(unions[line[0]])}" if isinstance(line, tuple) else line
            for line in lines]  # fmt: skip
    return "\n".join(dict.fromkeys(text))


def is_type_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a type of a union (`list[str]`, `literal['auto']`, `bool`)."""
    return isinstance(part, str) and (any(c in part for c in "[(-") or part in ("bool", "int", "float", "str", "none"))


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


def build_config(raw: dict, overrides: list[str] | None = None, prefix: str = "") -> TrialConfig:
    """Validates a raw mapping (plus overrides) into a TrialConfig, or raises ConfigError."""
    raw = apply_overrides(raw, overrides or [])
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

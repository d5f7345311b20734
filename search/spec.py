"""SearchSpec: what a search tries, how it schedules trials and where it runs, validated before Ray starts.

A spec is YAML:

    name: demo
    base: ../../fika/default.yaml          # a TrialConfig: a path (relative to the spec) or inline
    space:
      train.learning_rate: {choice: [1.0e-4, 2.0e-4, 5.0e-4]}
      lora.dropout: {uniform: [0.0, 0.1]}
      train.warmup_steps: {choice: [0, 5]}
      lora.r,lora.alpha: {choice: [[8, 16], [16, 16], [32, 64]]}   # paired values, tried together
      lora.alpha_ratio: {choice: [1, 2]}                             # tied alpha = ratio x r
    searcher: optuna          # optuna (TPE) | grid (every choice combination) | random
    num_samples: 12
    scheduler: {kind: asha, grace_period: 20, reduction_factor: 2}  # or {kind: fifo}
    metric: eval_loss         # or train_loss_smooth (mean of the last 10 steps)
    resources: {cpu: 2, gpu: 0}
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fika.config import (
    ConfigError,
    Section,
    TrialConfig,
    build_config,
    format_validation_error,
    read_yaml,
    set_dotted,
)

METRICS = ("eval_loss", "train_loss_smooth")


class Param(Section):
    """One searched key (or a comma-joined group of keys for paired values): exactly one distribution."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_distribution(self) -> Param:
        given = [name for name in ("choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform (got {', '.join(given) or 'none'})")
        for name in ("uniform", "loguniform"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name} [{bounds[0]:g}, {bounds[1]:g}] is not allowed: low must be < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(
                f"loguniform [{self.loguniform[0]:g}, {self.loguniform[1]:g}] is not allowed: low must be > 0"
            )
        return self

    def values(self) -> list[Any]:
        """The values to validate: every choice, or both bounds."""
        return list(self.choice) if self.choice is not None else list(self.uniform or self.loguniform)


class SchedulerSpec(Section):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(None, gt=0)
    """Steps before the first ASHA rung (default: a third of max_steps)."""
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesSpec(Section):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    """GPUs per trial; fractions share a GPU between small trials."""


class SearchSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: TrialConfig
    space: dict[str, Param] = Field(min_length=1)
    searcher: Literal["optuna", "grid", "random"] = "optuna"
    num_samples: int = Field(8, gt=0)
    """Trials for optuna and random; repeats of the whole grid for grid."""
    seed: int = 0
    baseline: bool = True
    """Run the base config's own values first (when they lie in the space), as the row to beat."""
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: Literal["eval_loss", "train_loss_smooth"] = "eval_loss"
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent: int | None = Field(None, gt=0)
    storage: str = "runs"
    """Folder (a shared filesystem on a cluster) that holds `<storage>/<name>/`: trials, Ray state, the study."""
    optuna_storage: str | None = None
    """An RDB URL (sqlite:///..., postgresql://...) for a team's shared study; default: a journal file in the run."""
    address: str | None = None
    """A Ray cluster to join (`auto`, `HOST:PORT`); default: start a local Ray instance."""
    max_failures: int = Field(1, ge=0)
    """Retries of a trial that raised (an OOM, a lost node) before it is recorded as failed."""
    report_dir: str | None = None
    """Where the ranked report goes (default: reports/<name>)."""

    @field_validator("space")
    @classmethod
    def _keys_are_dotted(cls, space: dict[str, Param]) -> dict[str, Param]:
        for key in space:
            for part in key.split(","):
                if not re.fullmatch(r"[a-z_]+(\.[a-z0-9_]+)+", part.strip()):
                    raise ValueError(
                        f"{key!r} is not allowed: keys are dotted TrialConfig keys like lora.r or 'lora.r,lora.alpha'"
                    )
        return space

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if self.base.train.max_steps <= 0:
            raise ValueError(
                "base.train.max_steps must be > 0 in a search (trials are short runs ranked at their last step)"
            )
        if self.searcher == "grid":
            ranged = [key for key, p in self.space.items() if p.choice is None]
            if ranged:
                raise ValueError(
                    f"searcher grid needs choice lists; {', '.join(ranged)} use a range (use optuna or random)"
                )
        return self

    @property
    def max_steps(self) -> int:
        return self.base.train.max_steps

    def rungs(self) -> list[int]:
        """The ASHA milestones (steps) before max_steps: grace, grace x rf, ... (none for FIFO)."""
        if self.scheduler.kind != "asha":
            return []
        grace = self.scheduler.grace_period or max(1, self.max_steps // 3)
        rungs, step = [], float(grace)
        while round(step) < self.max_steps:
            rungs.append(round(step))
            step *= self.scheduler.reduction_factor
        return rungs

    def eval_steps(self) -> list[int]:
        """Every trial evaluates at the ASHA rungs, the base config's eval steps and the last step."""
        return sorted({*self.rungs(), *(s for s in self.base.train.eval_steps if s <= self.max_steps), self.max_steps})

    def num_trials(self) -> int:
        if self.searcher == "grid":
            return self.num_samples * math.prod(len(p.choice) for p in self.space.values())
        return self.num_samples


def split_key(key: str) -> list[str]:
    return [part.strip() for part in key.split(",")]


def apply_params(raw: dict, params: dict[str, Any]) -> dict:
    """Sets one trial's sampled params in a raw TrialConfig dict (paired keys get one value each)."""
    for key, value in params.items():
        keys = split_key(key)
        values = decode_choice(value) if len(keys) > 1 else [value]
        if not isinstance(values, list) or len(values) != len(keys):
            raise ConfigError(f"space.{key}: {value!r} is not allowed: give {len(keys)} values, one per key")
        for part, item in zip(keys, values, strict=True):
            set_dotted(raw, part, item)
    return raw


def encode_choice(value: Any) -> Any:
    """Searchers take scalars only: a paired value [8, 16] travels as the string '[8, 16]'."""
    return yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, (list, dict)) else value


def decode_choice(value: Any) -> Any:
    return yaml.safe_load(value) if isinstance(value, str) else value


def trial_config(spec: SearchSpec, params: dict[str, Any], output_dir: str, seed: int | None = None) -> TrialConfig:
    """The TrialConfig of one trial: the base config with the sampled params and the search's eval steps."""
    raw = apply_params(spec.base.model_dump(mode="json"), params)
    raw["train"]["eval_steps"] = spec.eval_steps()
    if seed is not None:
        raw["train"]["seed"] = seed
    raw["output"].update(dir=output_dir, save_adapter=False)
    return build_config(raw)


def baseline_params(spec: SearchSpec) -> dict[str, Any] | None:
    """The base config's own values of every searched key, if each is a possible value of the space."""
    raw = spec.base.model_dump(mode="json")
    params = {}
    for key, param in spec.space.items():
        values = []
        for part in split_key(key):
            node: Any = raw
            for name in part.split("."):
                node = node[name]
            values.append(node)
        value = values if len(values) > 1 else values[0]
        if param.choice is not None:
            if value not in param.choice:
                return None
            params[key] = encode_choice(param.choice[param.choice.index(value)])  # as spelled in the space
        else:
            low, high = param.uniform or param.loguniform
            if not low <= value <= high:
                return None
            params[key] = value
    return params


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SearchSpec:
    """Reads and validates a spec, resolving `base` (a path relative to the spec file, or inline)."""
    from fika.config import apply_overrides

    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    base = raw.get("base", {})
    if isinstance(base, str):
        base_path = (path.parent / base).resolve() if not Path(base).is_absolute() else Path(base)
        try:
            base = read_yaml(base_path)
        except ConfigError as err:
            raise ConfigError(f"base: {err}") from None
    raw["base"] = base
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SearchSpec)) from None
    check_space(spec)
    return spec


def check_space(spec: SearchSpec) -> None:
    """Every value of every searched key must make a valid TrialConfig: one line per bad key."""
    errors = []
    for key, param in spec.space.items():
        for value in param.values():
            try:
                trial_config(spec, {key: encode_choice(value)}, "x")
            except ConfigError as err:
                errors.append(f"space.{key}: {err}")
                break
    if errors:
        raise ConfigError("\n".join(errors))

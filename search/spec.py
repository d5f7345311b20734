"""SearchSpec: what a search tries, how it schedules trials and where it runs, validated before Ray starts.

A spec is YAML:

    name: demo
    base: ../../fika/default.yaml          # a TrialConfig: a path (relative to the spec) or inline
    space:
      train.learning_rate: {choice: [1.0e-4, 2.0e-4, 5.0e-4]}
      lora.dropout: {uniform: [0.0, 0.1]}
      lora.r,lora.alpha: {choice: [[8, 16], [16, 16], [32, 64]]}   # paired values, tried together
      lora.alpha_ratio: {choice: [1, 2]}                             # tied alpha = ratio x r
      data.sources.ultrachat.weight: {choice: [0, 1, 2]}             # data keys: by source name or index
    searcher: local           # local (top lr and rank first, then around the best) | optuna (TPE) | gp | grid | random
    startup_trials: 4         # local, optuna, gp: trials drawn at random before the sampler uses the results
    num_samples: 12
    scheduler: {kind: asha, grace_period: 20, reduction_factor: 2, rung_metric: train_loss_smooth}
    metric: eval_loss         # the ranking: eval loss at the last step (or train_loss_smooth)
    resources: {cpu: 2, gpu: 0}   # per trial; with pack: K, per pack of K trials on one loaded base model

`fika search NAME` also finds the specs that ship with fika by name (demo, smoke, grid, data-mix).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fika.config import Section, TrialConfig
from fika.errors import ConfigError
from fika.overrides import Overrides, apply_overrides
from fika.search.trials import split_key
from fika.validation import format_validation_error
from fika.yaml_files import read_yaml

SPECS_DIR = Path(__file__).resolve().parent / "specs"
OPTUNA_SEARCHERS = ("local", "optuna", "gp")  # the searchers that draw through an Optuna study
TOP_FIRST = {  # the keys whose start-up draws in a `local` search take their largest choice, and how a plan says it
    "train.learning_rate": "the top learning rate",
    "lora.r": "the largest rank",
}


EVAL_KEYS = (  # when a trial is evaluated and what it keeps: not what it learns
    "train.eval_steps",
    "train.eval_every",
    "train.num_evals",
    "train.checkpoints",
    "train.keep_checkpoints",
    "train.report_to",
)
# Keys a search may not vary: they define the run's outputs, or the eval set every trial is scored on
# (the tokenizer, the sequence length, the held-out conversations), or the schedule of evals.
UNSEARCHABLE = (
    "output.",
    "model.name",
    "model.revision",
    "model.max_seq_length",
    "model.chat_template",
    "model.trust_remote_code",
    "train.max_steps",
    "train.epochs",
    *EVAL_KEYS,
    "train.assistant_only_loss",
    "data.eval_size",
    "data.eval_sources",
    "data.seed",
    "data.overlong",
)
INTEGER_KEYS = re.compile(
    r"(lora\.r|train\.(max_steps|batch_size|gradient_accumulation|warmup_steps|num_cycles|seed)|"
    r"data\.(sources\.[a-z0-9_]+\.)?(limit|min_tokens|max_tokens|min_assistant_turns))$"
)


def top_first_key(param: str) -> str | None:
    """The key of TOP_FIRST that a searched key (or a comma-joined group of keys) holds; None when it holds none."""
    return next((key for key in TOP_FIRST if key in param.split(",")), None)


def default_startup(searcher: str, num_samples: int) -> int:
    """The random start-up draws of a search of `num_samples` trials: a third, 3 to 10; for `local` a sixth, 2 to 10
    (it starts from the best of them, not from a model)."""
    return min(10, max(2, num_samples // 6)) if searcher == "local" else min(10, max(3, num_samples // 3))


class Param(Section):
    """One searched key (or a comma-joined group of keys for paired values): exactly one distribution."""

    choice: list[Any] | None = Field(None, min_length=1, max_length=1000)
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
    reduction_factor: float = Field(2.0, gt=1, le=100)
    rung_metric: Literal["eval_loss", "train_loss_smooth", "eval_subset"] = "train_loss_smooth"
    """What ASHA compares at its rungs: the smoothed train loss (free: every trial sees the same batches, so it is
    a paired comparison), a full eval, or an eval of `rung_eval_size` conversations. The final ranking is
    always the spec's metric at the last step."""
    rung_eval_size: int | None = Field(None, gt=0)
    """Conversations of the `eval_subset` rung metric (default: 16, or the whole eval set when smaller)."""
    compare_within: list[str] | None = None
    """Searched keys whose values split ASHA's rungs: a trial is compared only with trials that share them
    (default: train.lr_scheduler when it is searched, since a schedule's loss mid-run depends on its shape; [] for
    one ASHA over all trials)."""


class ResourcesSpec(Section):
    cpu: float = Field(1.0, gt=0, le=1024)
    gpu: float = Field(0.0, ge=0)
    """GPUs per trial: 1, or a fraction to share a GPU between small trials (a trial uses one GPU at most)."""
    gpu_memory_gb: float | None = Field(None, gt=0)
    """The memory of the cluster's GPUs: a trial whose estimated peak exceeds its share is refused up front."""
    pack: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    """Trials trained together on one loaded base model, in the same forward passes (fika.pack): 1 runs each trial
    alone; a number, or auto (as many as the estimated memory of the whole pack allows on a GPU; 1 on a CPU, where
    packing is slower). With a pack, cpu and gpu are the resources of one pack, shared by its trials."""

    @field_validator("gpu")
    @classmethod
    def _one_gpu_at_most(cls, value: float) -> float:
        if value > 1:
            raise ValueError(
                f"{value:g} is not allowed: a trial runs on one GPU (its model goes to the first one); give 1, or a "
                "fraction to share a GPU between trials"
            )
        return value


class ConfirmSpec(Section):
    """Re-runs of the best trials after the search, in the same run: the decision the report states."""

    top: int = Field(3, ge=1, le=100)
    """How many of the best completed trials are re-run."""
    seeds: int = Field(2, ge=0, le=100)
    """Other seeds per re-run trial (its own seed plus these: the seed spread)."""
    steps: int | None = Field(None, gt=0)
    """Also re-run each once at this longer horizon (does the short-horizon order hold?)."""

    @model_validator(mode="after")
    def _runs_something(self) -> ConfirmSpec:
        if not self.seeds and not self.steps:
            raise ValueError("seeds: 0 is not allowed without steps: nothing would run")
        return self


class SearchSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    base: TrialConfig
    space: dict[str, Param] = Field(min_length=1, max_length=64)
    searcher: Literal["local", "optuna", "gp", "grid", "random"] = "local"
    """local: start-up draws at the top learning rate and the largest rank, then a local search around the best
    trial, the learning rate first, TPE when no neighbour is left (fika.search.local_search); optuna: Optuna's TPE;
    gp: Optuna's Gaussian-process sampler (suited to tens of trials); grid: every choice combination; random."""
    num_samples: int = Field(8, gt=0, le=100_000)
    """Trials for local, optuna, gp and random; repeats of the whole grid for grid."""
    startup_trials: int | None = Field(None, ge=0)
    """local, optuna and gp: trials drawn at random before the sampler uses the results (default: a third of
    num_samples, 3 to 10; for local a sixth, 2 to 10: it starts from the best of them, not from a model)."""
    warm_start: list[str] = Field(default_factory=list, max_length=32)
    """Earlier searches (their run folders) to start from: the trials of one with the same model, data, eval set,
    horizon and metric enter the study with their values; of one that differs, the best configuration runs first with
    its learning rate, rank and the keys it settled (the other keys drawn afresh)."""
    confirm: ConfirmSpec | None = None
    """Re-run the best trials with other seeds and/or at a longer horizon after the search (same run, same Ray)."""
    seed: int = Field(0, ge=0, lt=2**32)
    baseline: bool = True
    """Run the base config's own values first (when they lie in the space), as the row to beat; a grid runs them as
    one of its configurations."""
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: Literal["eval_loss", "train_loss_smooth"] = "eval_loss"
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent: int | None = Field(None, gt=0)
    storage: str = Field("runs", min_length=1)
    """Folder (a shared filesystem on a cluster) that holds `<storage>/<name>/`: trials, Ray state, the study."""
    optuna_storage: str | None = None
    """An RDB URL (sqlite:///..., postgresql://...) for a team's shared study; default: a journal file in the run."""
    address: str | None = None
    """A Ray cluster to join (`auto`, `HOST:PORT`); default: start a local Ray instance."""
    max_failures: int = Field(1, ge=0, le=100)
    """Retries of a trial that raised (an OOM, a lost node) before it is recorded as failed."""
    report_dir: str | None = None
    """Where the ranked report goes (default: reports/<name>)."""
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Experiment trackers that receive every trial's metrics (Ray Tune's logger callbacks)."""

    @field_validator("space")
    @classmethod
    def _check_keys(cls, space: dict[str, Param]) -> dict[str, Param]:
        for key in space:
            parts = split_key(key)
            for part in parts:
                if not re.fullmatch(r"[a-z_]+(\.[a-z0-9_]+)+", part):
                    raise ValueError(
                        f"{key!r} is not allowed: keys are dotted TrialConfig keys like lora.r or 'lora.r,lora.alpha'"
                    )
                if part.startswith(UNSEARCHABLE) and not part.startswith("model.load_in_4bit"):
                    raise ValueError(
                        f"{key!r} is not allowed: {part} cannot be searched (it defines the outputs, the evals, or the "
                        "eval set every trial is scored on)"
                    )
            if len(set(parts)) != len(parts):
                raise ValueError(f"{key!r} is not allowed: it names the same key twice")
        return space

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if self.base.train.max_steps <= 0:
            raise ValueError(
                "base.train.max_steps: must be > 0 in a search (trials are short runs ranked at their last step)"
            )
        if self.scheduler.kind == "asha" and (self.scheduler.grace_period or 1) >= self.max_steps:
            raise ValueError(
                f"scheduler.grace_period: {self.scheduler.grace_period} is not allowed: it must be below "
                f"base.train.max_steps {self.max_steps} (no trial could be stopped early)"
            )
        if self.scheduler.rung_eval_size is None:  # resolved here, so that spec.yaml records the size used
            self.scheduler.rung_eval_size = min(16, self.base.data.eval_size)
        if self.scheduler.rung_eval_size > self.base.data.eval_size:
            raise ValueError(
                f"scheduler.rung_eval_size: {self.scheduler.rung_eval_size} is not allowed: larger than "
                f"base.data.eval_size {self.base.data.eval_size}"
            )
        if self.confirm is not None and self.confirm.steps is not None and self.confirm.steps <= self.max_steps:
            raise ValueError(
                f"confirm.steps: {self.confirm.steps} is not allowed: give more than base.train.max_steps "
                f"{self.max_steps}"
            )
        if self.resources.pack != 1:
            self._check_packable()
        if self.warm_start and self.searcher not in OPTUNA_SEARCHERS:
            raise ValueError(f"warm_start: not allowed with searcher {self.searcher}: give local, optuna or gp")
        for key in self.scheduler.compare_within or []:
            if key not in self.space:
                raise ValueError(
                    f"scheduler.compare_within: {key!r} is not allowed: give searched keys ({', '.join(self.space)})"
                )
        if self.searcher == "grid":
            ranged = [key for key, p in self.space.items() if p.choice is None]
            if ranged:
                raise ValueError(
                    f"searcher: grid needs choice lists; {', '.join(ranged)} use a range (use optuna or random)"
                )
        for key, param in self.space.items():
            if param.choice is None and any(INTEGER_KEYS.search(part) for part in split_key(key)):
                raise ValueError(f"space.{key}: a range over an integer key is not allowed; give a choice list")
        return self

    def _check_packable(self) -> None:
        """Raises ValueError for a packed search whose trials could not share one base model and its passes."""
        pack = self.resources.pack
        model_keys = [key for key in self.space if any(p.startswith("model.") for p in split_key(key))]
        if model_keys:
            raise ValueError(
                f"resources.pack: {pack} is not allowed with a searched model key ({', '.join(model_keys)}): a pack's "
                "trials share one base model; give pack: 1"
            )
        train = self.base.train
        if train.checkpoints:
            raise ValueError(
                f"resources.pack: {pack} is not allowed with base.train.checkpoints (a packed trial keeps none)"
            )
        if train.report_to:
            raise ValueError(
                f"resources.pack: {pack} is not allowed with base.train.report_to (use the search's trackers)"
            )

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
        """The full evals of every trial: the last step, the rungs when ASHA compares full evals there, and any
        steps the base config asks for (`base.train.eval_steps`, to draw eval curves at a price)."""
        rungs = self.rungs() if self.scheduler.rung_metric == "eval_loss" else []
        return sorted({*rungs, *(self.base.train.eval_steps or []), self.max_steps})

    def compare_within(self) -> list[str]:
        """The keys that split ASHA's rungs (`scheduler.compare_within`, resolved)."""
        if self.scheduler.compare_within is not None:
            return self.scheduler.compare_within
        return [key for key in ("train.lr_scheduler",) if key in self.space]

    def rung_key(self) -> str:
        """The result key ASHA reads at its rungs."""
        return {"eval_subset": "eval_loss_subset"}.get(self.scheduler.rung_metric, self.scheduler.rung_metric)

    def quick_evals(self) -> tuple[list[int], int] | None:
        """Subset evals at the rungs, when the rung metric asks for them."""
        if self.scheduler.rung_metric != "eval_subset" or not self.rungs():
            return None
        return self.rungs(), self.scheduler.rung_eval_size

    def startup(self) -> int:
        """How many trials of an Optuna searcher (local, optuna, gp) are drawn at random before it uses the results."""
        return (
            self.startup_trials if self.startup_trials is not None else default_startup(self.searcher, self.num_samples)
        )

    def num_trials(self) -> int:
        """The trials the search runs: num_samples, times the grid for grid; optuna runs no configuration twice,
        so a space of choices only caps it at its number of configurations."""
        configurations = self.configurations()
        if self.searcher == "grid":  # a grid space is choices only (checked above)
            return self.num_samples * configurations
        if self.searcher in OPTUNA_SEARCHERS and configurations is not None:
            return min(self.num_samples, configurations)
        return self.num_samples

    def configurations(self) -> int | None:
        """How many distinct configurations the space holds; None when a key has a range."""
        if any(p.choice is None for p in self.space.values()):
            return None
        return math.prod(len(p.choice) for p in self.space.values())


def spec_path(name_or_path: str | Path) -> Path:
    """A spec file: the path given, or a spec that ships with fika by name (`demo`, `smoke`, `grid`, `data-mix`)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        return path
    shipped = SPECS_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
    raise ConfigError(f"spec {str(name_or_path)!r}: no such file, and not a spec that ships with fika ({names})")


def load_spec(spec: str | Path | dict | SearchSpec, overrides: Overrides = None) -> SearchSpec:
    """Reads and validates a spec: a file, the name of a shipped spec, a mapping (its `base` path relative to the
    current folder) or a SearchSpec; `base` is resolved (a path relative to the spec file, or inline) before the
    overrides, so that `base.x=...` edits the file's config."""
    if isinstance(spec, SearchSpec):
        spec = spec.model_dump(mode="json")
    if isinstance(spec, dict):
        raw, folder = copy.deepcopy(spec), Path.cwd()
    elif isinstance(spec, (str, Path)):
        path = spec_path(spec)
        raw, folder = read_yaml(path, empty="give a search spec: at least name, base and space"), path.parent
    else:
        raise ConfigError(
            f"spec: a {type(spec).__name__} is not allowed: give a YAML path, a shipped spec's name or a mapping"
        )
    base = raw.get("base", {})
    if isinstance(base, str):
        base_path = Path(base).expanduser()
        base_path = base_path if base_path.is_absolute() else (folder / base_path).resolve()
        try:
            raw["base"] = read_yaml(base_path)
        except ConfigError as err:
            raise ConfigError(f"base: {err}") from None
    defaults = {
        "base": TrialConfig().model_dump(mode="json"),
        "scheduler": SchedulerSpec().model_dump(mode="json"),
        "resources": ResourcesSpec().model_dump(mode="json"),
    }
    raw = apply_overrides(raw, overrides, defaults)
    try:
        validated = SearchSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SearchSpec)) from None
    from fika.search.trials import check_space

    check_space(validated)
    return validated

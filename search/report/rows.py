"""A search's trials as the report shows them: one row per trial folder (running, failed and cut-short ones
included), and their ranking.

Reads only the run folder (`spec.yaml`, `draws.jsonl`, `trials/*/{config.yaml, data.json, metrics.jsonl,
evals.jsonl, result.json, confirm.json}`), tolerating files cut short by a killed process. Ranking ("60-step
loss"): the spec's metric at the last step for completed trials; pruned trials rank below them (deeper rung
first); running, interrupted, diverged and failed trials after them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fika.files import read_json, read_jsonl
from fika.folder_lock import folder_holder
from fika.overrides import get_dotted
from fika.search.report import analysis
from fika.search.spec import SearchSpec
from fika.search.trials import baseline_params, encode_choice, split_key

STATUS_ORDER = {"completed": 0, "pruned": 1, "running": 2, "interrupted": 3, "diverged": 4, "failed": 5}


def public_status(status: str) -> str:
    """The status a report shows: a trial stopped by the scheduler is `pruned`; others keep their name."""
    return "pruned" if status == "stopped" else status


@dataclass
class TrialRow:
    """One trial as the report shows it."""

    trial_id: str
    params: dict[str, Any]
    status: str
    metric: float | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    train_loss_smooth: float | None = None
    steps: int = 0
    tokens_seen: int = 0
    wall_time_s: float = 0.0
    step_time_s: float = 0.0  # the training steps only
    eval_time_s: float = 0.0
    seconds_per_step: float | None = None
    peak_memory_mb: float = 0.0
    pack_size: int | None = None  # trained in a pack (fika.pack): the most trials in one of its micro-steps
    trainable_params: int = 0
    device: str = ""
    seed: int | None = None
    started_at: float = 0.0
    confirm_of: str | None = None
    confirm_steps: int | None = None
    baseline: bool = False
    drawn: str = ""
    source: str = ""  # the earlier search's folder a warm start reused this trial from ("": this search's own)
    error: str = ""
    config: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    final_eval: dict | None = None  # the evals.jsonl record at eval_step: per-conversation sums
    eval_per_source: dict[str, float] = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    rung_values: dict[int, float] = field(default_factory=dict)


def param_value(spec: SearchSpec, config: dict, key: str) -> Any:
    """The value of a searched key (or a pair of keys) in a trial's resolved config, spelled as in the space."""
    values = [get_dotted(config, part) for part in split_key(key)]
    value = values if len(values) > 1 else values[0]
    choices = spec.space[key].choice
    return choices[choices.index(value)] if choices and value in choices else value


def search_state(run: Path) -> str:
    """`finished`, `running` (a process holds its folder) or `interrupted` (not finished, and no process holds its
    folder any more: a stopped, killed or crashed driver)."""
    if (read_json(run / "run.json") or {}).get("finished_at"):
        return "finished"
    return "running" if folder_holder(run) else "interrupted"


def load_rows(run: Path, spec: SearchSpec, running: bool = True) -> list[TrialRow]:
    """Every trial folder of a run as a TrialRow (running and failed ones included); `running=False`: nothing runs
    the search any more, so a trial without a result was interrupted."""
    draws = {d.get("trial"): d.get("drawn", "") for d in read_jsonl(run / "draws.jsonl")}
    rows = []
    spec_key = spec.model_dump_json()
    for directory in sorted((run / "trials").glob("*/")):
        row = cached_row(directory, spec, spec_key, running)
        if row is None:
            continue
        row.drawn = draws.get(directory.name, "")
        row.baseline = not row.confirm_of and is_baseline(spec, row)
        rows.append(row)
    return rows


def is_baseline(spec: SearchSpec, row: TrialRow) -> bool:
    """Whether a trial holds the base config's own values of every searched key (a spec with `baseline: true`)."""
    baseline = baseline_params(spec) if spec.baseline else None
    return baseline is not None and all(
        encode_choice(row.params[k]) == v or row.params[k] == v for k, v in baseline.items()
    )


def reused_rows(run: Path, spec: SearchSpec, own: set[str]) -> list[TrialRow]:
    """The trials of earlier searches that a warm start put into this search's study with their values (the same
    configs: `warm_start.json`), read from their folders there: they rank with this search's own trials (`own`:
    their ids). A folder that cannot be read any more is left out."""
    rows, spec_key = [], spec.model_dump_json()
    for earlier in read_json(run / "warm_start.json") or []:
        for value in earlier.get("values", []):
            row = cached_row(Path(earlier["run"]) / "trials" / value["trial"], spec, spec_key, running=False)
            if row is not None and not row.confirm_of and row.trial_id not in own:
                row.source, row.baseline = earlier["run"], is_baseline(spec, row)
                rows.append(row)
    return rows


def ranked_trials(run: Path, spec: SearchSpec, running: bool) -> tuple[list[TrialRow], list[TrialRow]]:
    """A search's ranking (its own trials and those a warm start reused, see `reused_rows`) and its re-runs."""
    rows = load_rows(run, spec, running)
    own = [row for row in rows if not row.confirm_of]
    reused = reused_rows(run, spec, {row.trial_id for row in own})
    return rank(own + reused), [row for row in rows if row.confirm_of]


_ROWS: dict[str, tuple[tuple, TrialRow | None]] = {}


def cached_row(directory: Path, spec: SearchSpec, spec_key: str, running: bool) -> TrialRow | None:
    """`load_row`, read again only when a file of the trial's folder changed since the last read in this process:
    a running search's report is rebuilt at every trial's end, and reading every finished trial again each time
    would grow with the trials."""
    try:
        files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()))
    except OSError:  # a folder removed meanwhile
        return None
    key = (spec_key, running, files)
    cached = _ROWS.get(str(directory))
    if cached is None or cached[0] != key:
        cached = _ROWS[str(directory)] = (key, load_row(directory, spec, running))
    return cached[1]


def trial_config_of(directory: Path) -> dict | None:
    """A trial folder's resolved config; {} for a trial whose worker died before it wrote one; None for a folder
    still being created."""
    try:  # libyaml's loader where it is installed: a long search's report reads hundreds of these
        config = yaml.load(
            (directory / "config.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        )
    except (OSError, yaml.YAMLError):
        config = None
    if isinstance(config, dict):
        return config
    return {} if (directory / "result.json").exists() else None


def load_row(directory: Path, spec: SearchSpec, running: bool) -> TrialRow | None:
    """One trial folder as a TrialRow: from its result when it ended, else from the metrics it wrote so far."""
    config = trial_config_of(directory)
    if config is None:
        return None
    records = read_jsonl(directory / "metrics.jsonl")
    result = read_json(directory / "result.json") or {}
    confirm = read_json(directory / "confirm.json") or {}
    status = public_status(result.get("status") or ("running" if running else "interrupted"))
    last = records[-1] if records else {}
    evals = {int(k): v for k, v in (result.get("eval_losses") or {}).items()}
    evals = evals or {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    eval_step = max(evals) if evals else None
    final = [e for e in read_jsonl(directory / "evals.jsonl") if e.get("step") == eval_step and "sums" in e]
    rungs = set(spec.rungs())
    row = TrialRow(
        trial_id=directory.name,
        params={key: param_value(spec, config, key) for key in spec.space},
        status=status,
        eval_loss=evals.get(eval_step),
        eval_step=eval_step,
        train_loss_smooth=result.get("train_loss_smooth", last.get("train_loss_smooth")),
        steps=result.get("steps") or last.get("step", 0),
        tokens_seen=result.get("tokens_seen") or last.get("tokens_seen", 0),
        wall_time_s=result.get("wall_time_s") or last.get("elapsed_s", 0.0),
        step_time_s=result.get("step_time_s") or sum(r.get("step_time_s") or 0.0 for r in records),
        eval_time_s=result.get("eval_time_s") or sum(r.get("eval_time_s") or 0.0 for r in records),
        seconds_per_step=result.get("seconds_per_step"),
        peak_memory_mb=result.get("peak_memory_mb", 0.0),
        pack_size=result.get("pack_size"),
        trainable_params=result.get("trainable_params", 0),
        device=result.get("device", ""),
        seed=get_dotted(config, "train.seed"),
        started_at=result.get("started_at") or 0.0,
        confirm_of=confirm.get("of"),
        confirm_steps=confirm.get("steps"),
        error=result.get("error") or "",
        config=config,
        records=records,
        final_eval=final[-1] if final else None,
        eval_per_source=result.get("eval_per_source") or last.get("eval_per_source") or {},
        data=read_json(directory / "data.json") or {},
        rung_values={r["step"]: r[spec.rung_key()] for r in records if r.get("step") in rungs and spec.rung_key() in r},
    )
    if spec.metric == "train_loss_smooth":
        row.metric = row.train_loss_smooth
    elif status == "pruned":
        row.metric = next(reversed(row.rung_values.values()), row.eval_loss)
    else:
        row.metric = row.eval_loss
    if status == "diverged" and not row.error:
        row.error = f"non-finite loss at step {row.steps}"
    return row


def rank(rows: list[TrialRow]) -> list[TrialRow]:
    """Completed by metric, then pruned (deeper rung first), running, interrupted, diverged, failed."""

    def key(row: TrialRow) -> tuple:
        finite = row.metric is not None and math.isfinite(row.metric)
        return (
            STATUS_ORDER.get(row.status, 5),
            -row.steps if row.status == "pruned" else 0,
            row.metric if finite else math.inf,
            row.trial_id,
        )

    return sorted(rows, key=key)


@dataclass
class Report:
    """Everything a report is built from: the spec, the ranked trials, and where it is written."""

    spec: SearchSpec
    run: Path
    out: Path
    ranked: list[TrialRow]
    confirms: list[TrialRow]
    state: str = "finished"  # see search_state

    @property
    def completed(self) -> list[TrialRow]:
        return [r for r in self.ranked if r.status == "completed" and r.metric is not None and math.isfinite(r.metric)]

    @property
    def best(self) -> TrialRow | None:
        return self.completed[0] if self.completed else None

    @property
    def shared_step(self) -> int:
        """The last step every ranked (completed or pruned) trial reached: where their train losses compare."""
        steps = [r.steps for r in self.ranked if r.status in ("completed", "pruned")]
        return min(steps, default=self.spec.max_steps)

    @property
    def baseline(self) -> TrialRow | None:
        return next((r for r in self.ranked if r.baseline), None)

    @property
    def own(self) -> list[TrialRow]:
        """The trials this search ran (the ranking less those a warm start reused)."""
        return [r for r in self.ranked if not r.source]


_PAIRED: dict[tuple, analysis.Paired | None] = {}


def paired_against(row: TrialRow, other: TrialRow | None) -> analysis.Paired | None:
    """`row` - `other` in the metric, paired over their shared eval conversations (a bootstrap, kept for the next
    build of a running search's report: the final evals of two trials do not change)."""
    if other is None or row is other or row.final_eval is None or other.final_eval is None:
        return None
    if row.eval_step != other.eval_step:
        return None
    key = (row.trial_id, other.trial_id, row.eval_step, sum(row.final_eval["sums"]), sum(other.final_eval["sums"]))
    if key not in _PAIRED:
        _PAIRED[key] = analysis.compare(row.final_eval, other.final_eval)
    return _PAIRED[key]


def train_loss_at(row: TrialRow, step: int) -> float | None:
    """A trial's mean train loss of the 10 steps up to `step`, from its metrics.jsonl."""
    return next((rec.get("train_loss_smooth") for rec in reversed(row.records) if rec.get("step") == step), None)

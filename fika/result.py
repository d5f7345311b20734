"""What one trial produced (`result.json`), and the summary `fika train` prints of it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fika.files import read_json, write_atomic


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
    stopped_by: str | None = None  # the signal that interrupted it (SIGINT, SIGTERM)
    pack_size: int | None = None  # trained in a pack: the most trials in one micro-step (its peak memory is the pack's)


def load_result(directory: Path) -> TrialResult | None:
    """The result.json of a run folder, or None when it is missing or cut short."""
    data = read_json(Path(directory) / "result.json")
    if not isinstance(data, dict):
        return None
    known = {k: v for k, v in data.items() if k in TrialResult.__dataclass_fields__}
    result = TrialResult(**known)
    result.eval_losses = {int(k): v for k, v in result.eval_losses.items()}
    return result


def add_records(result: TrialResult, records: list[dict]) -> None:
    """Fills a result's evals and timings from a run's metrics.jsonl records (a run picked up after a stop)."""
    for record in records:
        if "eval_loss" in record:
            result.eval_losses[record["step"]] = record["eval_loss"]
            result.eval_loss = record["eval_loss"]
            result.eval_per_source = record.get("eval_per_source", {})
    result.step_time_s = sum(r.get("step_time_s", 0.0) for r in records)
    result.eval_time_s = sum(r.get("eval_time_s", 0.0) for r in records)


def write_failed_result(directory: Path, error: str) -> None:
    """Records a run that failed outside `run_trial` (before it started, or cut short by a killed process)."""
    result = TrialResult(status="failed", output_dir=str(directory), error=error, ended_at=time.time())
    write_atomic(Path(directory) / "result.json", json.dumps(asdict(result), indent=1))


# --- memory ---------------------------------------------------------------------------------------------


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

"""A running trial, observed step by step: its losses and evals, timings, peak memory, metrics files and
checkpoints, fed by a transformers callback."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fika.config import TrialConfig
from fika.files import read_jsonl, write_atomic
from fika.result import TrialResult, add_records

SMOOTHING_WINDOW = 10
FAULT_ENV = "FIKA_FAIL_AT_STEP"  # fault injection for tests: raise a simulated out-of-memory error at that step
Report = Callable[[dict], bool | None]


@dataclass
class TrialHooks:
    """How a caller watches and steers a run.

    `report(record)` is called after every logged step (see fika.trial); returning True stops the run as
    `stopped` (an early-stopping scheduler's decision). `on_start(max_steps)` is called before the first step.
    `interrupted()` is asked after every step: a true value (the user's Ctrl-C, a scheduler's SIGTERM) ends the run
    after that step as `interrupted`; a string is recorded as what stopped it (`stopped_by`, say SIGTERM). `quick_evals` = (steps, size): cheaper evals on a stratified subset of the eval set
    at those steps, for a scheduler's rungs.
    """

    report: Report | None = None
    on_start: Callable[[int], None] | None = None
    interrupted: Callable[[], bool | str | None] | None = None
    quick_evals: tuple[list[int], int] | None = None


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


class TrialRun:
    """The state of one running trial: result, loss window, evals, timings, metrics files, checkpoints."""

    def __init__(self, config: TrialConfig, out: Path, hooks: TrialHooks):
        self.config, self.out, self.hooks = config, out, hooks
        self.result = TrialResult(output_dir=str(out), started_at=time.time())
        self.started = time.perf_counter()
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.eval_steps: set[int] = set()
        self.quick_steps, self.quick_size = hooks.quick_evals or ([], 0)
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
        add_records(self.result, records)
        self.checkpoint_evals.update(self.result.eval_losses)
        self.result.resumed_from = step

    def run_eval(self, model, step: int, rows: list[int] | None = None):
        from fika.evaluate import evaluate

        began = time.perf_counter()
        result = evaluate(model, self.eval_dataset, self.pad_token_id, rows=rows)
        return result, time.perf_counter() - began

    def step_end(self, model, step: int) -> None:
        """Times the step just trained, then runs the evals due at this step (full, or a scheduler's subset)."""
        self.step_timed(step)
        if self.eval_due(step):
            result, spent = self.run_eval(model, step, self.eval_rows(step))
            self.record_eval(step, result, spent)

    def step_timed(self, step: int) -> None:
        """Records the time of the step just trained (and raises the simulated fault when one is asked for)."""
        self.step_times.append(time.perf_counter() - self.step_began)
        self.result.step_time_s += self.step_times[-1]
        if self.result.time_to_first_step_s is None:
            self.result.time_to_first_step_s = round(time.perf_counter() - self.started, 3)
        if self.fail_at and step >= self.fail_at:
            raise RuntimeError(f"CUDA out of memory (simulated by {FAULT_ENV}={self.fail_at})")

    def eval_due(self, step: int) -> bool:
        """Whether an eval runs after `step`: a full one, or a scheduler's subset."""
        return step in self.eval_steps or step in self.quick_steps

    def eval_rows(self, step: int) -> list[int] | None:
        """The eval rows of `step`'s eval: None for the whole eval set, else a scheduler's stratified subset."""
        if step in self.eval_steps:
            return None
        from fika.evaluate import subset_rows

        return subset_rows(self.eval_dataset["source"], self.quick_size)

    def record_eval(self, step: int, result, spent: float) -> None:
        """Keeps an eval of `step` for the step's record (a full eval also goes to evals.jsonl)."""
        self.result.eval_time_s += spent
        if step not in self.eval_steps:
            self.pending.update(eval_loss_subset=result.loss, eval_time_s=round(spent, 3))
            return
        self.evals.write(json.dumps(result.record(step)) + "\n")
        self.evals.flush()
        self.pending.update(eval_loss=result.loss, eval_per_source=result.per_source(), eval_time_s=round(spent, 3))

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
        stop = self.hooks.report is not None and bool(self.hooks.report(record))
        if self.result.status == "running" and self.interrupted_at(step):  # asked to end, not a decision on it
            self.result.status = "interrupted"
        elif stop and self.result.status == "running" and step < self.result.max_steps:  # after its last: completed
            self.result.status = "stopped"
        return self.result.status != "running"

    def interrupted_at(self, step: int) -> bool:
        """Whether the run is asked to end after `step` (never after its last: it completes)."""
        if self.hooks.interrupted is None or step >= self.result.max_steps:
            return False
        asked = self.hooks.interrupted()
        if isinstance(asked, str):
            self.result.stopped_by = asked
        return bool(asked)

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


def make_callback(trial: TrialRun):
    """A transformers TrainerCallback that feeds the TrialRun (built lazily: heavy imports)."""
    from transformers import TrainerCallback

    class Observer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trial.result.max_steps = state.max_steps
            trial.eval_steps = eval_schedule(trial.config, state.max_steps)
            if trial.hooks.on_start is not None:
                trial.hooks.on_start(state.max_steps)

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

"""What the person running fika reads: progress on stderr, a search's lines on stdout."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

LOG_EVERY_S = 10  # seconds between two progress lines where no bar is shown


def log(message: str) -> None:
    """Progress for long steps, on stderr so that `--json` output stays clean."""
    print(message, file=sys.stderr, flush=True)


def say(message: str) -> None:
    """A line for the person running a search, on stdout, at once."""
    print(message, flush=True)


class TrainProgress:
    """What a training run shows as it goes: a step bar in a terminal (lines every 10 steps in a log), the plan and
    a time estimate before the first step, the pace after 5 steps, and every eval."""

    def __init__(self, out, config, estimate: Callable[[int], str]):
        from tqdm.auto import tqdm

        self.out, self.config, self.estimate = out, config, estimate
        self.bar = tqdm(total=None, unit="step", disable=None)
        self.started: float | None = None

    def on_start(self, max_steps: int) -> None:
        t = self.config.train
        self.started = time.perf_counter()
        self.bar.total = max_steps
        log(
            f"train: {max_steps:,} steps of {t.batch_size} x {t.gradient_accumulation} conversations into "
            f"{self.out}; {self.estimate(max_steps)}"
        )

    def report(self, record: dict) -> None:
        bar = self.bar
        bar.update(record["step"] - bar.n)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", avg10=f"{record['train_loss_smooth']:.4f}")
        if record["step"] == 5 and self.started is not None and bar.total:
            pace = (time.perf_counter() - self.started) / 5
            log(f"train: {pace:.2f} s/step over the first 5 steps: about {pace * bar.total / 60:.0f} min in all")
        if "eval_loss" in record or (bar.disable and record["step"] % 10 == 0):
            line = f"step {record['step']}/{record['max_steps']}: train loss {record['train_loss']:.4f} "
            line += f"(avg10 {record['train_loss_smooth']:.4f}), lr {record['learning_rate']:.2e}"
            line += f", eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class RowsProgress:
    """How far a long pass over rows is: done of total, rows per second and the time left, as a bar in a terminal
    and as a line every LOG_EVERY_S seconds in a log (a search's driver log, CI, a batch job's output)."""

    def __init__(self, what: str, total: int, unit: str = "rows"):
        from tqdm.auto import tqdm

        self.what, self.total, self.unit = what, total, unit
        self.bar = tqdm(total=total, desc=what, unit=" " + unit.split()[-1], disable=None, leave=False)
        self.started = self.logged = time.monotonic()

    def update(self, done: int) -> None:
        self.bar.update(done - self.bar.n)
        now = time.monotonic()
        if self.bar.disable and now - self.logged >= LOG_EVERY_S:
            self.logged = now
            log(f"{self.what}: {self.line(done, now - self.started)}")

    def line(self, done: int, seconds: float) -> str:
        rate = done / seconds if seconds > 0 else 0.0
        left = f", {duration((self.total - done) / rate)} left" if rate > 0 and done < self.total else ""
        return f"{done:,} of {self.total:,} {self.unit} ({done / max(self.total, 1):.0%}), {rate:,.0f}/s{left}"

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `1 h 05 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

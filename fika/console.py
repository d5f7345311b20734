"""What the person running fika reads: progress on stderr, a search's lines on stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable


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
        import time

        t = self.config.train
        self.started = time.perf_counter()
        self.bar.total = max_steps
        log(
            f"train: {max_steps:,} steps of {t.batch_size} x {t.gradient_accumulation} conversations into "
            f"{self.out}; {self.estimate(max_steps)}"
        )

    def report(self, record: dict) -> None:
        import time

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

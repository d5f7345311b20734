"""The best trial: the lines that say how to reproduce it and run it in full, the `fika confirm` commands that
check it, and `best.yaml`, its config runnable as is. When a re-run at a longer horizon found another winner with
another learning rate, that one is the config of the full run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from fika.search.report.folder import default_report_dir, relative
from fika.search.report.render import fmt
from fika.search.report.rows import Report, TrialRow
from fika.search.report.verdicts import horizon_winner


def chosen(r: Report) -> TrialRow:
    """The trial whose config the full run uses: the longer horizon's winner when its learning rate differs from
    the search's winner's, else the search's winner."""
    return horizon_winner(r) or r.best


def steps_per_epoch(best: TrialRow) -> int | None:
    rows = best.data.get("train_rows")
    t = best.config.get("train", {})
    if not rows:
        return None
    return math.ceil(rows / (t.get("batch_size", 1) * t.get("gradient_accumulation", 1)))


def full_run_command(r: Report) -> str:
    best_file = relative(r.out / "best.yaml")
    return (
        f"fika train --config {best_file} train.max_steps=-1 train.epochs=3 train.num_evals=10 "
        f"train.checkpoints=true output.dir=outputs/{r.spec.name}-full"
    )


def confirm_commands(r: Report) -> list[str]:
    """The commands that measure what the ranking cannot tell: seed noise and the horizon."""
    out = "" if r.out.resolve() == default_report_dir(r.spec.name).resolve() else f" --out {relative(r.out)}"
    run = relative(r.run)
    top = min(3, len(r.completed))
    return [
        f"Seed noise: `fika confirm {run} --top {top} --seeds 3{out}` re-runs the best {top} with 3 other seeds each.",
        f"Horizon: `fika confirm {run} --top {min(6, len(r.completed))} --seeds 0 --steps {4 * r.spec.max_steps}{out}` "
        f"re-runs them with a {4 * r.spec.max_steps}-step schedule: does the {r.spec.max_steps}-step order hold?",
    ]


def best_lines(r: Report) -> list[str]:
    best = chosen(r)
    longer = (
        f" (the winner at the longer horizon; at {r.spec.max_steps} steps `{r.best.trial_id}` won)"
        if best is not r.best
        else ""
    )
    reused = f" (a trial of `{relative(Path(best.source))}`, reused by the warm start)" if best.source else ""
    lines = [
        f"`{best.trial_id}`{reused}: {r.spec.metric} {fmt(best.metric)} at step {r.spec.max_steps}{longer}.",
        f"Reproduce the trial: `fika train --config {relative(r.out / 'best.yaml')}`",
        f"The full run (3 epochs, 10 evals, checkpoints; `fika train --resume DIR` continues a killed run): "
        f"`{full_run_command(r)}`",
    ]
    per_epoch = steps_per_epoch(best)
    if per_epoch and best.seconds_per_step:
        seconds = 3 * per_epoch * best.seconds_per_step
        took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
        lines.append(
            f"At the {best.seconds_per_step:.2f} s/step measured here ({best.device}), 3 epochs of {per_epoch:,} "
            f"steps take about {took} plus evals."
        )
    return lines


def best_config(r: Report) -> dict:
    """The best trial's full TrialConfig as a mapping, runnable as is (its outputs in `outputs/<name>-best`)."""
    config = json.loads(json.dumps(chosen(r).config))
    config["output"].update(dir=f"outputs/{r.spec.name}-best", save_adapter=True)
    return config


def best_yaml(r: Report) -> str:
    """`best.yaml`: the best trial's config; the header shows how to make it a full run."""
    best, config = chosen(r), best_config(r)
    header = (
        f"# The best trial of search '{r.spec.name}': {best.trial_id}, {r.spec.metric} {fmt(best.metric)} at step {best.steps}.\n"
        f"#   fika train --config {relative(r.out / 'best.yaml')}            # reproduces the trial\n"
        f"#   {full_run_command(r)}   # the full run\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)

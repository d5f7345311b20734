"""A long search: does the driver's cost per trial stay flat as the trials add up?

  python bench/search_scale.py                        # 500 tiny-model trials, 2 at a time (about 10 minutes here)
  python bench/search_scale.py --trials 100 --block 20

Runs a real search (Ray Tune + Optuna + ASHA) of short trials of the `tiny` model, 1 CPU each, and prints, per block
of trials in the order they started: the mean time a trial's slot spent outside its training steps (its worker's
wait since the slot's previous trial ended, the trial's start-up, evals and end: everything but the steps), and
the share of the block's slot time with no trial in it. Then what the Optuna study holds. Goal: the last block
within 1.5x of the first, no block above 1 s per trial, and the study holding one trial per trial folder (plus the
baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SPACE = {
    "train.learning_rate": {"loguniform": [1.0e-4, 2.0e-2]},
    "train.lr_scheduler": {"choice": ["linear", "cosine", "cosine_with_restarts"]},
    "lora.r,lora.alpha": {"choice": [[8, 8], [16, 16], [16, 32]]},
    "lora.dropout": {"uniform": [0.0, 0.1]},
}


def trial_slots(run: Path) -> dict[str, tuple[int, dict]]:
    """Each trial's worker (its pid, from the records Tune kept) and result."""
    slots = {}
    for path in (run / "trials").glob("*/result.json"):
        trial = path.parent.name
        records = [json.loads(line) for p in (run / "tune").glob(f"*{trial}*/result.json") for line in p.open()]
        if records:
            slots[trial] = (records[-1]["pid"], json.loads(path.read_text()))
    return slots


def outside_steps(run: Path) -> list[tuple[float, float, float]]:
    """Per trial, in the order they started: (time of its slot outside training steps, slot time, idle time).

    A trial's slot time runs from the end of the previous trial on the same worker (or the fit's start) to its own
    end; idle is the part of it before the trial started.
    """
    fits = json.loads((run / "run.json").read_text())["fits"]
    start = fits[0]["started_at"]
    by_worker = defaultdict(list)
    for pid, result in trial_slots(run).values():
        by_worker[pid].append(result)
    rows = []
    for results in by_worker.values():
        previous_end = start
        for r in sorted(results, key=lambda r: r["started_at"]):
            slot = r["ended_at"] - previous_end
            rows.append((r["started_at"], slot - r["step_time_s"], slot, max(0.0, r["started_at"] - previous_end)))
            previous_end = r["ended_at"]
    return [row[1:] for row in sorted(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--storage", default=None, help="where the run goes (default: a temporary folder)")
    args = parser.parse_args()

    import fika.search

    storage = Path(args.storage or tempfile.mkdtemp(prefix="fika-scale-"))
    overrides = {
        "name": f"scale-{args.trials}",
        "num_samples": args.trials,
        "space": SPACE,
        "base.train.max_steps": args.steps,
        "scheduler.grace_period": args.steps // 2,
        "max_concurrent": 2,
        "storage": str(storage),
        "report_dir": str(storage / "report"),
    }
    began = time.time()
    result = fika.search.run("smoke", overrides)
    wall = time.time() - began
    rows = outside_steps(result.run_dir)
    print(f"{len(rows)} trials in {wall:.0f} s ({result.run_dir})\n")
    print("| trials | outside steps per trial (s) | slot time per trial (s) | slot time with no trial |")
    print("|---:|---:|---:|---:|")
    blocks = [rows[i : i + args.block] for i in range(0, len(rows), args.block)]
    for i, block in enumerate(blocks):
        outside = statistics.mean(r[0] for r in block)
        slot = statistics.mean(r[1] for r in block)
        idle = sum(r[2] for r in block) / max(sum(r[1] for r in block), 1e-9)
        print(f"| {i * args.block + 1}-{i * args.block + len(block)} | {outside:.2f} | {slot:.2f} | {idle:.0%} |")
    first, last = statistics.mean(r[0] for r in blocks[0]), statistics.mean(r[0] for r in blocks[-1])
    print(f"\nlast block / first block: {last / first:.2f}x")
    import optuna
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(
        study_name=overrides["name"],
        storage=optuna.storages.JournalStorage(JournalFileBackend(str(result.run_dir / "optuna.journal"))),
    )
    states = defaultdict(int)
    for t in study.trials:
        states[t.state.name] += 1
    folders = len(list((result.run_dir / "trials").glob("*/")))
    print(f"study: {len(study.trials)} trials ({dict(states)}) for {folders} trial folders")


if __name__ == "__main__":
    main()

"""How much search the searcher saves, measured like a tabular benchmark (LCBench, YAHPO) on the demo's space.

  python bench/search_quality.py --grid          # once: every config of bench/demo_grid.yaml (the demo's space),
                                                 # evals at steps 20, 40 and 60, curves kept -> bench/demo_grid.json
                                                 # (about 117 min, 2 cores)
  python bench/search_quality.py                 # replay searchers over that table (seconds)
  python bench/search_quality.py --seeds 50 --trials 12

Trials are deterministic, so a searcher replayed over the table sees what it would have seen in a real search:
TPE (Optuna's TPESampler, with fika's start-up count and no repeated draws) and random draws, grid order, each
with Ray's own ASHAScheduler deciding on the rung metric, or FIFO; two trials at a time, in simulated time
counted in training steps. Per searcher, over the seeds: the trial-steps until a trial within 1% of the grid's
best (and one within the eval noise of it: its paired 95% interval against the best includes 0), and the regret
at 25% of the grid's steps. The rung-metric table replays ASHA over random arrival orders of all configs with
each rung metric and counts how often it keeps or stops a trial as the full eval would; the eval-size table
asks how often two disjoint sets of k eval conversations pick the same winner among 6 random configs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TABLE = HERE / "demo_grid.json"


# --- the table --------------------------------------------------------------------------------------


def run_grid(spec_path: str, out: Path) -> None:
    """Runs every config of a spec's space (FIFO; full evals at its rungs, a third and two thirds of the steps, and
    the end) and writes the table."""
    from fika.files import read_json, read_jsonl
    from fika.search.driver import run_search
    from fika.search.report.rows import param_value
    from fika.search.spec import load_spec

    storage = Path(tempfile.mkdtemp(prefix="fika-grid-"))
    searched = load_spec(spec_path)
    evals = sorted({*searched.rungs(), searched.max_steps // 3, 2 * searched.max_steps // 3})
    spec = load_spec(
        spec_path,
        [
            "name=grid-table",
            "searcher=grid",
            "num_samples=1",
            "scheduler={kind: fifo}",
            "baseline=false",
            f"base.train.eval_steps={evals}",
            f"storage={storage}",
        ],
    )
    run_search(spec)
    rows = []
    for folder in sorted((storage / "grid-table" / "trials").iterdir()):
        import yaml

        config = yaml.safe_load((folder / "config.yaml").read_text())
        records = read_jsonl(folder / "metrics.jsonl")
        evals = {e["step"]: {"sums": e["sums"], "counts": e["counts"]} for e in read_jsonl(folder / "evals.jsonl")}
        result = read_json(folder / "result.json") or {}
        params = {key: param_value(spec, config, key) for key in spec.space}  # spelled as in the space
        rows.append(
            {
                "trial": folder.name,
                "params": params,
                "status": result.get("status"),
                "train_loss_smooth": [r["train_loss_smooth"] for r in records],
                "evals": evals,
                "seconds_per_step": result.get("seconds_per_step"),
                "eval_time_s": result.get("eval_time_s"),
            }
        )
    ids = read_jsonl(next((storage / "grid-table" / "trials").iterdir()) / "evals.jsonl")[0]["ids"]
    out.write_text(
        json.dumps(
            {
                "spec": Path(spec_path).name,
                "space": {k: v.model_dump(exclude_none=True) for k, v in spec.space.items()},
                "max_steps": spec.max_steps,
                "grace": searched.scheduler.grace_period or searched.max_steps // 3,
                "reduction": searched.scheduler.reduction_factor,
                "eval_ids": ids,
                "rows": rows,
            }
        )
    )
    print(f"wrote {out}: {len(rows)} configs")


# --- replay -------------------------------------------------------------------------------------------


class Table:
    """The grid's results: each config's final eval loss, its rung values under each rung metric."""

    def __init__(self, data: dict, subset: int = 8):
        self.rows = data["rows"]
        self.max_steps, self.grace, self.reduction = data["max_steps"], data["grace"], data["reduction"]
        self.space = data["space"]
        self.keys = list(self.space)
        self.final = np.array([self.eval_loss(r, self.max_steps) for r in self.rows])
        self.best = int(np.argmin(self.final))
        sources = len(data["eval_ids"])
        self.subset = sorted(random.Random(0).sample(range(sources), subset))
        self.index = {json.dumps(r["params"], sort_keys=True): i for i, r in enumerate(self.rows)}
        from fika.search.report.analysis import paired_bootstrap

        best = self.rows[self.best]["evals"][str(self.max_steps)]
        self.within_noise = []
        for row in self.rows:
            mine = row["evals"][str(self.max_steps)]
            self.within_noise.append(
                not paired_bootstrap(mine["sums"], best["sums"], best["counts"], samples=1000).significant
            )

    @staticmethod
    def eval_loss(row: dict, step: int, positions: list[int] | None = None) -> float:
        e = row["evals"][str(step)]
        idx = positions if positions is not None else range(len(e["sums"]))
        return sum(e["sums"][i] for i in idx) / sum(e["counts"][i] for i in idx)

    def rung_value(self, i: int, step: int, metric: str) -> float:
        row = self.rows[i]
        if metric == "train_loss_smooth":
            return row["train_loss_smooth"][step - 1]
        if metric == "eval_subset":
            return self.eval_loss(row, step, self.subset)
        return self.eval_loss(row, step)


class Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def asha(rungs_grace: int, reduction: float, max_t: int, metric: str):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step", metric=metric, mode="min", max_t=max_t, grace_period=rungs_grace, reduction_factor=reduction
    )


def replay(
    table: Table,
    searcher: str,
    scheduler: str,
    seed: int,
    budget_steps: int,
    trials: int,
    startup: int,
    rung_metric: str = "train_loss_smooth",
) -> list[tuple[int, float, int]]:
    """One simulated search; returns (trial-steps spent, best final eval loss so far) after each completed trial."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = random.Random(seed)
    distributions = {k: CategoricalDistribution([json.dumps(c) for c in table.space[k]["choice"]]) for k in table.keys}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup) if searcher == "tpe" else None
    study = optuna.create_study(direction="minimize", sampler=sampler) if sampler else None
    order = list(range(len(table.rows)))
    rng.shuffle(order)
    grace, reduction = table.grace, table.reduction
    sched = asha(grace, reduction, table.max_steps, rung_metric) if scheduler == "asha" else None
    rungs = (
        sorted({int(grace * reduction**k) for k in range(6) if grace * reduction**k < table.max_steps}) if sched else []
    )
    seen: set[int] = set()
    events: list[tuple[float, int, str, int]] = []  # (time, slot, kind, trial index)
    spent, best, curve = 0, float("inf"), []
    started = 0
    asked: dict[int, object] = {}

    def draw() -> int | None:
        if searcher == "tpe":
            for _ in range(21):
                t = study.ask(distributions)
                i = table.index[json.dumps({k: json.loads(t.params[k]) for k in table.keys}, sort_keys=True)]
                if i not in seen:
                    asked[i] = t
                    return i
                study.tell(t, state=optuna.trial.TrialState.FAIL)
            left = [i for i in order if i not in seen]
            if not left:
                return None
            i = left[0]
            study.enqueue_trial({k: json.dumps(table.rows[i]["params"][k]) for k in table.keys})
            asked[i] = study.ask(distributions)
            return i
        left = [i for i in order if i not in seen]
        return (left[0] if searcher == "grid" else rng.choice(left)) if left else None

    def launch(now: float, slot: int) -> None:
        nonlocal started
        if started >= trials or spent >= budget_steps:
            return
        i = draw()
        if i is None:
            return
        seen.add(i)
        started += 1
        if sched:
            sched.on_trial_add(None, Trial(str(i)))
        for rung in rungs:
            events.append((now + rung, slot, f"rung{rung}", i))
        events.append((now + table.max_steps, slot, "end", i))

    for slot in range(2):
        launch(0.0, slot)
    stopped: set[int] = set()
    while events:
        events.sort()
        now, slot, kind, i = events.pop(0)
        if i in stopped:
            continue
        if kind.startswith("rung"):
            step = int(kind[4:])
            value = table.rung_value(i, step, rung_metric)
            if sampler:
                asked[i].report(value, step)
            action = sched.on_trial_result(None, Trial(str(i)), {"step": step, rung_metric: value})
            if action == "STOP":
                stopped.add(i)
                spent += step
                if sampler:
                    study.tell(asked[i], state=optuna.trial.TrialState.PRUNED)
                events[:] = [e for e in events if e[3] != i]
                launch(now, slot)
            continue
        spent += table.max_steps
        best = min(best, float(table.final[i]))
        curve.append((spent, best, i))
        if sampler:
            study.tell(asked[i], float(table.final[i]))
        launch(now, slot)
    return curve


def summarize(table: Table, curves: list[list[tuple[int, float, int]]], budget: int) -> dict:
    target = table.final[table.best] * 1.01
    to_one, to_noise, regret = [], [], []
    for curve in curves:
        to_one.append(next((s for s, b, _ in curve if b <= target), None))
        to_noise.append(next((s for s, _, i in curve if table.within_noise[i]), None))
        by_quarter = [b for s, b, _ in curve if s <= budget / 4]
        regret.append((by_quarter[-1] if by_quarter else float("inf")) - table.final[table.best])

    def median(values):
        reached = [v for v in values if v is not None]
        return (statistics.median(reached) if reached else None, len(reached) / len(values))

    return {"to_1pct": median(to_one), "to_noise": median(to_noise), "regret_25": statistics.median(regret)}


def rung_agreement(table: Table, metric: str, orders: int = 50) -> float:
    """How often ASHA on `metric` keeps or stops a trial as ASHA on the full eval does (same arrival orders)."""
    agree = total = 0
    for seed in range(orders):
        order = list(range(len(table.rows)))
        random.Random(seed).shuffle(order)
        decisions = {}
        grace = table.grace
        for m in ("eval_loss", metric):
            sched = asha(grace, table.reduction, table.max_steps, m)
            decisions[m] = []
            for i in order:
                sched.on_trial_add(None, Trial(str(i)))
                decisions[m].append(
                    sched.on_trial_result(None, Trial(str(i)), {"step": grace, m: table.rung_value(i, grace, m)})
                )
        agree += sum(a == b for a, b in zip(decisions["eval_loss"], decisions[metric], strict=True))
        total += len(order)
    return agree / total


def eval_size_agreement(table: Table, size: int, trials: int = 6, draws: int = 2000) -> float:
    """How often two disjoint eval sets of `size` conversations name the same winner of `trials` random configs."""
    sums = np.array([r["evals"][str(table.max_steps)]["sums"] for r in table.rows])
    counts = np.array([r["evals"][str(table.max_steps)]["counts"] for r in table.rows])
    rng = random.Random(0)
    agree = 0
    for _ in range(draws):
        positions = rng.sample(range(sums.shape[1]), 2 * size)
        picked = rng.sample(range(len(table.rows)), trials)
        winners = [
            min(picked, key=lambda i: sums[i, half].sum() / counts[i, half].sum())
            for half in (positions[:size], positions[size:])
        ]
        agree += winners[0] == winners[1]
    return agree / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grid",
        nargs="?",
        const=str(HERE / "demo_grid.yaml"),
        metavar="SPEC",
        help="run a spec's whole space (default: bench/demo_grid.yaml, the demo's space) and write the table first",
    )
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--trials", type=int, nargs="+", default=[6, 12, 20])
    parser.add_argument("--table", default=str(TABLE))
    args = parser.parse_args()
    if args.grid:
        run_grid(args.grid, Path(args.table))
    table = Table(json.loads(Path(args.table).read_text()))
    budget = len(table.rows) * table.max_steps
    print(
        f"grid: {len(table.rows)} configs x {table.max_steps} steps = {budget} trial-steps; best eval loss "
        f"{table.final[table.best]:.4f} ({table.rows[table.best]['params']}); {sum(table.within_noise)} configs within "
        f"its eval noise; the median config {float(np.median(table.final)):.4f}"
    )
    print("\n| rung metric | same keep/stop as the full eval | eval cost at the rung |")
    print("|---|---:|---|")
    for metric, cost in (
        ("eval_loss", "the full eval set"),
        ("eval_subset", "8 of the eval conversations"),
        ("train_loss_smooth", "none"),
    ):
        print(f"| {metric} | {100 * rung_agreement(table, metric):.0f}% | {cost} |")
    conversations = len(table.rows[0]["evals"][str(table.max_steps)]["sums"])
    print("\n| eval conversations | two disjoint sets name the same winner of 6 trials |\n|---:|---:|")
    for size in (4, 6, 8, 12)[: conversations // 2]:
        print(f"| {size} | {100 * eval_size_agreement(table, size):.1f}% |")
    for trials in args.trials:
        print(
            f"\n{trials} trials, 2 at a time, {args.seeds} seeds (steps: trial-steps of training; the grid spends {budget})"
        )
        print(
            "| searcher | steps to within 1% of the best (reached) | steps to within the eval noise (reached) | "
            "median regret at 25% of the grid's steps |\n|---|---:|---:|---:|"
        )
        for searcher, scheduler in (
            ("tpe", "asha"),
            ("tpe", "fifo"),
            ("random", "asha"),
            ("random", "fifo"),
            ("grid", "fifo"),
        ):
            startup = min(10, max(3, trials // 3))
            curves = [replay(table, searcher, scheduler, seed, budget, trials, startup) for seed in range(args.seeds)]
            s = summarize(table, curves, budget)

            def show(pair):
                value, share = pair
                return f"{value:,.0f} ({100 * share:.0f}%)" if value is not None else f"- ({100 * share:.0f}%)"

            print(f"| {searcher} + {scheduler} | {show(s['to_1pct'])} | {show(s['to_noise'])} | {s['regret_25']:.4f} |")


if __name__ == "__main__":
    main()

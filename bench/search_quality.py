"""How much search the searcher saves, measured like a tabular benchmark (LCBench, YAHPO) on the demo's space.

  python bench/search_quality.py --grid          # once: every config of bench/demo_grid.yaml (the demo's space),
                                                 # evals at steps 20, 40 and 60, curves kept -> bench/demo_grid.json
                                                 # (about 117 min, 2 cores)
  python bench/search_quality.py                 # replay searchers over the tables (GP rows: minutes each)
  python bench/search_quality.py --searchers local tpe --seeds 90 --trials 12
  python bench/search_quality.py --only prior    # the tables with their learning rates, then ranks, reversed
  python bench/search_quality.py --only warm --searchers local tpe --seeds 90   # warm starts, also priors reversed

Trials are deterministic, so a searcher replayed over the table sees what it would have seen in a real search:
fika's samplers (the local searcher, TPE, GP: fika.search.tuner.optuna_sampler, with fika's start-up count and no
repeated draws) and random draws, grid order, each with Ray's own ASHAScheduler deciding on the rung metric (one
over all trials, or one per lr schedule as fika's default `scheduler.compare_within`), or FIFO; two trials at a
time, in simulated time counted in training steps. Per searcher, over the seeds: the trial-steps until a trial within 1% of the grid's
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
from pathlib import Path

import numpy as np
from grid_table import run_grid

HERE = Path(__file__).resolve().parent
TABLES = (HERE / "demo_grid.json", HERE / "english_grid.json")  # the replays' two problems


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
    """What Ray's schedulers read of a trial: its id and config (the params as Tune holds them)."""

    def __init__(self, trial_id: str, config: dict | None = None):
        self.trial_id, self.config = trial_id, config or {}


def asha(rungs_grace: int, reduction: float, max_t: int, metric: str, within: tuple[str, ...] = ()):
    """Ray's ASHAScheduler as fika builds it; with `within` keys, one per group of their values
    (fika.search.grouped_asha, `scheduler.compare_within`)."""
    from ray.tune.schedulers import ASHAScheduler

    from fika.search.grouped_asha import GroupedASHAScheduler

    options = dict(
        time_attr="step", metric=metric, mode="min", max_t=max_t, grace_period=rungs_grace, reduction_factor=reduction
    )
    return GroupedASHAScheduler(list(within), **options) if within else ASHAScheduler(**options)


def make_study(table: Table, searcher: str, seed: int, startup: int, seen: dict):
    """An Optuna study over the table's space with fika's sampler for `searcher` (tpe or gp), wrapped as a search
    wraps it: a configuration that ran is never proposed again (fika.search.sampler.NoRepeatSampler)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from fika.search.sampler import NoRepeatSampler, config_key
    from fika.search.trials import encode_choice
    from fika.search.tuner import optuna_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = {k: CategoricalDistribution([encode_choice(c) for c in table.space[k]["choice"]]) for k in table.keys}
    inner = optuna_sampler(searcher, seed, startup)

    def untried() -> list[dict]:
        configs = [{k: encode_choice(r["params"][k]) for k in table.keys} for r in table.rows]
        return [c for c in configs if config_key(c) not in seen]

    sampler = NoRepeatSampler(inner, seen, untried)
    sampler.space = space
    return optuna.create_study(direction="minimize", sampler=sampler), space


def replay(
    table: Table,
    searcher: str,
    scheduler: str,
    seed: int,
    budget_steps: int,
    trials: int,
    startup: int,
    rung_metric: str = "train_loss_smooth",
    first: list[dict] | None = None,
    known: list[int] | None = None,
) -> list[tuple[int, float, int]]:
    """One simulated search; returns (trial-steps spent, best final eval loss so far, the trial) after each completed
    trial. `first`: values (of some or all keys, as the study holds them) that the first trials take, the other keys
    drawn by the sampler (a warm start from a search that differs; Optuna searchers only); `known`: configs whose
    final eval losses enter the study before the search starts, never run (a warm start from the same configs)."""
    import optuna

    from fika.search.sampler import config_key
    from fika.search.trials import decode_choice, encode_choice

    rng = random.Random(seed)
    seen: dict[str, int] = {}
    optuna_searcher = searcher in ("tpe", "gp", "local")
    study, space = make_study(table, searcher, seed, startup, seen) if optuna_searcher else (None, None)
    params_of = [{k: encode_choice(r["params"][k]) for k in table.keys} for r in table.rows]
    for i in known or []:
        seen[config_key(params_of[i])] = i
        if study is not None:
            study.add_trial(
                optuna.trial.create_trial(params=params_of[i], distributions=space, value=float(table.final[i]))
            )
    queue = [params for params in first or [] if config_key(params) not in seen]
    order = list(range(len(table.rows)))
    rng.shuffle(order)
    grace, reduction = table.grace, table.reduction
    within = ("train.lr_scheduler",) if scheduler == "asha-within" else ()
    sched = asha(grace, reduction, table.max_steps, rung_metric, within) if scheduler.startswith("asha") else None
    rungs = (
        sorted({int(grace * reduction**k) for k in range(6) if grace * reduction**k < table.max_steps}) if sched else []
    )
    events: list[tuple[float, int, str, int]] = []  # (time, slot, kind, trial index)
    spent, best, curve = 0, float("inf"), []
    started = 0
    asked: dict[int, object] = {}

    def draw() -> int | None:
        if optuna_searcher:
            if queue:
                study.enqueue_trial(queue.pop(0), user_attrs={"fika_drawn": "warm"})  # as fika.search.warm_start
            if len(seen) >= len(table.rows):
                return None
            t = study.ask(space)
            i = table.index[json.dumps({k: decode_choice(t.params[k]) for k in table.keys}, sort_keys=True)]
            seen[config_key(params_of[i])] = i
            asked[i] = t
            return i
        left = [i for i in order if config_key(params_of[i]) not in seen]
        if not left:
            return None
        i = left[0] if searcher == "grid" else rng.choice(left)
        seen[config_key(params_of[i])] = i
        return i

    def launch(now: float, slot: int) -> None:
        nonlocal started
        if started >= trials or spent >= budget_steps:
            return
        i = draw()
        if i is None:
            return
        started += 1
        if sched:
            sched.on_trial_add(None, Trial(str(i), params_of[i]))
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
            if optuna_searcher:
                asked[i].report(value, step)
            action = sched.on_trial_result(None, Trial(str(i), params_of[i]), {"step": step, rung_metric: value})
            if action == "STOP":
                stopped.add(i)
                spent += step
                if optuna_searcher:
                    study.tell(asked[i], state=optuna.trial.TrialState.PRUNED)
                events[:] = [e for e in events if e[3] != i]
                launch(now, slot)
            continue
        spent += table.max_steps
        best = min(best, float(table.final[i]))
        curve.append((spent, best, i))
        if optuna_searcher:
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


SEARCHERS = (  # (searcher, scheduler): asha-within is ASHA compared within each lr schedule, fika's default
    ("local", "asha-within"),
    ("local", "asha"),
    ("local", "fifo"),
    ("tpe", "asha-within"),
    ("tpe", "asha"),
    ("tpe", "fifo"),
    ("gp", "asha"),
    ("gp", "fifo"),
    ("random", "asha"),
    ("random", "fifo"),
)


SEARCHER_NAMES = {"tpe": "TPE", "gp": "GP"}
SCHEDULER_NAMES = {"asha": "ASHA", "asha-within": "ASHA within the schedule", "fifo": "FIFO"}


def show(pair) -> str:
    value, share = pair
    return f"{value:,.0f} ({100 * share:.0f}%)" if value is not None else f"- ({100 * share:.0f}%)"


def startup_of(trials: int, searcher: str = "tpe") -> int:
    """A search's random start-up draws for this many trials, as fika counts them."""
    from fika.search.spec import default_startup

    return default_startup(searcher, trials)


def label(searcher: str, scheduler: str) -> str:
    return f"{SEARCHER_NAMES.get(searcher, searcher)} + {SCHEDULER_NAMES[scheduler]}"


def replayed(table: Table, searcher: str, scheduler: str, seeds: int, trials: int, **options) -> dict:
    """The summary of one replayed search per seed (`options`: replay's `first`)."""
    budget = len(table.rows) * table.max_steps
    startup = startup_of(trials, searcher)
    curves = [replay(table, searcher, scheduler, s, budget, trials, startup, **options) for s in range(seeds)]
    return summarize(table, curves, budget)


def compare_searchers(table: Table, seeds: int, trial_counts: list[int], searchers: list[str]) -> None:
    print("\n| trials | searcher | to within 1% (reached) | to within the noise (reached) | regret at 25% |")
    print("|---:|---|---:|---:|---:|")
    for trials in trial_counts:
        for searcher, scheduler in (*SEARCHERS, ("grid", "fifo")):
            if searcher not in searchers:
                continue
            s = replayed(table, searcher, scheduler, seeds, trials)
            print(
                f"| {trials} | {label(searcher, scheduler)} | {show(s['to_1pct'])} | {show(s['to_noise'])} | {s['regret_25']:.4f} |"
            )


def earlier_finals(table: Table, searcher: str, scheduler: str, seed: int, trials: int) -> list[tuple[dict, dict]]:
    """The completed trials of one simulated search of `table`, best first: (params as the study holds them, final
    eval per held-out conversation), what fika.search.warm_start reads of an earlier search."""
    from fika.search.trials import encode_choice

    budget = len(table.rows) * table.max_steps
    curve = replay(table, searcher, scheduler, seed, budget, trials, startup_of(trials, searcher))
    ids = list(range(len(table.rows[0]["evals"][str(table.max_steps)]["sums"])))
    return [
        (
            {k: encode_choice(table.rows[i]["params"][k]) for k in table.keys},
            {"ids": ids, **table.rows[i]["evals"][str(table.max_steps)]},
        )
        for i in sorted({i for _, _, i in curve}, key=lambda i: table.final[i])
    ]


def carried(finals: list[tuple[dict, dict]], rule: str) -> list[dict]:
    """What runs first in a search warm-started from an earlier one that differs. `fika`: the best configuration
    with its learning rate and rank and the keys it settled (fika.search.warm_start); `top K`: the best K
    configurations whole (the rule before, K the start-up draws, at most 3; the local searcher's start-up now takes
    their learning rate and rank too)."""
    from fika.search.warm_start import carried_values, settled_keys

    if rule == "fika":
        values = carried_values(finals[0][0], settled_keys(finals))
        return [values] if values else []
    return [params for params, _ in finals[: int(rule.split()[1])]]


def warm_starts(tables: dict[str, Table], seeds: int, trials: int, searcher: str, scheduler: str) -> None:
    """Trial-steps to the noise band with a warm start against a cold start: from a simulated search of the other
    table (what fika runs first from it, against its best configurations whole) and from a half-finished search of
    the same table (its trials enter the study with their values): until the study's best is in the band (0 where the
    first half already holds it), until the rest runs a band config itself, and over the seeds whose first half
    missed the band, where both are the same."""
    print(
        f"\n| warm start ({label(searcher, scheduler)}, {trials} trials) | cold: to the noise (reached) | warm | warm / cold |"
    )
    print("|---|---:|---:|---:|")
    whole = min(3, startup_of(trials, searcher))  # as many as the start-up draws, at most 3
    rules = {
        "fika": "its best config, with its learning rate, rank and the keys it settled",
        f"top {whole}": f"its best {whole} configs whole",
    }
    for name, table in tables.items():
        budget = len(table.rows) * table.max_steps
        cold = replayed(table, searcher, scheduler, seeds, trials)["to_noise"]
        for other_name, other in tables.items():
            if other is table:
                continue
            earlier = [earlier_finals(other, searcher, scheduler, 1000 + s, trials) for s in range(seeds)]
            for rule, how in rules.items():
                curves = [
                    replay(table, searcher, scheduler, s, budget, trials, startup_of(trials, searcher), first=first)
                    for s, first in enumerate(carried(finals, rule) for finals in earlier)
                ]
                warm = summarize(table, curves, budget)["to_noise"]
                ratio = f"{warm[0] / cold[0]:.2f}" if warm[0] is not None and cold[0] else "-"
                print(f"| {name}: from a search of {other_name}, {how} | {show(cold)} | {show(warm)} | {ratio} |")
        half = trials // 2
        curves, missed, studied = [], [], []
        for s in range(seeds):
            before = replay(table, searcher, scheduler, 1000 + s, budget, half, startup_of(half, searcher))
            known = [i for _, _, i in before]
            rest = trials - half
            curves.append(
                replay(table, searcher, scheduler, s, budget, rest, startup_of(trials, searcher), known=known)
            )
            held = [i for i in known if table.within_noise[i]]
            studied.append(([(0, 0.0, held[0])] if held else []) + curves[-1])  # the study's best: 0 steps if held
            if not held:
                missed.append(curves[-1])
        own = f"{name}: from its own first {half} trials, then {trials - half} more"
        for row, chosen in (
            (f"{own}, the study's best (the first {half} count)", studied),
            (f"{own}, a band config of its own", curves),
            (f"{own}, seeds whose first {half} missed the band", missed),
        ):
            warm = summarize(table, chosen, budget)["to_noise"] if chosen else (None, 0.0)
            ratio = f"{warm[0] / cold[0]:.2f}" if warm[0] is not None and cold[0] else "-"
            print(f"| {row} ({len(chosen)} of {seeds}) | {show(cold)} | {show(warm)} | {ratio} |")


def reversed_choices(data: dict, key: str) -> dict:
    """The table with the choices of `key` relabelled in reverse order (the best learning rate or rank becomes the
    smallest): a problem where the local searcher's prior (the top learning rate and the largest rank at short
    horizons) is wrong."""
    data = json.loads(json.dumps(data))
    choices = [json.dumps(c) for c in data["space"][key]["choice"]]
    swap = dict(zip(choices, reversed(choices), strict=True))
    for row in data["rows"]:
        row["params"][key] = json.loads(swap[json.dumps(row["params"][key])])
    return data


def prior_keys(data: dict) -> list[str]:
    """The table's keys the local searcher starts at the top of (fika.search.spec.TOP_FIRST): the learning rate and
    the rank."""
    from fika.search.spec import top_first_key

    return [key for key in data["space"] if top_first_key(key)]


def wrong_prior(tables: dict[str, dict], seeds: int, trial_counts: list[int]) -> None:
    """The local searcher against TPE + ASHA on tables whose best learning rate, or best rank, is the smallest."""
    print("\n| table, choices reversed | trials | searcher | to within 1% (reached) | to the noise (reached) |")
    print("|---|---:|---|---:|---:|")
    for name, data in tables.items():
        for key in prior_keys(data):
            table = Table(reversed_choices(data, key))
            for trials in trial_counts:
                for searcher, scheduler in (("local", "asha-within"), ("tpe", "asha")):
                    r = replayed(table, searcher, scheduler, seeds, trials)
                    print(
                        f"| {name}, {key} | {trials} | {label(searcher, scheduler)} | {show(r['to_1pct'])} | "
                        f"{show(r['to_noise'])} |",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grid",
        nargs="?",
        const=str(HERE / "demo_grid.yaml"),
        metavar="SPEC",
        help="run a spec's whole space (default: bench/demo_grid.yaml, the demo's space) and write the table first",
    )
    parser.add_argument("--storage", type=Path, help="where --grid runs its search (a stopped one goes on there)")
    parser.add_argument(
        "--only",
        choices=("searchers", "warm", "prior"),
        help="print only the searchers', the warm starts' or the wrong-prior tables",
    )
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument(
        "--searchers",
        nargs="+",
        choices=("local", "tpe", "gp", "random", "grid"),
        default=["local", "tpe", "gp", "random", "grid"],
        help="the searchers replayed (gp: minutes per row)",
    )
    parser.add_argument("--trials", type=int, nargs="+", default=[6, 12, 20])
    parser.add_argument("--table", nargs="+", default=[str(t) for t in TABLES if t.exists()])
    args = parser.parse_args()
    if args.grid:
        run_grid(args.grid, Path(args.table[0]), args.storage)
    data = {Path(t).stem: json.loads(Path(t).read_text()) for t in args.table}
    tables = {name: Table(d) for name, d in data.items()}
    for name, table in tables.items() if args.only in (None, "searchers") else ():
        describe_table(name, table)
        compare_searchers(table, args.seeds, args.trials, args.searchers)
    if len(tables) > 1 and args.only in (None, "warm"):
        wrong = [  # and where the local searcher's priors are wrong: the learning rates or the ranks reversed
            {f"{name}, {key} reversed": Table(reversed_choices(d, key)) for name, d in data.items()}
            for key in prior_keys(next(iter(data.values())))
        ]
        for searcher, scheduler in (("local", "asha-within"), ("tpe", "asha"), ("gp", "asha")):
            for problems in (tables, *wrong) if searcher in args.searchers else ():
                warm_starts(problems, args.seeds, 12, searcher, scheduler)
    if args.only in (None, "prior"):
        wrong_prior(data, args.seeds, args.trials)


def describe_table(name: str, table: Table) -> None:
    budget = len(table.rows) * table.max_steps
    print(
        f"\n## {name}: {len(table.rows)} configs x {table.max_steps} steps = {budget} trial-steps; best eval loss "
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


if __name__ == "__main__":
    main()

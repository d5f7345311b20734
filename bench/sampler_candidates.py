"""Replays candidate sampler and scheduler settings over both tables at 12 trials: tried, not kept.

  python bench/sampler_candidates.py             # TPE and random candidates (seconds)
  python bench/sampler_candidates.py --gp        # and the GP ones (about 2 min each)

Each candidate runs as `search_quality.replay` runs a search (fika's NoRepeatSampler around the sampler, Ray's
ASHAScheduler), the sampler swapped in for `fika.search.tuner.optuna_sampler`. Per table: the share of seeds whose
search completes a trial within the eval noise of the table's best, the median trial-steps there, and that median
over TPE + ASHA's (fika's default searcher). The goal: at least 90% on both tables at two thirds
of TPE + ASHA's steps or less. The last rows are bounds, not searchers: random draws over the configs a searcher would keep if it knew the
best learning rate (and rank) before it started.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import TrialState
from search_quality import HERE, Table, replay, summarize

from fika.search.sampler import WrappedSampler
from fika.search.tuner import optuna_sampler  # bound here: the replays patch the tuner's name

SamplerFactory = Callable[[str, int, int], BaseSampler]


class Delegating(WrappedSampler):
    """fika's WrappedSampler with a start-up count and a seeded rng; subclasses change one part."""

    def __init__(self, inner: BaseSampler, startup: int, seed: int):
        super().__init__(inner)
        self.startup, self.rng = startup, random.Random(seed)


def others(study, trial) -> list:
    """The study's trials other than `trial`."""
    return [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]


class Balanced(Delegating):
    """Start-up draws that cover the choices: during start-up a choice key (those in `keys`, or all) takes one of
    its values used least so far, at random among them."""

    keys: tuple[str, ...] = ()

    def sample_independent(self, study, trial, param_name, param_distribution):
        earlier = others(study, trial)
        chosen = not self.keys or any(k in param_name for k in self.keys)
        if not chosen or not isinstance(param_distribution, CategoricalDistribution) or len(earlier) >= self.startup:
            return super().sample_independent(study, trial, param_name, param_distribution)
        used = {c: sum(t.params.get(param_name) == c for t in earlier) for c in param_distribution.choices}
        return self.rng.choice([c for c, n in used.items() if n == min(used.values())])


class BalancedLr(Balanced):
    """Start-up draws that cover the learning rates (the key that matters most for LoRA); other keys at random."""

    keys = ("learning_rate",)


class Neighbourhood(Delegating):
    """After start-up, an untried configuration one key away from the best completed trial (local search around
    the incumbent, as SMAC does); the inner sampler when none is left."""

    def infer_relative_search_space(self, study, trial):
        return {
            **IntersectionSearchSpace(include_pruned=True).calculate(study),
            **super().infer_relative_search_space(study, trial),
        }

    def sample_relative(self, study, trial, search_space):
        earlier = others(study, trial)
        done = [t for t in earlier if t.state == TrialState.COMPLETE]
        if len(earlier) < self.startup or not done:
            return super().sample_relative(study, trial, self.sampler.infer_relative_search_space(study, trial))
        best = min(done, key=lambda t: t.value).params
        tried = {json.dumps(t.params, sort_keys=True) for t in earlier}
        near = [
            {**best, key: value}
            for key, dist in search_space.items()
            if isinstance(dist, CategoricalDistribution)
            for value in dist.choices
            if value != best.get(key) and json.dumps({**best, key: value}, sort_keys=True) not in tried
        ]
        if near:
            return self.rng.choice(near)
        return super().sample_relative(study, trial, self.sampler.infer_relative_search_space(study, trial))


def tpe(wrapper: type[Delegating] | None = None, **options) -> SamplerFactory:
    """A factory of TPE samplers with these options, wrapped in `wrapper` when given."""

    def make(searcher: str, seed: int, startup: int) -> BaseSampler:
        if searcher == "gp" or not (options or wrapper):  # fika's own sampler
            return optuna_sampler(searcher, seed, startup)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, **options)
        return wrapper(sampler, startup, seed) if wrapper else sampler

    return make


@dataclass
class Candidate:
    """One replayed setting: searcher, scheduler, start-up draws, sampler, ASHA rungs, and rows kept (bounds)."""

    label: str
    searcher: str = "tpe"
    scheduler: str = "asha"
    startup: int = 4
    sampler: SamplerFactory = field(default_factory=tpe)
    grace: int | None = None
    rung_metric: str = "train_loss_smooth"
    keep: Callable[[dict], bool] | None = None


def candidates(gp: bool) -> list[Candidate]:
    """The settings tried (TPE + ASHA with 4 start-up draws, fika's default `searcher: optuna`, is the reference)."""
    found = [
        Candidate("TPE + ASHA (default)"),
        Candidate("TPE + FIFO", scheduler="fifo"),
        *(Candidate(f"TPE + ASHA, {n} start-up draws", startup=n) for n in (2, 3, 6)),
        Candidate("TPE multivariate, group + ASHA", sampler=tpe(multivariate=True, group=True)),
        Candidate("TPE constant_liar + ASHA", sampler=tpe(constant_liar=True)),
        Candidate("TPE n_ei_candidates 100 + ASHA", sampler=tpe(n_ei_candidates=100)),
        Candidate("TPE prior_weight 0.3 + ASHA", sampler=tpe(prior_weight=0.3)),
        Candidate("TPE prior_weight 2 + ASHA", sampler=tpe(prior_weight=2.0)),
        Candidate(
            "TPE prior_weight 2, gamma 0.2n + ASHA",
            sampler=tpe(prior_weight=2.0, gamma=lambda n: max(1, round(0.2 * n))),
        ),
        Candidate("TPE + ASHA, rung eval_loss", rung_metric="eval_loss"),
        Candidate("TPE + ASHA, grace 10", grace=10),
        Candidate("TPE, start-up covering every key's choices + ASHA", sampler=tpe(Balanced)),
        Candidate("TPE, start-up covering the learning rates + ASHA", sampler=tpe(BalancedLr)),
        Candidate("TPE, 3 start-up draws covering the learning rates + ASHA", startup=3, sampler=tpe(BalancedLr)),
        Candidate("TPE + local search around the best + ASHA", sampler=tpe(Neighbourhood)),
        Candidate("random + ASHA", searcher="random"),
    ]
    if gp:
        found += [Candidate("GP + FIFO", searcher="gp", scheduler="fifo"), Candidate("GP + ASHA", searcher="gp")]
        found += [
            Candidate(f"GP + FIFO, {n} start-up draws", searcher="gp", scheduler="fifo", startup=n) for n in (2, 3)
        ]
        found.append(Candidate("GP + ASHA, 2 start-up draws", searcher="gp", startup=2))
    best_lr = lambda p: p["train.learning_rate"] == 5e-4  # noqa: E731
    found += [
        Candidate("bound: random + ASHA, the best lr known", searcher="random", keep=best_lr),
        Candidate(
            "bound: random + ASHA, the best lr and rank known",
            searcher="random",
            keep=lambda p: best_lr(p) and p["lora.r,lora.alpha"] == [32, 32],
        ),
    ]
    return found


def table(name: str, keep: Callable[[dict], bool] | None) -> Table:
    """A replay table, with only the rows `keep` takes when given."""
    data = json.loads((HERE / f"{name}.json").read_text())
    data["rows"] = [row for row in data["rows"] if keep is None or keep(row["params"])]
    return Table(data)


def to_noise(candidate: Candidate, name: str, seeds: int, trials: int) -> tuple[float | None, float]:
    """The candidate's median trial-steps to the noise band on a table, and the share of seeds that get there."""
    replayed = table(name, candidate.keep)
    replayed.grace = candidate.grace or replayed.grace
    budget = len(replayed.rows) * replayed.max_steps
    with mock.patch("fika.search.tuner.optuna_sampler", candidate.sampler):
        curves = [
            replay(
                replayed,
                candidate.searcher,
                candidate.scheduler,
                seed,
                budget,
                trials,
                candidate.startup,
                candidate.rung_metric,
            )
            for seed in range(seeds)
        ]
    return summarize(replayed, curves, budget)["to_noise"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--gp", action="store_true", help="also the GP candidates (minutes each)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    names = ("demo_grid", "english_grid")
    print(
        f"\n| candidate ({args.trials} trials, {args.seeds} seeds) | "
        + " | ".join(f"{n}: reached, median steps, / default" for n in names)
        + " | goal |"
    )
    print("|---|---:|---:|---|")
    reference: dict[str, float] = {}
    for candidate in candidates(args.gp):
        cells, met = [], True
        for name in names:
            steps, share = to_noise(candidate, name, args.seeds, args.trials)
            reference.setdefault(name, steps)
            ratio = steps / reference[name] if steps else None
            met = met and share >= 0.9 and ratio is not None and ratio <= 2 / 3
            cells.append(f"{100 * share:.0f}%, {steps:.0f}, {ratio:.2f}" if steps else f"{100 * share:.0f}%, -, -")
        print(f"| {candidate.label} | " + " | ".join(cells) + f" | {'met' if met else 'no'} |", flush=True)


if __name__ == "__main__":
    main()

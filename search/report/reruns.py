"""The report's sections on re-runs (`fika confirm`): the seed spread of the top trials, and whether the
short-horizon order holds at a longer horizon."""

from __future__ import annotations

import statistics

from fika.overrides import get_dotted
from fika.search.report import analysis
from fika.search.report.plots import fmt_param
from fika.search.report.render import Section, Table, fmt
from fika.search.report.rows import Report
from fika.search.report.verdicts import compare_over_seeds, horizon_runs, horizon_winner, seed_means, seed_runs


def seeds_section(r: Report) -> Section | None:
    """The re-run configs by their seed mean: mean +/- std over seeds, and each one against the leader, paired by
    seed and over the held-out conversations."""
    runs = seed_runs(r)
    if not any(len(by_seed) > 1 for by_seed in runs.values()):
        return None
    means = {trial: statistics.mean(values) for trial, values in seed_means(runs).items() if values}
    order = sorted(means, key=means.get)
    rows = []
    for trial in order:
        values = [run.metric for run in runs[trial].values()]
        paired = compare_over_seeds(runs[trial], runs[order[0]]) if trial != order[0] else None
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        shown = ", ".join(f"{v:.4f}" for v in values)
        rows.append(
            [trial, f"{means[trial]:.4f} +/- {std:.4f}", str(len(values)), paired.text() if paired else "", shown]
        )
    headers = ["trial", f"{r.spec.metric}: mean +/- std over seeds", "seeds", "vs the leader [95% CI]", "per seed"]
    lines = [
        "Each config's runs with its own seed and the re-runs' seeds (the same data order per seed); vs the leader: "
        "the difference paired by seed and over the held-out conversations, with its 95% interval (an interval "
        "that holds 0: they cannot be told apart)."
    ]
    return Section("Seeds: re-runs of the top trials", lines, Table(headers, rows))


def horizon_section(r: Report) -> Section | None:
    """The re-run configs at the search's horizon and at the longer one, each with its rank, and the learning rate
    the winner of each uses."""
    pairs = horizon_runs(r)
    if not pairs:
        return None
    steps = pairs[0][1].confirm_steps
    short = analysis.ranks([a.metric for a, _ in pairs])
    long = analysis.ranks([b.metric for _, b in pairs])
    rows = [
        [
            a.trial_id,
            fmt_param(get_dotted(a.config, "train.learning_rate")),
            fmt(a.metric),
            f"{s:g}",
            fmt(b.metric),
            f"{lg:g}",
        ]
        for (a, b), s, lg in zip(pairs, short, long, strict=True)
    ]
    lines = [
        f"The same configs (same seeds and data order) re-run with a schedule of {steps} steps."
        + (" The full run uses the longer horizon's winner." if horizon_winner(r) else "")
    ]
    headers = [
        "trial",
        "learning rate",
        f"{r.spec.metric} @{r.spec.max_steps}",
        "rank",
        f"{r.spec.metric} @{steps}",
        "rank",
    ]
    return Section(
        f"Horizon: does the {r.spec.max_steps}-step order hold at {steps} steps?", lines, Table(headers, rows)
    )

"""The report's sections on re-runs (`fika confirm`): the seed spread of the top trials, and whether the
short-horizon order holds at a longer horizon."""

from __future__ import annotations

import statistics

from fika.search.report import analysis
from fika.search.report.render import Section, Table, fmt
from fika.search.report.rows import Report, TrialRow


def seeds_section(r: Report) -> Section | None:
    groups: dict[str, list[TrialRow]] = {}
    for row in r.confirms:
        if row.status == "completed" and row.confirm_steps is None:
            groups.setdefault(row.confirm_of, []).append(row)
    if not groups:
        return None
    order = [row for row in r.completed if row.trial_id in groups]
    lines, means = [], {}
    for row in order:
        values = [row.metric] + [c.metric for c in groups[row.trial_id] if c.metric is not None]
        means[row.trial_id] = statistics.mean(values)
        lines.append(
            f"- `{row.trial_id}`: {r.spec.metric} {means[row.trial_id]:.4f} +/- {statistics.stdev(values):.4f} "
            f"(mean +/- std over {len(values)} seeds: {', '.join(f'{v:.4f}' for v in values)})"
        )
    by_mean = sorted(means, key=means.get)
    original = [row.trial_id for row in order]
    survives = by_mean == original
    lines.append(
        f"The ranking of these {len(order)} trials {'survives' if survives else 'does not survive'} the seeds "
        f"(by the seed mean: {', '.join(by_mean)})."
    )
    return Section("Seeds: re-runs of the top trials", lines)


def horizon_section(r: Report) -> Section | None:
    runs = {row.confirm_of: row for row in r.confirms if row.confirm_steps and row.status == "completed"}
    pairs = [(row, runs[row.trial_id]) for row in r.completed if row.trial_id in runs]
    if not pairs:
        return None
    steps = pairs[0][1].confirm_steps
    short = analysis.ranks([a.metric for a, _ in pairs])
    long = analysis.ranks([b.metric for _, b in pairs])
    rho = analysis.spearman([a.metric for a, _ in pairs], [b.metric for _, b in pairs])
    rows = [
        [a.trial_id, fmt(a.metric), f"{s:g}", fmt(b.metric), f"{lg:g}"]
        for (a, b), s, lg in zip(pairs, short, long, strict=True)
    ]
    rho_text = f"Spearman rho {rho:.2f}" if rho is not None else "rho not defined"
    lines = [
        f"The same configs (same seeds and data order) re-run with a schedule of {steps} steps: {rho_text} between "
        f"the {r.spec.max_steps}-step and the {steps}-step ranking: {analysis.verdict(rho)}."
    ]
    table = Table(["trial", f"{r.spec.metric} @{r.spec.max_steps}", "rank", f"{r.spec.metric} @{steps}", "rank"], rows)
    return Section(f"Horizon: does the {r.spec.max_steps}-step order hold at {steps} steps?", lines, table)

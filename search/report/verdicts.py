"""The decision a report states first, from paired comparisons only: the winner against #2 and the baseline on the
shared held-out conversations; with seed re-runs, whether the best configs can be told apart over seeds and
conversations; with a longer horizon, whether the order and the best learning rate hold; and, per searched key,
whether its value made a difference beyond the eval noise."""

from __future__ import annotations

import statistics
from collections import Counter

from fika.overrides import get_dotted
from fika.search.report import analysis
from fika.search.report.plots import fmt_param
from fika.search.report.render import short_key
from fika.search.report.rows import Report, TrialRow, paired_against


def decision_lines(r: Report) -> list[str]:
    """The report's first lines: the winner (or the configs that cannot be told apart), in numbers."""
    best = r.best
    if best is None:
        if r.state != "finished":
            return ["No trial has completed yet."]
        return ["No trial completed, so there is no best config: the ranking says how each trial ended, and why."]
    lines = seed_verdict(r) or single_seed_verdict(r)
    lines += horizon_verdict(r)
    if r.baseline is best:
        lines.append(f"The baseline `{best.trial_id}` (the base config's own values) is the best trial.")
    return lines


def single_seed_verdict(r: Report) -> list[str]:
    """Whether the winner beats #2 and the baseline beyond the eval noise of one seed's run each."""
    done, best = r.completed, r.best
    lines = []
    second = done[1] if len(done) > 1 else None
    for other, name in ((second, "#2 (the baseline)" if second is r.baseline else "#2"), (r.baseline, "the baseline")):
        if other is None or other is best or (name == "the baseline" and other is second):
            continue
        if other.status != "completed":
            lines.append(
                f"The baseline `{other.trial_id}` was {other.status} at step {other.steps}"
                + (": the scheduler ranked it below the others at its rung." if other.status == "pruned" else ".")
            )
            continue
        paired = paired_against(other, best)
        if paired is None:
            lines.append(
                f"The best trial `{best.trial_id}` leads {name} (`{other.trial_id}`) by "
                f"{other.metric - best.metric:.4f} (no per-conversation evals to compare them paired)."
            )
            continue
        beyond = "beyond the eval noise" if paired.significant else "within the eval noise"
        lines.append(
            f"The best trial `{best.trial_id}` beats {name} (`{other.trial_id}`) by {paired.diff:.4f} {r.spec.metric} "
            f"(95% interval {paired.low:+.4f} to {paired.high:+.4f}, paired over the same {paired.conversations} "
            f"conversations, one seed): {beyond}."
        )
    return lines


def seed_runs(r: Report) -> dict[str, dict[int, TrialRow]]:
    """Per re-run trial, its completed runs at the search's horizon by seed: its own and the seed re-runs'."""
    runs: dict[str, dict[int, TrialRow]] = {}
    originals = {row.trial_id: row for row in r.completed}
    for row in r.confirms:
        if row.status == "completed" and row.confirm_steps is None and row.confirm_of in originals:
            original = originals[row.confirm_of]
            runs.setdefault(original.trial_id, {original.seed: original})[row.seed] = row
    return runs


def seed_means(runs: dict[str, dict[int, TrialRow]]) -> dict[str, list[float]]:
    return {
        trial: [row.metric for row in by_seed.values() if row.metric is not None] for trial, by_seed in runs.items()
    }


def compare_over_seeds(a: dict[int, TrialRow], b: dict[int, TrialRow]) -> analysis.Paired | None:
    """`a - b` paired by seed and over the held-out conversations, on the seeds both ran."""
    seeds = sorted(s for s in a.keys() & b.keys() if a[s].final_eval and b[s].final_eval)
    if not seeds:
        return None
    return analysis.paired_over_seeds([a[s].final_eval for s in seeds], [b[s].final_eval for s in seeds])


def seed_verdict(r: Report) -> list[str]:
    """With seed re-runs: the leader by the seed mean, and each other re-run config either beaten beyond the noise
    of seeds and conversations, or not told apart from it."""
    runs = seed_runs(r)
    if len(runs) < 1 or not any(len(by_seed) > 1 for by_seed in runs.values()):
        return []
    means = {trial: statistics.mean(values) for trial, values in seed_means(runs).items() if values}
    leader = min(means, key=means.get)
    apart, beaten = [leader], []
    for trial in sorted(means, key=means.get)[1:]:
        paired = compare_over_seeds(runs[trial], runs[leader])
        if paired is not None and paired.significant and paired.diff > 0:
            beaten.append(f"`{trial}` by {paired.text()}")
        else:
            apart.append(trial)
    seeds = max(len(by_seed) for by_seed in runs.values())
    spread = statistics.mean(statistics.stdev(v) for v in seed_means(runs).values() if len(v) > 1)
    noise = f"paired over {seeds} seeds and the held-out conversations, 95% intervals; seed spread (std) {spread:.4f}"
    if len(means) == 1:  # the only config the seeds re-ran: no comparison to state
        line = (
            f"Decision: `{leader}` is the only completed trial re-run with other seeds ({r.spec.metric} "
            f"{means[leader]:.4f} over {seeds} seeds, seed spread (std) {spread:.4f}); nothing to compare it with."
        )
    elif len(apart) == 1:
        line = f"Decision: `{leader}` wins ({r.spec.metric} {means[leader]:.4f} over {seeds} seeds): it beats " + (
            ", ".join(beaten) + f" ({noise})."
        )
    else:
        line = (
            f"Decision: {', '.join(f'`{t}`' for t in apart)} cannot be told apart ({noise}); any of them is as good as "
            f"the search can tell"
            + (f"; they beat {', '.join(beaten)}." if beaten else ".")
            + f" `{leader}` has the best seed mean ({means[leader]:.4f})."
        )
    return [line]


def horizon_runs(r: Report) -> list[tuple[TrialRow, TrialRow]]:
    """(the search's run, its re-run at the longer horizon) of each config re-run at one, best first."""
    runs = {row.confirm_of: row for row in r.confirms if row.confirm_steps and row.status == "completed"}
    return [(row, runs[row.trial_id]) for row in r.completed if row.trial_id in runs]


def horizon_winner(r: Report) -> TrialRow | None:
    """The config that won at the longer horizon, when its learning rate differs from the short horizon's winner's:
    the full run (`best.yaml`) then uses it. None otherwise."""
    pairs = horizon_runs(r)
    if len(pairs) < 2 or r.best is None:
        return None
    winner = min(pairs, key=lambda pair: pair[1].metric)[0]
    lr = "train.learning_rate"
    if get_dotted(winner.config, lr) != get_dotted(r.best.config, lr):
        return winner
    return None


def horizon_verdict(r: Report) -> list[str]:
    """Whether the short-horizon order holds at the longer horizon, and whether the best learning rate moved."""
    pairs = horizon_runs(r)
    if len(pairs) < 2:
        return []
    steps = pairs[0][1].confirm_steps
    rho = analysis.spearman([a.metric for a, _ in pairs], [b.metric for _, b in pairs])
    rho_text = f"Spearman rho {rho:.2f}" if rho is not None else "rho not defined"
    line = f"At {steps} steps the {r.spec.max_steps}-step order of {len(pairs)} configs: {analysis.verdict(rho)} ({rho_text})."
    moved = horizon_winner(r)
    lr = "train.learning_rate"
    if moved is not None:
        line += (
            f" The best learning rate moved with the horizon: {get_dotted(r.best.config, lr):g} at {r.spec.max_steps} "
            f"steps, {get_dotted(moved.config, lr):g} at {steps} (`{moved.trial_id}`), so best.yaml and the full-run "
            "command use the longer horizon's winner."
        )
    else:
        line += f" The best learning rate held at {get_dotted(r.best.config, lr):g}."
    return [line]


def key_effects(r: Report) -> list[str]:
    """Per searched key: whether its values made a difference beyond the eval noise. The completed trials of each
    value are averaged per held-out conversation, and the best value's average is compared with each other value's,
    paired over the conversations (the other keys vary within each group: a marginal effect, not a controlled one).
    Trials the scheduler stopped have no final eval; the line counts them per value."""
    lines = []
    trials = [row for row in r.completed if row.final_eval and row.eval_step == r.spec.max_steps]
    for key in r.spec.space:
        groups: dict[str, list[TrialRow]] = {}
        for row in trials:
            groups.setdefault(fmt_param(row.params[key]), []).append(row)
        if len(groups) < 2:
            continue
        means = {value: group_eval(rows) for value, rows in groups.items()}
        best = min(means, key=lambda v: sum(means[v]["sums"]) / max(sum(means[v]["counts"]), 1))
        worse = []
        for value, evals in means.items():
            paired = analysis.compare(evals, means[best]) if value != best else None
            if paired is not None and paired.significant and paired.diff > 0:
                worse.append(f"{value} by {paired.diff:.4f}")
        name, counts = short_key(key), ", ".join(f"{v}: {len(rows)}" for v, rows in groups.items())
        stopped = Counter(fmt_param(row.params[key]) for row in r.ranked if row.status == "pruned")
        if stopped:  # not in the comparison (no final eval), but what the scheduler saw of each value
            counts += "; stopped early: " + ", ".join(f"{v}: {n}" for v, n in stopped.items())
        if worse:
            lines.append(f"- {name}: {best} is better than {', '.join(worse)} beyond the eval noise (trials {counts}).")
        else:
            lines.append(
                f"- {name} made no measurable difference at {r.spec.max_steps} steps (its values within the eval "
                f"noise of each other; trials {counts})."
            )
    return lines


def group_eval(rows: list[TrialRow]) -> dict:
    """The per-conversation mean of several trials' final evals (on their shared conversations)."""
    first = rows[0].final_eval
    index = [{i: k for k, i in enumerate(row.final_eval["ids"])} for row in rows]
    ids = [i for i in first["ids"] if all(i in idx for idx in index)]
    sums = [statistics.mean(row.final_eval["sums"][idx[i]] for row, idx in zip(rows, index, strict=True)) for i in ids]
    counts = [first["counts"][index[0][i]] for i in ids]
    return {"ids": ids, "sums": sums, "counts": counts}

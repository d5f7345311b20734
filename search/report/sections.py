"""What a report says, section by section: the summary and the compute, the state of an unfinished search,
the decision (the winner against #2 and the baseline, in paired numbers), warnings, the ranking table, rung
agreement, the data, the plots, and the spec."""

from __future__ import annotations

from pathlib import Path

from fika.files import read_json
from fika.masking import mask_secrets
from fika.search.report import analysis, plots
from fika.search.report.best import best_lines, confirm_commands
from fika.search.report.folder import relative
from fika.search.report.render import Section, Table, fmt, short_key
from fika.search.report.reruns import horizon_section, seeds_section
from fika.search.report.rows import STATUS_ORDER, Report, TrialRow, paired_against, train_loss_at
from fika.search.report.verdicts import decision_lines, key_effects
from fika.search.spec import OPTUNA_SEARCHERS

HARD_FLOOR = {"dropout": 0, "weight": 0, "limit": 0, "min_tokens": 0, "warmup_steps": 0, "weight_decay": 0}


def ranking_table(r: Report) -> Table:
    spec, step = r.spec, r.shared_step
    headers = [
        "rank",
        "trial",
        *(short_key(k) for k in spec.space),
        f"{spec.metric} @{spec.max_steps}",
        "vs best [95% CI]",
        "vs baseline",
        f"train loss avg10 @{step}",
        "steps",
        "tokens",
        "trainable",
        "wall s",
        "peak MB",
        "status",
    ]
    rows, classes = [], []
    for i, row in enumerate(r.ranked, 1):
        ranked = row.status in ("completed", "pruned")
        marks = ", ".join(
            mark
            for mark in (
                "baseline" if row.baseline else "",
                f"pack of {row.pack_size}" if row.pack_size else "",
                f"reused from {relative(Path(row.source))}" if row.source else "",
            )
            if mark
        )
        status = row.status + (f" ({marks})" if marks else "") + (f": {row.error}" if row.error else "")
        at = (
            f" @{max(row.rung_values)}" + ("*" if spec.rung_key() != spec.metric else "")
            if row.status == "pruned" and row.rung_values
            else ""
        )
        vs_best = paired_against(row, r.best) if row.status == "completed" else None
        vs_base = paired_against(row, r.baseline) if row.status == "completed" else None
        rows.append(
            [
                str(i) if ranked else "",
                row.trial_id,
                *(plots.fmt_param(v) for v in row.params.values()),
                fmt(row.metric) + at,
                vs_best.text() if vs_best else "",
                f"{vs_base.diff:+.4f}" if vs_base else "",
                fmt(train_loss_at(row, step)),
                str(row.steps),
                f"{row.tokens_seen:,}",
                f"{row.trainable_params:,}" if row.trainable_params else "",
                f"{row.wall_time_s:.0f}",
                f"{row.peak_memory_mb:,.0f}" if row.peak_memory_mb else "",
                status,
            ]
        )
        classes.append(
            row.status
            + (" baseline" if row.baseline else "")
            + (" reused" if row.source else "")
            + (" best" if row is r.best else "")
        )
    return Table(headers, rows, classes)


def state_lines(r: Report) -> list[str]:
    """What a ranking of a search that has not finished stands for: the trials so far, and how to go on."""
    ended = sum(1 for row in r.own if row.status not in ("running", "interrupted"))
    if r.state == "running":
        return [
            f"The search is still running: {ended} of {r.spec.num_trials()} trials have ended, so this ranking is "
            "provisional."
        ]
    if r.state == "interrupted":
        return [
            f"The search was interrupted: {ended} of {r.spec.num_trials()} trials ended, and no fika process runs "
            f"it any more (its driver was stopped, killed or crashed), so this ranking is provisional. `fika search "
            f"{relative(r.run / 'spec.yaml')} --resume` continues it and keeps every trial that ended."
        ]
    return []


def warm_start_lines(r: Report) -> list[str]:
    """Which earlier searches the study started from, and what each brought."""
    from fika.search.warm_start import carried_text, read_warm_start

    lines = []
    warm = [row.trial_id for row in r.ranked if row.drawn == "warm"]
    for earlier in read_warm_start(r.run):
        if earlier.values:
            ranked = sum(1 for row in r.ranked if row.source == earlier.run)
            if ranked == len(earlier.values):
                where = f"they rank with this search's own trials, marked `reused from {relative(Path(earlier.run))}`"
            elif ranked:
                where = (
                    f"{ranked} rank with this search's own trials; the others cannot be read from its folder any more"
                )
            else:
                where = "its folder cannot be read any more, so they are not ranked"
            lines.append(
                f"Warm start: {len(earlier.values)} trials of `{relative(Path(earlier.run))}` (the same configs) entered "
                "the study with their values, so the sampler modelled the space from the first trial and none of their "
                f"configurations ran again; {where}."
            )
        else:
            lines.append(
                f"Warm start: `{relative(Path(earlier.run))}` differs ({earlier.differs}), so its values were not "
                "reused; "
                + (
                    carried_text(earlier, ran=True)
                    + (f" (here: {', '.join(f'`{t}`' for t in warm)})." if warm else ".")
                    if earlier.first
                    else "none of its values carried over."
                )
            )
    return lines


def warnings_lines(r: Report) -> list[str]:
    """Edge values, random-only searches, low rung agreement."""
    lines = []
    if r.best is not None:
        lines += [f"Edge: {note}." for note in analysis.edge_values(r.spec.space, r.best.params, HARD_FLOOR)]
    draws = [row.drawn for row in r.ranked if row.drawn]
    model = {"gp": "gp", "local": "local"}.get(r.spec.searcher, "tpe")
    if r.spec.searcher in OPTUNA_SEARCHERS and draws and not {model, "tpe"} & set(draws):
        lines.append(
            f"Every trial was drawn at random ({draws.count('random')} random, {draws.count('baseline')} baseline): "
            f"{'the local search' if model == 'local' else model.upper()} starts after {r.spec.startup()} finished "
            "trials; "
            + (
                f"the space holds only {r.spec.num_trials()} configurations: widen it."
                if r.spec.num_trials() < r.spec.num_samples
                else "raise num_samples or lower startup_trials."
            )
        )
    return lines


def rung_lines(r: Report) -> list[str]:
    """Rank agreement between each rung's value and the final metric, over the completed trials."""
    lines = []
    for step in r.spec.rungs():
        pairs = [(row.rung_values[step], row.metric) for row in r.completed if step in row.rung_values]
        rho = analysis.spearman([a for a, _ in pairs], [b for _, b in pairs])
        if rho is None:
            lines.append(f"- rung {step}: {len(pairs)} completed trials, too few to measure")
            continue
        low = " (low: the early stops may have cut trials that would have ended well)" if rho < 0.5 else ""
        lines.append(
            f"- rung {step} ({r.spec.rung_key()}) vs {r.spec.metric} at step {r.spec.max_steps}: Spearman "
            f"rho {rho:.2f} over {len(pairs)} completed trials{low}"
        )
    return lines


def data_section(r: Report) -> list[Section]:
    """Rows and tokens per source, the eval loss per source, and the data keys' effects."""
    rows = [row for row in r.ranked if row.data.get("sources")]
    if not rows:
        return []
    names = [s["name"] for s in rows[0].data["sources"]]
    eval_counts = rows[0].data.get("eval_per_source", {})
    headers = [
        "trial",
        *(f"{n} rows" for n in names),
        *(f"{n} tokens" for n in names),
        *(f"eval {n}" for n in eval_counts),
        r.spec.metric,
    ]
    body = []
    for row in rows:
        by_name = {s["name"]: s for s in row.data["sources"]}
        body.append(
            [
                row.trial_id,
                *(f"{by_name.get(n, {}).get('train', 0):,}" for n in names),
                *(f"{by_name.get(n, {}).get('train_tokens', 0):,}" for n in names),
                *(fmt(row.eval_per_source.get(n)) for n in eval_counts),
                fmt(row.metric),
            ]
        )
    shared = "; ".join(f"{n} {c}" for n, c in eval_counts.items())
    lines = [
        f"Every trial is scored on the same {sum(eval_counts.values())} held-out conversations ({shared}), "
        "drawn once for the search, before any limit, weight or filter."
    ]
    sections = [Section("Data: rows and tokens per source, eval loss per source", lines, Table(headers, body))]
    return sections


def compute_lines(rows: list[TrialRow], fits: list[dict]) -> list[str]:
    """The trials' compute and where it went (training steps, evals, the rest), and, when every Tune fit of the
    run ended on a local Ray (`run.json` fits), how much of its slots (fit wall x trials at once) they used."""
    wall = sum(row.wall_time_s for row in rows)
    steps = sum(row.step_time_s for row in rows)
    evals = sum(row.eval_time_s for row in rows)
    line = f"- compute: {wall / 3600:.2f} trial-hours, {sum(row.tokens_seen for row in rows):,} tokens seen"
    if wall <= 0 or steps <= 0:
        return [line]
    lines = [
        f"{line}; {steps / wall:.0%} of it training steps, {evals / wall:.0%} evals, "
        f"{1 - (steps + evals) / wall:.0%} a trial's start and end (model, trainer, saving)"
    ]
    if fits and all(f.get("slots") and f.get("ended_at") for f in fits):
        slot = sum((f["ended_at"] - f["started_at"]) * f["slots"] for f in fits)
        at_once = "/".join(sorted({str(f["slots"]) for f in fits}))
        lines.append(
            f"- slots: {at_once} trials at a time, {slot / 3600:.2f} slot-hours, {min(wall / slot, 1):.0%} "
            f"of them in a trial (the rest: workers starting, a slot with no trial left); slot time = "
            f"{slot / steps:.2f}x the training-step time"
        )
    return lines


def build_sections(r: Report, images: dict[str, bytes], live: bool = False) -> list[Section]:
    """Every section of the report, in order."""
    notes = state_lines(r) + decision_lines(r) + warm_start_lines(r) + warnings_lines(r)
    sections = [Section("", summary_lines(r)), Section("", notes, note=True)]
    pruned_note = (
        f"* a pruned trial's {r.spec.rung_key()} at the rung where ASHA stopped it; vs best and vs baseline: "
        f"the difference in {r.spec.metric} paired over the held-out conversations, with its 95% interval; "
        f"train loss avg10: the mean train loss of the 10 steps up to step {r.shared_step}, the last step "
        "every ranked trial reached (a later window holds other conversations, so it would not compare)."
    )
    sections.append(Section("Ranking", [pruned_note], ranking_table(r)))
    effects = key_effects(r)
    if effects:
        sections.append(Section("What each searched key did", effects))
    if r.best is not None:
        sections.append(Section("Best config", best_lines(r)))
        sections.append(Section("Is the ranking real?", confirm_commands(r)))
    sections += [extra for extra in (seeds_section(r), horizon_section(r)) if extra is not None]
    rung = rung_lines(r)
    if rung:
        sections.append(Section("Rung agreement", rung))
    sections += data_section(r)
    sections += plot_sections(r, images, live)
    spec_text = (r.run / "spec.yaml").read_text() if (r.run / "spec.yaml").exists() else ""
    resume = f"Resume: `fika search {relative(r.run / 'spec.yaml')} --resume`"
    sections.append(Section("The search", [resume], code=mask_secrets(spec_text)))
    return sections


def summary_lines(r: Report) -> list[str]:
    """The report's first lines: the trials by status and how they were drawn, the compute, what ranks them."""
    spec = r.spec
    counts = {s: sum(1 for row in r.own if row.status == s) for s in STATUS_ORDER}
    draws = [row.drawn for row in r.own if row.drawn]
    kinds = ("baseline", "warm", "random", "local", "tpe", "gp", "untried")
    drawn = ", ".join(f"{draws.count(k)} {k}" for k in kinds if draws.count(k))
    so_far = f" of {spec.num_trials()}" if r.state != "finished" else ""
    trials = f"- {len(r.own)}{so_far} trials{' so far' if so_far else ''}: "
    trials += ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    trials += (f"; drawn: {drawn}" if drawn else "") + (f"; {len(r.confirms)} re-runs" if r.confirms else "")
    reused = len(r.ranked) - len(r.own)
    trials += f"; ranked with {reused} trials of earlier searches (warm start, the same configs)" if reused else ""
    ranked = (
        f"- ranked by {spec.metric} at step {spec.max_steps} on the same {spec.base.data.eval_size} held-out "
        "conversations for every trial"
    )
    if spec.rungs():
        ranked += f"; pruned trials rank below completed ones, by the rung they reached ({spec.rung_key()} at "
        ranked += f"steps {spec.rungs()})"
    fits = (read_json(r.run / "run.json") or {}).get("fits", [])
    return [trials, *compute_lines(r.own + r.confirms, fits), ranked + "."]


PICTURES = [
    ("curves.png", "Loss curves"),
    ("pareto.png", "Loss against cost"),
    ("history.png", "Optimization history"),
    ("parallel.png", "Parallel coordinates"),
    ("slice.png", "Slices: the metric by each searched key's value"),
    ("intermediate.png", "Intermediate values (rungs)"),
    ("importance.png", "Parameter importance"),
]


def plot_sections(r: Report, images: dict[str, bytes], live: bool) -> list[Section]:
    """A section per picture drawn, and a line for those not drawn (yet)."""
    sections = [Section(title, [], image=name) for name, title in PICTURES if name in images]
    if live:
        later = (
            "Loss against cost, Optuna's views and the parameter importance are drawn when the search ends (or by "
            f"`fika report {relative(r.run)}`)."
        )
        sections.append(Section("More plots", [later]))
    elif "importance.png" not in images:
        need = plots.importance_rule(len(r.spec.space))
        why = (
            f"Not drawn: fANOVA importances need at least {need} completed trials for {len(r.spec.space)} searched "
            f"keys (8, or 2 per key); this search has {len(r.completed)}."
        )
        sections.append(Section("Parameter importance", [why]))
    return sections

"""Writing a search's report, finished or not: index.md, index.html, trials.csv, best.yaml, report.json and the
plots, each replaced atomically; and the ranking as a pandas DataFrame (what trials.csv holds)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fika.files import read_json, write_atomic
from fika.masking import mask_secrets
from fika.search.report import plots
from fika.search.report.best import best_yaml, steps_per_epoch
from fika.search.report.folder import claim_folder, default_report_dir
from fika.search.report.render import render_html, render_markdown
from fika.search.report.rows import STATUS_ORDER, Report, ranked_trials, search_state, train_loss_at
from fika.search.report.sections import build_sections
from fika.search.rerun import load_run_spec
from fika.search.trials import encode_choice


def ranking_frame(r: Report):
    """The ranking as a pandas DataFrame, one row per trial in report order: rank, trial, each searched key
    (`param:KEY`), status, metric, losses, cost, whether it is the baseline, how it was drawn, the earlier search a
    warm start reused it from (relative to the run folder; empty for this search's own), its full config."""
    import pandas as pd

    records, step = [], r.shared_step
    for i, row in enumerate(r.ranked, 1):
        config = json.loads(json.dumps(row.config))
        folder = os.path.relpath(Path(row.source or r.run) / "trials" / row.trial_id, r.run)
        if isinstance(config.get("output"), dict):  # relative to the run folder, never a machine path
            config["output"]["dir"] = folder
        params = {f"param:{k}": encode_choice(v) for k, v in row.params.items()}
        records.append(
            {
                "rank": i,
                "trial": row.trial_id,
                **params,
                "status": row.status,
                "metric": row.metric,
                "eval_loss": row.eval_loss,
                "train_loss_smooth": row.train_loss_smooth,
                "shared_step": step,
                "train_loss_at_shared_step": train_loss_at(row, step),
                "steps": row.steps,
                "tokens_seen": row.tokens_seen,
                "trainable_params": row.trainable_params,
                "wall_time_s": row.wall_time_s,
                "step_time_s": row.step_time_s,
                "peak_memory_mb": row.peak_memory_mb,
                "pack_size": row.pack_size,
                "baseline": row.baseline,
                "drawn": row.drawn,
                "from": os.path.relpath(row.source, r.run) if row.source else "",
                "error": row.error,
                "config": json.dumps(config, sort_keys=True),
            }
        )
    return pd.DataFrame(records)


def load_report(run: Path, out: Path | None = None) -> Report:
    """The ranked trials of the search in `run` (finished, running or interrupted), to be written to `out`."""
    spec = load_run_spec(run)
    state = search_state(run)
    ranked, confirms = ranked_trials(run, spec, running=state == "running")
    out = Path(out).expanduser() if out else default_report_dir(spec.name)
    return Report(spec, run, out, ranked, confirms, state)


def draw_plots(r: Report, live: bool) -> dict[str, bytes]:
    """The report's pictures: the loss curves always; when not `live`, loss against cost, Optuna's views (history,
    parallel coordinates, slices of every searched key, intermediate values) and the parameter importances."""
    images: dict[str, bytes] = {}
    if any(row.records for row in r.ranked):
        images["curves.png"] = plots.plot_curves(r.spec, r.ranked)
    if live:
        return images
    if len(r.completed) >= 2:
        images["pareto.png"] = plots.plot_pareto(r.spec, r.completed)
        images.update(plots.optuna_views(r.spec, r.ranked))
    importance = plots.plot_importance(r.spec, r.ranked)
    if importance:
        images["importance.png"] = importance
    return images


def build_report(run: str | Path, out: str | Path | None = None, claimed: bool = False, live: bool = False) -> Path:
    """Writes the report of the search in `run` to `out` (default: reports/<name>); `claimed`: the caller has
    already checked `out` with `claim_folder`. `live`: a build while trials run, with the loss curves as its only
    plot (the others take about 1 s of CPU per build, which a laptop's trials would lose)."""
    run = Path(run).expanduser()
    r = load_report(run, out)
    run_id = (read_json(run / "run.json") or {}).get("id", "")
    if not claimed:
        claim_folder(r.out, run, run_id)
    images = draw_plots(r, live)
    sections = build_sections(r, images, live)
    out = r.out
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report_summary(r, run_id), indent=1))  # first: it claims the folder
    for stale in [*out.glob("*.png"), *out.glob(".*.tmp")]:  # plots no longer drawn, files of a killed writer
        if stale.name not in images:
            stale.unlink(missing_ok=True)
    for name, data in images.items():
        write_atomic(out / name, data)
    write_atomic(out / "trials.csv", mask_secrets(ranking_frame(r).to_csv(index=False)))
    if r.best is not None:
        write_atomic(out / "best.yaml", best_yaml(r))
    else:  # an earlier build's best config no longer holds
        (out / "best.yaml").unlink(missing_ok=True)
    title = f"Search report: {r.spec.name}"
    write_atomic(out / "index.md", render_markdown(title, sections))
    write_atomic(out / "index.html", render_html(title, sections, images))
    return out


def report_summary(r: Report, run_id: str) -> dict:
    """`report.json`: which search the folder reports (its run id and folder), its counts and its best trial."""
    best = r.best
    return {
        "name": r.spec.name,
        "run_id": run_id,
        "run": os.path.relpath(r.run.resolve(), r.out.resolve()),
        "generated_at": time.time(),
        "counts": {s: sum(1 for x in r.own if x.status == s) for s in STATUS_ORDER},
        "reused": len(r.ranked) - len(r.own),
        "best": None
        if best is None
        else {
            "trial": best.trial_id,
            "metric": best.metric,
            "seconds_per_step": best.seconds_per_step,
            "device": best.device,
            "steps_per_epoch": steps_per_epoch(best),
        },
    }

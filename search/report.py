"""The ranked report of a search, finished or not: index.md, index.html, trials.csv, plots, best.yaml.

Reads only the run folder (`spec.yaml`, `trials/*/{config.yaml,metrics.jsonl,result.json}` and Ray's error
files), so it works on a running search, a killed one, and one with failed trials. Ranking ("60-step loss"):
the spec's metric at the last step for completed trials; pruned trials rank below them (deeper rung first);
diverged and failed trials are listed last with their reason. Every file is replaced atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fika.trial import write_atomic
from search.spec import SearchSpec, baseline_params, encode_choice, split_key

STATUS_ORDER = {"completed": 0, "pruned": 1, "running": 2, "diverged": 3, "failed": 4}
TOP_CURVES = 5


@dataclass
class TrialRow:
    """One trial as the report shows it."""

    trial_id: str
    params: dict[str, Any]
    status: str
    metric: float | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    train_loss_smooth: float | None = None
    steps: int = 0
    tokens_seen: int = 0
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    seed: int | None = None
    confirm_of: str | None = None
    baseline: bool = False
    error: str = ""
    config: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def param_value(spec: SearchSpec, config: dict, key: str) -> Any:
    """The value of a searched key (or a pair of keys) in a trial's resolved config, spelled as in the space."""
    values = []
    for part in split_key(key):
        node: Any = config
        for name in part.split("."):
            node = node.get(name) if isinstance(node, dict) else None
        values.append(node)
    value = values if len(values) > 1 else values[0]
    choices = spec.space[key].choice
    return choices[choices.index(value)] if choices and value in choices else value


def tune_errors(run: Path) -> dict[str, str]:
    """The first line of Ray's error file per trial id (for trials that failed before fika could record it)."""
    errors = {}
    for path in (run / "tune").glob("*/error.txt"):
        trial_id = path.parent.name.split("_")[1] if "_" in path.parent.name else path.parent.name
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors[trial_id] = lines[-1][:300] if lines else "error"
    return errors


def load_rows(run: Path, spec: SearchSpec) -> list[TrialRow]:
    """Every trial folder of a run as a TrialRow (running and failed ones included)."""
    rows = []
    errors = tune_errors(run)
    baseline = baseline_params(spec) if spec.baseline else None
    for directory in sorted((run / "trials").glob("*/")):
        config_path = directory / "config.yaml"
        if not config_path.exists():
            continue
        config = yaml.safe_load(config_path.read_text())
        records = []
        if (directory / "metrics.jsonl").exists():
            records = [
                json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()
            ]
        result = json.loads((directory / "result.json").read_text()) if (directory / "result.json").exists() else {}
        confirm = json.loads((directory / "confirm.json").read_text()) if (directory / "confirm.json").exists() else {}
        status = {"stopped": "pruned"}.get(result.get("status", ""), result.get("status", ""))
        if not status:
            status = "failed" if directory.name in errors else "running"
        last = records[-1] if records else {}
        evals = {int(k): v for k, v in result.get("eval_losses", {}).items()} or {
            r["step"]: r["eval_loss"] for r in records if "eval_loss" in r
        }
        eval_loss = evals[max(evals)] if evals else None
        row = TrialRow(
            trial_id=directory.name,
            params={key: param_value(spec, config, key) for key in spec.space},
            status=status,
            eval_loss=eval_loss,
            eval_step=max(evals) if evals else None,
            train_loss_smooth=result.get("train_loss_smooth", last.get("train_loss_smooth")),
            steps=result.get("steps", last.get("step", 0)),
            tokens_seen=result.get("tokens_seen", last.get("tokens_seen", 0)),
            wall_time_s=result.get("wall_time_s", last.get("elapsed_s", 0.0)),
            peak_memory_mb=result.get("peak_memory_mb", 0.0),
            seed=config.get("train", {}).get("seed"),
            confirm_of=confirm.get("of"),
            error=result.get("error") or errors.get(directory.name, ""),
            config=config,
            records=records,
        )
        row.metric = row.eval_loss if spec.metric == "eval_loss" else row.train_loss_smooth
        if status == "diverged" and not row.error:
            row.error = f"non-finite loss at step {row.steps}"
        row.baseline = (
            baseline is not None
            and not row.confirm_of
            and all(encode_choice(row.params[k]) == v or row.params[k] == v for k, v in baseline.items())
        )
        rows.append(row)
    return rows


def rank(rows: list[TrialRow]) -> list[TrialRow]:
    """Completed by metric, then pruned (deeper rung first), running, diverged, failed."""

    def key(row: TrialRow) -> tuple:
        finite = row.metric is not None and math.isfinite(row.metric)
        return (STATUS_ORDER.get(row.status, 5), -row.steps if row.status == "pruned" else 0,
                row.metric if finite else math.inf, row.trial_id)  # fmt: skip

    return sorted(rows, key=key)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if abs(value) >= 1e-2 or value == 0 else f"{value:.1e}"
    return str(value)


def short_key(key: str) -> str:
    """`train.learning_rate` -> `learning_rate`, `lora.r,lora.alpha` -> `r, alpha` (the table stays narrow)."""
    return ", ".join(part.split(".")[-1] for part in split_key(key))


def fmt_param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return ", ".join(fmt_param(v) for v in value) if isinstance(value, list) else str(value)


def table(spec: SearchSpec, rows: list[TrialRow]) -> tuple[list[str], list[list[str]]]:
    """The ranked table: rank, trial, searched params, metrics, cost, status."""
    headers = ["rank", "trial", *(short_key(k) for k in spec.space), f"eval loss @{spec.max_steps}", "train loss avg10",
               "steps", "tokens", "wall s", "peak MB", "status"]  # fmt: skip
    body = []
    for i, row in enumerate(rows, 1):
        ranked = row.status in ("completed", "pruned")
        status = row.status + (" (baseline)" if row.baseline else "") + (f": {row.error}" if row.error else "")
        at = f" @{row.eval_step}" if row.eval_loss is not None and row.eval_step != spec.max_steps else ""
        body.append([str(i) if ranked else "", row.trial_id, *(fmt_param(v) for v in row.params.values()),
                     fmt(row.eval_loss) + at, fmt(row.train_loss_smooth), str(row.steps), f"{row.tokens_seen:,}",
                     f"{row.wall_time_s:.0f}", f"{row.peak_memory_mb:,.0f}", status])  # fmt: skip
    return headers, body


def noise_note(spec: SearchSpec, ranked: list[TrialRow], confirms: dict[str, list[TrialRow]]) -> str:
    """Says whether the top trials differ by more than the seed-to-seed spread."""
    done = [r for r in ranked if r.status == "completed" and r.metric is not None and math.isfinite(r.metric)]
    if len(done) < 2:
        return ""
    gap = done[1].metric - done[0].metric
    spreads = [statistics.stdev(v) for v in ([r.metric for r in c] for c in confirms.values()) if len(v) > 1]
    if spreads:
        spread = max(spreads)
        verdict = "within" if gap < 2 * spread else "beyond"
        return (f"The top two trials differ by {gap:.4f} in {spec.metric}; re-running with other seeds moved it by up to "
                f"{spread:.4f} (std): the gap is {verdict} seed noise.")  # fmt: skip
    return (f"The top two trials differ by {gap:.4f} in {spec.metric}. How much a seed alone moves it is not measured "
            f"yet: `fika search ... --confirm-top 3 --seeds 3` re-runs the best trials with other seeds.")  # fmt: skip


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_curves(spec: SearchSpec, ranked: list[TrialRow]) -> bytes:
    """Train loss (mean of 10 steps) and eval loss against steps for the top trials and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = [r for r in ranked if r.status in ("completed", "pruned") and r.records][:TOP_CURVES]
    baseline = next((r for r in ranked if r.baseline and r.records), None)
    if baseline is not None and baseline not in top:
        top.append(baseline)
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(top):
        style = {"color": "black", "linestyle": "--"} if row.baseline else {"color": colors[i % len(colors)]}
        label = f"{row.trial_id}{' (baseline)' if row.baseline else ''}: {fmt(row.metric)}"
        steps = [r["step"] for r in row.records]
        train_ax.plot(steps, [r["train_loss_smooth"] for r in row.records], label=label, **style)
        evals = [(r["step"], r["eval_loss"]) for r in row.records if "eval_loss" in r]
        if evals:
            eval_ax.plot(*zip(*evals, strict=True), marker="o", label=label, **style)
    train_ax.set(title="train loss (mean of the last 10 steps)", xlabel="step", ylabel="loss")
    eval_ax.set(title="eval loss (held-out set)", xlabel="step")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.axvline(spec.max_steps, color="gray", linewidth=0.8)
    handles, labels = eval_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, title=f"trial: {spec.metric} at its last eval",
               title_fontsize=8, bbox_to_anchor=(0.5, -0.12))  # fmt: skip
    fig.suptitle(f"{spec.name}: top {len(top)} trials" + (" and the baseline (dashed)" if baseline else ""))
    data = figure_png(fig)
    plt.close(fig)
    return data


def plot_params(spec: SearchSpec, ranked: list[TrialRow]) -> bytes:
    """For each searched parameter: the metric of every trial by value (pruned trials hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.6), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        choices = spec.space[key].choice
        labels = [fmt_param(c) for c in choices] if choices else None
        for status, style in (("completed", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
            points = [(r.params[key], r.metric) for r in ranked if r.status == status and r.metric is not None]
            if not points:
                continue
            xs = [labels.index(fmt_param(v)) if labels else v for v, _ in points]
            ax.scatter(xs, [m for _, m in points], label=status, **style)
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        elif spec.space[key].loguniform:
            ax.set_xscale("log")
        ax.set(title=key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{spec.metric} (pruned: at their last rung)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=2)
    data = figure_png(fig)
    plt.close(fig)
    return data


def plot_importance(spec: SearchSpec, ranked: list[TrialRow]) -> bytes | None:
    """Optuna's parameter importances (fANOVA) over the completed trials, when there are enough of them."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    done = [r for r in ranked if r.status == "completed" and r.metric is not None and math.isfinite(r.metric)]
    if len(done) < 4 or len(spec.space) < 2:
        return None
    distributions = {}
    for key, param in spec.space.items():
        if param.choice is not None:
            distributions[key] = CategoricalDistribution([encode_choice(c) for c in param.choice])
        else:
            low, high = param.uniform or param.loguniform
            distributions[key] = FloatDistribution(low, high, log=param.loguniform is not None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for row in done:
        params = {k: encode_choice(v) for k, v in row.params.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=row.metric))
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = optuna.visualization.matplotlib.plot_param_importances(study)
    ax.figure.set_size_inches(8, 1.2 + 0.6 * len(spec.space))
    for loc in ("left", "center", "right"):  # Optuna writes its own title; keep one
        ax.set_title("", loc=loc)
    ax.set_title(f"parameter importance for {spec.metric} ({len(done)} completed trials, fANOVA)")
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    data = figure_png(ax.figure)
    plt.close(ax.figure)
    return data


def best_yaml(spec: SearchSpec, best: TrialRow, out: Path) -> str:
    """The best trial's full TrialConfig, runnable as is; the header shows how to make it a full run."""
    config = json.loads(json.dumps(best.config))
    config["output"].update(dir=f"outputs/{spec.name}-best", save_adapter=True)
    header = (
        f"# The best trial of search '{spec.name}': {best.trial_id}, {spec.metric} {fmt(best.metric)} "
        f"at step {best.steps}.\n"
        f"#   fika train --config {out / 'best.yaml'}            # reproduces the trial\n"
        f"#   fika train --config {out / 'best.yaml'} train.max_steps=-1 train.epochs=3   # the full run\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def to_markdown(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def build_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Writes the report of the search in `run` to `out` (default: the spec's report_dir or reports/<name>)."""
    run = Path(run)
    spec_path = run / "spec.yaml"
    if not spec_path.exists():
        from fika.config import ConfigError

        raise ConfigError(f"{run}: not a search folder (no spec.yaml); give the folder `fika search` printed")
    spec = SearchSpec.model_validate(yaml.safe_load(spec_path.read_text()))
    out = Path(out or spec.report_dir or Path("reports") / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(run, spec)
    main_rows = rank([r for r in rows if not r.confirm_of])
    confirms: dict[str, list[TrialRow]] = {}
    for row in rows:
        if row.confirm_of and row.status == "completed":
            confirms.setdefault(row.confirm_of, []).append(row)
    for row in main_rows:
        if row.trial_id in confirms and row.status == "completed":
            confirms[row.trial_id].append(row)

    headers, body = table(spec, main_rows)
    counts = {s: sum(1 for r in main_rows if r.status == s) for s in STATUS_ORDER}
    hours = sum(r.wall_time_s for r in rows) / 3600
    tokens = sum(r.tokens_seen for r in rows)
    best = next((r for r in main_rows if r.status == "completed"), None)
    csv_rows = [
        {"rank": i, "trial": r.trial_id, **{f"param:{k}": encode_choice(v) for k, v in r.params.items()},
         "status": r.status, "metric": r.metric, "eval_loss": r.eval_loss, "train_loss_smooth": r.train_loss_smooth,
         "steps": r.steps, "tokens_seen": r.tokens_seen, "wall_time_s": r.wall_time_s,
         "peak_memory_mb": r.peak_memory_mb, "baseline": r.baseline, "error": r.error,
         "config": json.dumps(r.config, sort_keys=True)}
        for i, r in enumerate(main_rows, 1)
    ]  # fmt: skip
    import pandas as pd

    write_atomic(out / "trials.csv", pd.DataFrame(csv_rows).to_csv(index=False))

    images = {"curves.png": plot_curves(spec, main_rows)} if any(r.records for r in main_rows) else {}
    if any(r.metric is not None for r in main_rows):
        images["params.png"] = plot_params(spec, main_rows)
    importance = plot_importance(spec, main_rows)
    if importance:
        images["importance.png"] = importance
    for name, data in images.items():
        write_atomic(out / name, data)
    if best is not None:
        write_atomic(out / "best.yaml", best_yaml(spec, best, out))

    summary = [
        f"{len(main_rows)} trials: "
        + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + (f"; {sum(len(v) for v in confirms.values())} confirmation runs" if confirms else ""),
        f"compute: {hours:.2f} trial-hours, {tokens:,} tokens seen",
        f"ranked by {spec.metric} at step {spec.max_steps} on the same {spec.base.data.eval_size} held-out "
        "conversations for every trial; pruned trials rank below completed ones, by the rung they reached.",
    ]
    note = noise_note(spec, main_rows, confirms)
    confirm_lines = []
    for trial_id, group in confirms.items():
        values = [r.metric for r in group if r.metric is not None]
        if len(values) > 1:
            confirm_lines.append(
                f"- {trial_id}: {spec.metric} mean {statistics.mean(values):.4f}, std {statistics.stdev(values):.4f} "
                f"over seeds {sorted(r.seed for r in group)}"
            )
    shown = Path(os.path.relpath(run)) if run.resolve().is_relative_to(Path.cwd()) else run
    command = f"fika search {shown / 'spec.yaml'}"
    md = [f"# Search report: {spec.name}", "", *[f"- {s}" for s in summary], ""]
    if note:
        md += [f"> {note}", ""]
    if confirm_lines:
        md += ["## Seeds (re-runs of the top trials)", "", *confirm_lines, ""]
    md += ["## Ranking", "", to_markdown(headers, body), ""]
    if best is not None:
        md += ["## Best config", "", f"`{best.trial_id}`: {spec.metric} {fmt(best.metric)}. "
               f"Full run: `fika train --config {out / 'best.yaml'} train.max_steps=-1 train.epochs=3`", ""]  # fmt: skip
    for name, title in (("curves.png", "Loss curves"), ("params.png", "Metric by parameter value"),
                        ("importance.png", "Parameter importance")):  # fmt: skip
        if name in images:
            md += [f"## {title}", "", f"![{title}]({name})", ""]
    md += ["## The search", "", f"Re-run or resume: `{command} --resume`", "", "```yaml",
           yaml.safe_dump(yaml.safe_load(spec_path.read_text()), sort_keys=False).strip(), "```", ""]  # fmt: skip
    write_atomic(out / "index.md", "\n".join(md))
    write_atomic(out / "index.html", to_html(spec, summary, note, confirm_lines, headers, body, main_rows, best,
                                                   images, spec_path, out))  # fmt: skip
    return out


def to_html(spec, summary, note, confirm_lines, headers, body, rows, best, images, spec_path, out) -> str:
    """The same report as one self-contained HTML page (plots inline as data URIs)."""
    esc = html.escape
    head_cells = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body_rows = []
    for row, cells in zip(rows, body, strict=True):
        css = row.status + (" baseline" if row.baseline else "")
        body_rows.append(f'<tr class="{css}">' + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>fika search report: {esc(spec.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;font-size:.85rem;width:100%}th,td{border-bottom:1px solid #ddd;"
        "padding:.3rem .5rem;text-align:right;white-space:nowrap}th{background:#f4f4f4;position:sticky;top:0}"
        "td:nth-child(2),td:last-child{text-align:left}td:last-child{white-space:normal;min-width:8rem}tr.pruned{color:#777}tr.failed,tr.diverged{color:#a00}"
        "tr.baseline{font-style:italic;background:#fffbe6}tr:first-child.completed{font-weight:600}"
        "blockquote{border-left:4px solid #e0a800;margin:1rem 0;padding:.5rem 1rem;background:#fffbe6}"
        "img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:1rem;overflow:auto}"
        ".wrap{overflow-x:auto}</style></head><body>",
        f"<h1>Search report: {esc(spec.name)}</h1><ul>" + "".join(f"<li>{esc(s)}</li>" for s in summary) + "</ul>",
    ]
    if note:
        parts.append(f"<blockquote>{esc(note)}</blockquote>")
    if confirm_lines:
        parts.append("<h2>Seeds (re-runs of the top trials)</h2><ul>"
                     + "".join(f"<li>{esc(c[2:])}</li>" for c in confirm_lines) + "</ul>")  # fmt: skip
    parts.append(f"<h2>Ranking</h2><div class='wrap'><table><thead><tr>{head_cells}</tr></thead><tbody>"
                 + "".join(body_rows) + "</tbody></table></div>")  # fmt: skip
    if best is not None:
        parts.append(f"<h2>Best config</h2><p><code>{esc(best.trial_id)}</code>: {esc(spec.metric)} "
                     f"{esc(fmt(best.metric))}. Full run: <code>fika train --config {esc(str(out / 'best.yaml'))} "
                     "train.max_steps=-1 train.epochs=3</code></p>")  # fmt: skip
    for name, title in (("curves.png", "Loss curves"), ("params.png", "Metric by parameter value"),
                        ("importance.png", "Parameter importance")):  # fmt: skip
        if name in images:
            data = base64.b64encode(images[name]).decode()
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{data}'>")
    parts.append(f"<h2>The search</h2><pre>{esc(spec_path.read_text())}</pre></body></html>")
    return "\n".join(parts)

"""The ranked report of a search, finished or not: index.md, index.html, trials.csv, plots, best.yaml, report.json.

Reads only the run folder (`spec.yaml`, `run.json`, `draws.jsonl`, `trials/*/{config.yaml, data.json,
metrics.jsonl, evals.jsonl, result.json}`), tolerating files cut short by a killed process, so it works on a
running search, a killed one (its trials without a result are `interrupted` once no process holds the run folder),
and one with failed trials. Ranking ("60-step loss"): the spec's metric at the
last step for completed trials; pruned trials rank below them (deeper rung first); diverged and failed
trials are listed last with their reason. Markdown and HTML are rendered from one list of sections; every
file is replaced atomically. A report folder belongs to one search: another search's report is not replaced
while that search's run folder still exists.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fika.common import folder_holder, log, mask_secrets, public_status, read_json, read_jsonl, write_atomic
from fika.config import ConfigError, get_dotted
from fika.search import analysis, plots
from fika.search.confirm import load_run_spec
from fika.search.spec import SearchSpec, baseline_params, encode_choice, split_key

STATUS_ORDER = {"completed": 0, "pruned": 1, "running": 2, "interrupted": 3, "diverged": 4, "failed": 5}
HARD_FLOOR = {"dropout": 0, "weight": 0, "limit": 0, "min_tokens": 0, "warmup_steps": 0, "weight_decay": 0}
REPORT_FILES = ("index.md", "index.html", "trials.csv", "best.yaml", "report.json")


def default_report_dir(name: str) -> Path:
    """Where a search's report goes unless told otherwise: `reports/<name>` under the current folder."""
    return Path("reports") / name


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
    step_time_s: float = 0.0  # the training steps only
    eval_time_s: float = 0.0
    seconds_per_step: float | None = None
    peak_memory_mb: float = 0.0
    trainable_params: int = 0
    device: str = ""
    seed: int | None = None
    started_at: float = 0.0
    confirm_of: str | None = None
    confirm_steps: int | None = None
    baseline: bool = False
    drawn: str = ""
    error: str = ""
    config: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    final_eval: dict | None = None  # the evals.jsonl record at eval_step: per-conversation sums
    eval_per_source: dict[str, float] = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    rung_values: dict[int, float] = field(default_factory=dict)


def param_value(spec: SearchSpec, config: dict, key: str) -> Any:
    """The value of a searched key (or a pair of keys) in a trial's resolved config, spelled as in the space."""
    values = [get_dotted(config, part) for part in split_key(key)]
    value = values if len(values) > 1 else values[0]
    choices = spec.space[key].choice
    return choices[choices.index(value)] if choices and value in choices else value


def search_state(run: Path) -> str:
    """`finished`, `running` (a process holds its folder) or `interrupted` (not finished, and no process holds its
    folder any more: a stopped, killed or crashed driver)."""
    if (read_json(run / "run.json") or {}).get("finished_at"):
        return "finished"
    return "running" if folder_holder(run) else "interrupted"


def load_rows(run: Path, spec: SearchSpec, running: bool = True) -> list[TrialRow]:
    """Every trial folder of a run as a TrialRow (running and failed ones included); `running=False`: nothing runs
    the search any more, so a trial without a result was interrupted."""
    rows = []
    baseline = baseline_params(spec) if spec.baseline else None
    draws = {d.get("trial"): d.get("drawn", "") for d in read_jsonl(run / "draws.jsonl")}
    rungs = set(spec.rungs())
    for directory in sorted((run / "trials").glob("*/")):
        try:
            config = yaml.safe_load((directory / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            config = None
        if not isinstance(config, dict):
            if not (directory / "result.json").exists():
                continue  # a folder still being created
            config = {}  # a trial whose worker died before it wrote its config
        records = read_jsonl(directory / "metrics.jsonl")
        result = read_json(directory / "result.json") or {}
        confirm = read_json(directory / "confirm.json") or {}
        status = public_status(result.get("status") or ("running" if running else "interrupted"))
        last = records[-1] if records else {}
        evals = {int(k): v for k, v in (result.get("eval_losses") or {}).items()} or {
            r["step"]: r["eval_loss"] for r in records if "eval_loss" in r
        }
        eval_step = max(evals) if evals else None
        final = [e for e in read_jsonl(directory / "evals.jsonl") if e.get("step") == eval_step and "sums" in e]
        row = TrialRow(
            trial_id=directory.name,
            params={key: param_value(spec, config, key) for key in spec.space},
            status=status,
            eval_loss=evals.get(eval_step),
            eval_step=eval_step,
            train_loss_smooth=result.get("train_loss_smooth", last.get("train_loss_smooth")),
            steps=result.get("steps") or last.get("step", 0),
            tokens_seen=result.get("tokens_seen") or last.get("tokens_seen", 0),
            wall_time_s=result.get("wall_time_s") or last.get("elapsed_s", 0.0),
            step_time_s=result.get("step_time_s") or sum(r.get("step_time_s") or 0.0 for r in records),
            eval_time_s=result.get("eval_time_s") or sum(r.get("eval_time_s") or 0.0 for r in records),
            seconds_per_step=result.get("seconds_per_step"),
            peak_memory_mb=result.get("peak_memory_mb", 0.0),
            trainable_params=result.get("trainable_params", 0),
            device=result.get("device", ""),
            seed=get_dotted(config, "train.seed"),
            started_at=result.get("started_at") or 0.0,
            confirm_of=confirm.get("of"),
            confirm_steps=confirm.get("steps"),
            drawn=draws.get(directory.name, ""),
            error=result.get("error") or "",
            config=config,
            records=records,
            final_eval=final[-1] if final else None,
            eval_per_source=result.get("eval_per_source") or last.get("eval_per_source") or {},
            data=read_json(directory / "data.json") or {},
            rung_values={
                r["step"]: r[spec.rung_key()] for r in records if r.get("step") in rungs and spec.rung_key() in r
            },
        )
        if spec.metric == "eval_loss":
            row.metric = (
                row.eval_loss if status != "pruned" else next(reversed(row.rung_values.values()), row.eval_loss)
            )
        else:
            row.metric = row.train_loss_smooth
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
    """Completed by metric, then pruned (deeper rung first), running, interrupted, diverged, failed."""

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
    """`train.learning_rate` -> `learning_rate`, `data.sources.ultrachat.weight` -> `ultrachat.weight`."""

    def short(part: str) -> str:
        pieces = part.split(".")
        return ".".join(pieces[-2:]) if part.startswith("data.sources.") else pieces[-1]

    return ", ".join(short(part) for part in split_key(key))


# --- sections: one list, rendered as Markdown and as HTML ---------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    classes: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)  # paragraphs; `code` is kept as code in both renderings
    table: Table | None = None
    image: str | None = None
    code: str | None = None
    note: bool = False  # a highlighted remark


def render_markdown(title: str, sections: list[Section]) -> str:
    md = [f"# {title}", ""]
    for s in sections:
        if s.title:
            md += [f"## {s.title}", ""]
        md += [(f"> {line}" if s.note else line) for line in s.lines] + ([""] if s.lines else [])
        if s.table:
            md.append("| " + " | ".join(s.table.headers) + " |")
            md.append("|" + "|".join("---" for _ in s.table.headers) + "|")
            md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in s.table.rows]
            md.append("")
        if s.image:
            md += [f"![{s.title}]({s.image})", ""]
        if s.code:
            md += ["```yaml", s.code.strip(), "```", ""]
    return "\n".join(md)


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1600px;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;font-size:.8rem}th,td{border-bottom:1px solid #ddd;padding:.3rem .5rem;"
    "text-align:right;white-space:nowrap}th{background:#f4f4f4;position:sticky;top:0}td:nth-child(2){text-align:left}"
    "td.text{text-align:left;white-space:normal;min-width:8rem}tr.pruned{color:#777}tr.failed,tr.diverged{color:#a00}"
    "tr.baseline{font-style:italic;background:#fffbe6}tr.best{font-weight:600}"
    ".note{border-left:4px solid #e0a800;margin:1rem 0;padding:.5rem 1rem;background:#fffbe6}"
    "img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:1rem;overflow:auto}"
    ".wrap{overflow-x:auto}code{background:#f4f4f4;padding:0 .2rem}"
)


def inline_html(text: str) -> str:
    """Escapes text and turns `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    """The same report as one self-contained HTML page (plots inline as data URIs)."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]  # fmt: skip
    for s in sections:
        if s.title:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
        lines = [line.removeprefix("- ") for line in s.lines]
        if s.lines and all(line.startswith("- ") for line in s.lines):
            parts.append("<ul>" + "".join(f"<li>{inline_html(line)}</li>" for line in lines) + "</ul>")
        else:
            parts += [f"<p{' class=note' if s.note else ''}>{inline_html(line)}</p>" for line in lines]
        if s.table:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s.table.headers)
            body = []
            for i, row in enumerate(s.table.rows):
                css = s.table.classes[i] if i < len(s.table.classes) else ""
                cells = "".join(
                    f"<td{' class=text' if j == len(row) - 1 else ''}>{html.escape(c)}</td>" for j, c in enumerate(row)
                )
                body.append(f"<tr class='{css}'>{cells}</tr>")
            parts.append(
                f"<div class='wrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            )
        if s.image and s.image in images:
            data = base64.b64encode(images[s.image]).decode()
            parts.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{data}'>")
        if s.code:
            parts.append(f"<pre>{html.escape(s.code)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- what the report says ---------------------------------------------------------------------------


@dataclass
class Report:
    """Everything a report is built from: the spec, the ranked trials, and where it is written."""

    spec: SearchSpec
    run: Path
    out: Path
    ranked: list[TrialRow]
    confirms: list[TrialRow]
    state: str = "finished"  # see search_state

    @property
    def completed(self) -> list[TrialRow]:
        return [r for r in self.ranked if r.status == "completed" and r.metric is not None and math.isfinite(r.metric)]

    @property
    def best(self) -> TrialRow | None:
        return self.completed[0] if self.completed else None

    @property
    def shared_step(self) -> int:
        """The last step every ranked (completed or pruned) trial reached: where their train losses compare."""
        steps = [r.steps for r in self.ranked if r.status in ("completed", "pruned")]
        return min(steps, default=self.spec.max_steps)

    @property
    def baseline(self) -> TrialRow | None:
        return next((r for r in self.ranked if r.baseline), None)


def paired_against(row: TrialRow, other: TrialRow | None) -> analysis.Paired | None:
    if other is None or row is other or row.final_eval is None or other.final_eval is None:
        return None
    if row.eval_step != other.eval_step:
        return None
    return analysis.compare(row.final_eval, other.final_eval)


def train_loss_at(row: TrialRow, step: int) -> float | None:
    """A trial's mean train loss of the 10 steps up to `step`, from its metrics.jsonl."""
    return next((rec.get("train_loss_smooth") for rec in reversed(row.records) if rec.get("step") == step), None)


def ranking_table(r: Report) -> Table:
    spec, step = r.spec, r.shared_step
    headers = ["rank", "trial", *(short_key(k) for k in spec.space), f"{spec.metric} @{spec.max_steps}",
               "vs best [95% CI]", "vs baseline", f"train loss avg10 @{step}", "steps", "tokens", "trainable",
               "wall s", "peak MB", "status"]  # fmt: skip
    rows, classes = [], []
    for i, row in enumerate(r.ranked, 1):
        ranked = row.status in ("completed", "pruned")
        status = row.status + (" (baseline)" if row.baseline else "") + (f": {row.error}" if row.error else "")
        at = (
            f" @{max(row.rung_values)}" + ("*" if spec.rung_key() != spec.metric else "")
            if row.status == "pruned" and row.rung_values
            else ""
        )
        vs_best = paired_against(row, r.best) if row.status == "completed" else None
        vs_base = paired_against(row, r.baseline) if row.status == "completed" else None
        rows.append([str(i) if ranked else "", row.trial_id, *(plots.fmt_param(v) for v in row.params.values()),
                     fmt(row.metric) + at, vs_best.text() if vs_best else "", f"{vs_base.diff:+.4f}" if vs_base else "",
                     fmt(train_loss_at(row, step)), str(row.steps), f"{row.tokens_seen:,}", f"{row.trainable_params:,}" if row.trainable_params else "",
                     f"{row.wall_time_s:.0f}", f"{row.peak_memory_mb:,.0f}" if row.peak_memory_mb else "", status])  # fmt: skip
        classes.append(row.status + (" baseline" if row.baseline else "") + (" best" if row is r.best else ""))
    return Table(headers, rows, classes)


def state_lines(r: Report) -> list[str]:
    """What a ranking of a search that has not finished stands for: the trials so far, and how to go on."""
    ended = sum(1 for row in r.ranked if row.status not in ("running", "interrupted"))
    if r.state == "running":
        return [f"The search is still running: {ended} of {r.spec.num_trials()} trials have ended, so this ranking is "
                "provisional."]  # fmt: skip
    if r.state == "interrupted":
        return [f"The search was interrupted: {ended} of {r.spec.num_trials()} trials ended, and no fika process runs "
                f"it any more (its driver was stopped, killed or crashed), so this ranking is provisional. `fika search "
                f"{relative(r.run / 'spec.yaml')} --resume` continues it and keeps every trial that ended."]  # fmt: skip
    return []


def decision_lines(r: Report) -> list[str]:
    """Whether the winner beats #2 and the baseline beyond the eval noise, in numbers."""
    done, best = r.completed, r.best
    if best is None:
        if r.state != "finished":
            return ["No trial has completed yet."]
        return ["No trial completed, so there is no best config: the ranking says how each trial ended, and why."]
    lines = []
    second = done[1] if len(done) > 1 else None
    for other, name in ((second, "#2 (the baseline)" if second is r.baseline else "#2"), (r.baseline, "the baseline")):
        if other is None or other is best or (name == "the baseline" and other is second):
            continue
        if other.status != "completed":
            lines.append(f"The baseline `{other.trial_id}` was {other.status} at step {other.steps}"
                         + (": the scheduler ranked it below the others at its rung." if other.status == "pruned" else "."))  # fmt: skip
            continue
        paired = paired_against(other, best)
        if paired is None:
            lines.append(f"The best trial `{best.trial_id}` leads {name} (`{other.trial_id}`) by "
                         f"{other.metric - best.metric:.4f} (no per-conversation evals to compare them paired).")  # fmt: skip
            continue
        beyond = "beyond the eval noise" if paired.significant else "within the eval noise"
        lines.append(
            f"The best trial `{best.trial_id}` beats {name} (`{other.trial_id}`) by {paired.diff:.4f} {r.spec.metric} "
            f"(95% interval {paired.low:+.4f} to {paired.high:+.4f}, paired over the same {paired.conversations} "
            f"conversations): {beyond}."
        )
    if r.baseline is best:
        lines.append(f"The baseline `{best.trial_id}` (the base config's own values) is the best trial.")
    return lines


def warnings_lines(r: Report) -> list[str]:
    """Edge values, random-only searches, low rung agreement."""
    lines = []
    if r.best is not None:
        lines += [f"Edge: {note}." for note in analysis.edge_values(r.spec.space, r.best.params, HARD_FLOOR)]
    draws = [row.drawn for row in r.ranked if row.drawn]
    if r.spec.searcher == "optuna" and draws and "tpe" not in draws:
        lines.append(
            f"Every trial was drawn at random ({draws.count('random')} random, {draws.count('baseline')} baseline): "
            f"TPE starts modelling after {r.spec.startup()} finished trials; "
            + (f"the space holds only {r.spec.num_trials()} configurations: widen it."
               if r.spec.num_trials() < r.spec.num_samples else "raise num_samples or lower startup_trials.")
        )  # fmt: skip
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
        lines.append(f"- rung {step} ({r.spec.rung_key()}) vs {r.spec.metric} at step {r.spec.max_steps}: Spearman "
                     f"rho {rho:.2f} over {len(pairs)} completed trials{low}")  # fmt: skip
    return lines


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
        lines.append(f"- `{row.trial_id}`: {r.spec.metric} {means[row.trial_id]:.4f} +/- {statistics.stdev(values):.4f} "
                     f"(mean +/- std over {len(values)} seeds: {', '.join(f'{v:.4f}' for v in values)})")  # fmt: skip
    by_mean = sorted(means, key=means.get)
    original = [row.trial_id for row in order]
    survives = by_mean == original
    lines.append(f"The ranking of these {len(order)} trials {'survives' if survives else 'does not survive'} the seeds "
                 f"(by the seed mean: {', '.join(by_mean)}).")  # fmt: skip
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
    rows = [[a.trial_id, fmt(a.metric), f"{s:g}", fmt(b.metric), f"{lg:g}"]
            for (a, b), s, lg in zip(pairs, short, long, strict=True)]  # fmt: skip
    rho_text = f"Spearman rho {rho:.2f}" if rho is not None else "rho not defined"
    lines = [f"The same configs (same seeds and data order) re-run with a schedule of {steps} steps: {rho_text} between "
             f"the {r.spec.max_steps}-step and the {steps}-step ranking: {analysis.verdict(rho)}."]  # fmt: skip
    table = Table(["trial", f"{r.spec.metric} @{r.spec.max_steps}", "rank", f"{r.spec.metric} @{steps}", "rank"], rows)
    return Section(f"Horizon: does the {r.spec.max_steps}-step order hold at {steps} steps?", lines, table)


def data_section(r: Report) -> list[Section]:
    """Rows and tokens per source, the eval loss per source, and the data keys' effects."""
    rows = [row for row in r.ranked if row.data.get("sources")]
    if not rows:
        return []
    names = [s["name"] for s in rows[0].data["sources"]]
    eval_counts = rows[0].data.get("eval_per_source", {})
    headers = ["trial", *(f"{n} rows" for n in names), *(f"{n} tokens" for n in names),
               *(f"eval {n}" for n in eval_counts), r.spec.metric]  # fmt: skip
    body = []
    for row in rows:
        by_name = {s["name"]: s for s in row.data["sources"]}
        body.append([row.trial_id, *(f"{by_name.get(n, {}).get('train', 0):,}" for n in names),
                     *(f"{by_name.get(n, {}).get('train_tokens', 0):,}" for n in names),
                     *(fmt(row.eval_per_source.get(n)) for n in eval_counts), fmt(row.metric)])  # fmt: skip
    shared = "; ".join(f"{n} {c}" for n, c in eval_counts.items())
    lines = [f"Every trial is scored on the same {sum(eval_counts.values())} held-out conversations ({shared}), "
             "drawn once for the search, before any limit, weight or filter."]  # fmt: skip
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
    lines = [f"{line}; {steps / wall:.0%} of it training steps, {evals / wall:.0%} evals, "
             f"{1 - (steps + evals) / wall:.0%} a trial's start and end (model, trainer, saving)"]  # fmt: skip
    if fits and all(f.get("slots") and f.get("ended_at") for f in fits):
        slot = sum((f["ended_at"] - f["started_at"]) * f["slots"] for f in fits)
        at_once = "/".join(sorted({str(f["slots"]) for f in fits}))
        lines.append(f"- slots: {at_once} trials at a time, {slot / 3600:.2f} slot-hours, {min(wall / slot, 1):.0%} "
                     f"of them in a trial (the rest: workers starting, a slot with no trial left); slot time = "
                     f"{slot / steps:.2f}x the training-step time")  # fmt: skip
    return lines


def build_sections(r: Report, images: dict[str, bytes], live: bool = False) -> list[Section]:
    spec, best = r.spec, r.best
    counts = {s: sum(1 for row in r.ranked if row.status == s) for s in STATUS_ORDER}
    draws = [row.drawn for row in r.ranked if row.drawn]
    drawn = ", ".join(f"{draws.count(k)} {k}" for k in ("baseline", "random", "tpe") if draws.count(k))
    so_far = f" of {spec.num_trials()}" if r.state != "finished" else ""
    summary = [
        f"- {len(r.ranked)}{so_far} trials{' so far' if so_far else ''}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + (f"; drawn: {drawn}" if drawn else "") + (f"; {len(r.confirms)} re-runs" if r.confirms else ""),
        *compute_lines(r.ranked + r.confirms, (read_json(r.run / "run.json") or {}).get("fits", [])),
        f"- ranked by {spec.metric} at step {spec.max_steps} on the same {spec.base.data.eval_size} held-out "
        f"conversations for every trial; pruned trials rank below completed ones, by the rung they reached "
        f"({spec.rung_key()} at steps {spec.rungs()})." if spec.rungs() else
        f"- ranked by {spec.metric} at step {spec.max_steps} on the same {spec.base.data.eval_size} held-out "
        "conversations for every trial.",
    ]  # fmt: skip
    notes = state_lines(r) + decision_lines(r) + warnings_lines(r)
    sections = [Section("", summary), Section("", notes, note=True)]
    pruned_note = (f"* a pruned trial's {spec.rung_key()} at the rung where ASHA stopped it; vs best and vs baseline: "
                   f"the difference in {spec.metric} paired over the held-out conversations, with its 95% interval; "
                   f"train loss avg10: the mean train loss of the 10 steps up to step {r.shared_step}, the last step "
                   "every ranked trial reached (a later window holds other conversations, so it would not compare).")  # fmt: skip
    sections.append(Section("Ranking", [pruned_note], ranking_table(r)))
    if best is not None:
        sections.append(Section("Best config", best_lines(r)))
        sections.append(Section("Is the ranking real?", confirm_commands(r)))
    for extra in (seeds_section(r), horizon_section(r)):
        if extra is not None:
            sections.append(extra)
    rung = rung_lines(r)
    if rung:
        sections.append(Section("Rung agreement", rung))
    sections += data_section(r)
    pictures = [("curves.png", "Loss curves"), ("params.png", "Parameter effects"), ("data.png", "Data effects"),
                ("pareto.png", "Loss against cost"), ("history.png", "Optimization history"),
                ("parallel.png", "Parallel coordinates"), ("slice.png", "Slices"),
                ("intermediate.png", "Intermediate values (rungs)"), ("importance.png", "Parameter importance")]  # fmt: skip
    for name, title in pictures:
        if name in images:
            sections.append(Section(title, [], image=name))
    if live:
        sections.append(Section("More plots", ["Parameter effects, loss against cost, Optuna's views and the "
                                f"parameter importance are drawn when the search ends (or by `fika report "
                                f"{relative(r.run)}`)."]))  # fmt: skip
    elif "importance.png" not in images:
        need = plots.importance_rule(len(spec.space))
        sections.append(Section("Parameter importance", [f"Not drawn: fANOVA importances need at least {need} completed "
                                f"trials for {len(spec.space)} searched keys (8, or 2 per key); this search has "
                                f"{len(r.completed)}."]))  # fmt: skip
    spec_text = (r.run / "spec.yaml").read_text() if (r.run / "spec.yaml").exists() else ""
    sections.append(Section("The search", [f"Resume: `fika search {relative(r.run / 'spec.yaml')} --resume`"],
                            code=mask_secrets(spec_text)))  # fmt: skip
    return sections


def relative(path: Path) -> str:
    """A path relative to the current folder when it lies below it (reports hold no machine paths)."""
    path = Path(path)
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def steps_per_epoch(best: TrialRow) -> int | None:
    rows = best.data.get("train_rows")
    t = best.config.get("train", {})
    if not rows:
        return None
    return math.ceil(rows / (t.get("batch_size", 1) * t.get("gradient_accumulation", 1)))


def full_run_command(r: Report) -> str:
    best_file = relative(r.out / "best.yaml")
    return (f"fika train --config {best_file} train.max_steps=-1 train.epochs=3 train.num_evals=10 "
            f"train.checkpoints=true output.dir=outputs/{r.spec.name}-full")  # fmt: skip


def confirm_commands(r: Report) -> list[str]:
    """The commands that measure what the ranking cannot tell: seed noise and the horizon."""
    out = "" if r.out.resolve() == default_report_dir(r.spec.name).resolve() else f" --out {relative(r.out)}"
    run = relative(r.run)
    top = min(3, len(r.completed))
    return [
        f"Seed noise: `fika confirm {run} --top {top} --seeds 3{out}` re-runs the best {top} with 3 other seeds each.",
        f"Horizon: `fika confirm {run} --top {min(6, len(r.completed))} --seeds 0 --steps {4 * r.spec.max_steps}{out}` "
        f"re-runs them with a {4 * r.spec.max_steps}-step schedule: does the {r.spec.max_steps}-step order hold?",
    ]


def best_lines(r: Report) -> list[str]:
    best = r.best
    lines = [f"`{best.trial_id}`: {r.spec.metric} {fmt(best.metric)}.",
             f"Reproduce the trial: `fika train --config {relative(r.out / 'best.yaml')}`",
             f"The full run (3 epochs, 10 evals, checkpoints; `fika train --resume DIR` continues a killed run): "
             f"`{full_run_command(r)}`"]  # fmt: skip
    per_epoch = steps_per_epoch(best)
    if per_epoch and best.seconds_per_step:
        seconds = 3 * per_epoch * best.seconds_per_step
        took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
        lines.append(f"At the {best.seconds_per_step:.2f} s/step measured here ({best.device}), 3 epochs of {per_epoch:,} "
                     f"steps take about {took} plus evals.")  # fmt: skip
    return lines


def best_yaml(r: Report) -> str:
    """The best trial's full TrialConfig, runnable as is; the header shows how to make it a full run."""
    best = r.best
    config = json.loads(json.dumps(best.config))
    config["output"].update(dir=f"outputs/{r.spec.name}-best", save_adapter=True)
    header = (
        f"# The best trial of search '{r.spec.name}': {best.trial_id}, {r.spec.metric} {fmt(best.metric)} at step {best.steps}.\n"
        f"#   fika train --config {relative(r.out / 'best.yaml')}            # reproduces the trial\n"
        f"#   {full_run_command(r)}   # the full run\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def csv_text(r: Report) -> str:
    import pandas as pd

    records, step = [], r.shared_step
    for i, row in enumerate(r.ranked, 1):
        config = json.loads(json.dumps(row.config))
        if isinstance(config.get("output"), dict):  # relative to the run folder, never a machine path
            config["output"]["dir"] = f"trials/{row.trial_id}"
        records.append({"rank": i, "trial": row.trial_id, **{f"param:{k}": encode_choice(v) for k, v in row.params.items()},
                        "status": row.status, "metric": row.metric, "eval_loss": row.eval_loss,
                        "train_loss_smooth": row.train_loss_smooth, "shared_step": step,
                        "train_loss_at_shared_step": train_loss_at(row, step), "steps": row.steps, "tokens_seen": row.tokens_seen,
                        "trainable_params": row.trainable_params, "wall_time_s": row.wall_time_s,
                        "step_time_s": row.step_time_s, "peak_memory_mb": row.peak_memory_mb,
                        "baseline": row.baseline, "drawn": row.drawn, "error": row.error,
                        "config": json.dumps(config, sort_keys=True)})  # fmt: skip
    return mask_secrets(pd.DataFrame(records).to_csv(index=False))


def is_report_file(name: str) -> bool:
    """A file a report writes: its pages and tables, its plots, or an atomic writer's temporary file."""
    return name in REPORT_FILES or name.endswith(".png") or (name.startswith(".") and name.endswith(".tmp"))


def claim_folder(out: Path, run: Path, run_id: str) -> None:
    """Refuses to replace the report of another search whose run folder still exists; a folder that is not
    a fika report is never written into."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"report: {out} is a file; give a folder")
    owner = read_json(out / "report.json")
    if owner is None:  # empty, or a first report cut short by a killed driver: only report files in it
        foreign = [p.name for p in out.iterdir() if not is_report_file(p.name)]
        if foreign:
            raise ConfigError(
                f"report: {out} exists and is not a fika report (it holds {foreign[0]}); give another folder (--out)"
            )
        return
    if owner.get("run_id") == run_id:
        return
    other = (out / owner.get("run", "")).resolve() if owner.get("run") else None
    other_id = (read_json(other / "run.json") or {}).get("id") if other else None
    if other_id and other_id == owner.get("run_id"):
        raise ConfigError(
            f"report: {out} holds the report of another search ({relative(other)}); give another folder (--out or "
            "report_dir=...)"
        )
    log(f"report: replacing {out}, the report of a search whose run folder is gone")


def build_report(run: str | Path, out: str | Path | None = None, claimed: bool = False, live: bool = False) -> Path:
    """Writes the report of the search in `run` to `out` (default: reports/<name>); `claimed`: the caller has
    already checked `out` with `claim_folder`. `live`: a build while trials run, with the loss curves as its only
    plot (the others take about 1 s of CPU per build, which a laptop's trials would lose)."""
    run = Path(run).expanduser()
    spec = load_run_spec(run)
    out = Path(out).expanduser() if out else default_report_dir(spec.name)
    run_id = (read_json(run / "run.json") or {}).get("id", "")
    if not claimed:
        claim_folder(out, run, run_id)
    state = search_state(run)
    rows = load_rows(run, spec, running=state == "running")
    r = Report(spec, run, out, rank([row for row in rows if not row.confirm_of]), [row for row in rows if row.confirm_of],
               state)  # fmt: skip
    images: dict[str, bytes] = {}
    if any(row.records for row in r.ranked):
        images["curves.png"] = plots.plot_curves(spec, r.ranked)
    model_keys = [k for k in spec.space if not k.startswith("data.")]
    data_keys = [k for k in spec.space if k.startswith("data.")]
    if not live and any(row.metric is not None for row in r.ranked):
        if model_keys:
            images["params.png"] = plots.plot_effects(spec, r.ranked, model_keys, "eval loss by parameter value")
        if data_keys:
            images["data.png"] = plots.plot_effects(spec, r.ranked, data_keys, "eval loss by data key")
    if len(r.completed) >= 2 and not live:
        images["pareto.png"] = plots.plot_pareto(spec, r.completed)
        images.update(plots.optuna_views(spec, r.ranked))
    importance = None if live else plots.plot_importance(spec, r.ranked)
    if importance:
        images["importance.png"] = importance
    sections = build_sections(r, images, live)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.png"), *out.glob(".*.tmp")]:  # plots no longer drawn, files of a killed writer
        if stale.name not in images:
            stale.unlink(missing_ok=True)
    for name, data in images.items():
        write_atomic(out / name, data)
    write_atomic(out / "trials.csv", csv_text(r))
    if r.best is not None:
        write_atomic(out / "best.yaml", best_yaml(r))
    else:  # an earlier build's best config no longer holds
        (out / "best.yaml").unlink(missing_ok=True)
    title = f"Search report: {spec.name}"
    write_atomic(out / "index.md", render_markdown(title, sections))
    write_atomic(out / "index.html", render_html(title, sections, images))
    best = r.best
    write_atomic(out / "report.json", json.dumps({
        "name": spec.name, "run_id": run_id, "run": os.path.relpath(run.resolve(), out.resolve()),
        "generated_at": time.time(), "counts": {s: sum(1 for x in r.ranked if x.status == s) for s in STATUS_ORDER},
        "best": None if best is None else {"trial": best.trial_id, "metric": best.metric,
                                           "seconds_per_step": best.seconds_per_step, "device": best.device,
                                           "steps_per_epoch": steps_per_epoch(best)},
    }, indent=1))  # fmt: skip
    return out

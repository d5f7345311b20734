"""The report's pictures (PNG bytes): fika's loss curves against the baseline and loss against cost, and Optuna's
own views (optimization history, parallel coordinates, slices of every searched key, data keys included,
intermediate values, importances) drawn by `optuna.visualization.matplotlib` on an in-memory study of the
report's trials."""

from __future__ import annotations

import io
import warnings
from typing import Any

from fika.search.spec import SearchSpec
from fika.search.trials import encode_choice

TOP_CURVES = 5


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("default")  # Optuna's views switch the global style to ggplot
    return plt


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def fmt_param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return ", ".join(fmt_param(v) for v in value) if isinstance(value, list) else str(value)


def plot_curves(spec: SearchSpec, ranked: list) -> bytes:
    """Train loss (mean of 10 steps) and eval loss against steps for the top trials and the baseline."""
    plt = pyplot()
    top = [r for r in ranked if r.status in ("completed", "pruned") and r.records][:TOP_CURVES]
    baseline = next((r for r in ranked if r.baseline and r.records), None)
    if baseline is not None and baseline not in top:
        top.append(baseline)
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(top):
        style = {"color": "black", "linestyle": "--"} if row.baseline else {"color": colors[i % len(colors)]}
        label = (
            f"{row.trial_id}{' (baseline)' if row.baseline else ''}: {row.metric:.4f}" if row.metric else row.trial_id
        )
        train_ax.plot(
            [r["step"] for r in row.records], [r["train_loss_smooth"] for r in row.records], label=label, **style
        )
        evals = [(r["step"], r["eval_loss"]) for r in row.records if "eval_loss" in r]
        if evals:
            eval_ax.plot(*zip(*evals, strict=True), marker="o", label=label, **style)
    train_ax.set(title="train loss (mean of the last 10 steps)", xlabel="step", ylabel="loss")
    eval_ax.set(title="eval loss (held-out set)", xlabel="step")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.axvline(spec.max_steps, color="gray", linewidth=0.8)
    handles, labels = train_ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=3,
        fontsize=8,
        title=f"trial: {spec.metric} at its last eval",
        title_fontsize=8,
        bbox_to_anchor=(0.5, -0.12),
    )
    fig.suptitle(f"{spec.name}: top {len(top)} trials" + (" and the baseline (dashed)" if baseline else ""))
    return png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost and loss (lower is better on both)."""
    front = []
    for i, (cost, loss) in enumerate(points):
        if not any(c <= cost and v <= loss and (c < cost or v < loss) for c, v in points):
            front.append(i)
    return front


def plot_pareto(spec: SearchSpec, rows: list) -> bytes:
    """Eval loss against three costs of a trial (slot-seconds, peak memory, trainable parameters); the trials on
    each Pareto front are named."""
    plt = pyplot()
    slot = spec.resources.gpu or spec.resources.cpu
    costs = (
        ("slot-seconds", lambda r: r.wall_time_s * slot),
        ("peak memory (MB)", lambda r: r.peak_memory_mb),
        ("trainable parameters", lambda r: r.trainable_params),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (name, cost) in zip(axes, costs, strict=True):
        points = [(cost(r), r.metric) for r in rows]
        front = pareto_front(points)
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", alpha=0.6)
        for i in front:
            ax.scatter(*points[i], color="tab:red", zorder=3)
            ax.annotate(rows[i].trial_id, points[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
        ordered = sorted(points[i] for i in front)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], color="tab:red", linewidth=0.8)
        ax.set(xlabel=name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(spec.metric)
    fig.suptitle("loss against cost: the red trials are on the front (nothing is both cheaper and better)", y=1.02)
    return png(fig)


def build_study(spec: SearchSpec, rows: list):
    """An in-memory Optuna study of the report's completed and pruned trials, with their rung values."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    distributions = {}
    for key, param in spec.space.items():
        if param.choice is not None:
            distributions[key] = CategoricalDistribution([encode_choice(c) for c in param.choice])
        else:
            low, high = param.uniform or param.loguniform
            distributions[key] = FloatDistribution(low, high, log=param.loguniform is not None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", study_name=spec.name)
    for row in sorted(rows, key=lambda r: r.started_at):  # in the order they ran: the history reads left to right
        params = {k: encode_choice(v) for k, v in row.params.items()}
        if row.status == "completed" and row.metric is not None:
            state, value = TrialState.COMPLETE, row.metric
        elif row.status == "pruned" and row.rung_values:
            state, value = TrialState.PRUNED, None
        else:
            continue
        steps = {**row.rung_values, **({row.steps: row.metric} if state == TrialState.COMPLETE else {})}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=distributions, value=value, state=state, intermediate_values=steps
            )
        )
    return study


def optuna_views(spec: SearchSpec, rows: list) -> dict[str, bytes]:
    """Optuna's optimization history, parallel coordinates, slices and intermediate values of the trials."""
    from optuna.visualization import matplotlib as views

    study = build_study(spec, rows)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return {}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, draw in (
            ("history.png", views.plot_optimization_history),
            ("parallel.png", views.plot_parallel_coordinate),
            ("slice.png", views.plot_slice),
            ("intermediate.png", views.plot_intermediate_values),
        ):
            axes = draw(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(max(figure.get_size_inches()[0], 9), max(figure.get_size_inches()[1], 4))
            out[name] = png(figure)
    return out


def importance_rule(keys: int) -> int:
    """How many completed trials fANOVA importances need before they mean anything: 8, or 2 per searched key."""
    return max(8, 2 * keys)


def plot_importance(spec: SearchSpec, rows: list) -> bytes | None:
    """Optuna's parameter importances (fANOVA) over the completed trials, when there are enough of them."""
    from optuna.visualization import matplotlib as views

    study = build_study(spec, [r for r in rows if r.status == "completed"])
    if len(study.trials) < importance_rule(len(spec.space)) or len(spec.space) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = views.plot_param_importances(study)
    ax.figure.set_size_inches(8, 1.2 + 0.6 * len(spec.space))
    for loc in ("left", "center", "right"):  # Optuna writes its own title; keep one
        ax.set_title("", loc=loc)
    ax.set_title(f"parameter importance for {spec.metric} ({len(study.trials)} completed trials, fANOVA)")
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    return png(ax.figure)

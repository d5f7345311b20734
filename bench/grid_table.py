"""Runs every config of a spec's space once, with full evals at its rungs, and writes the table that
bench/search_quality.py replays searchers over: per config, its smoothed train loss at every step and its eval loss
sums per held-out conversation at each eval step.

  python bench/search_quality.py --grid SPEC --table OUT [--storage DIR]   # how it is run
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def run_grid(spec_path: str, out: Path, storage: Path | None = None) -> None:
    """Runs every config of a spec's space (FIFO; full evals at its rungs, a third and two thirds of the steps, and
    the end) and writes the table. With `storage` holding a grid that was stopped, it goes on from there."""
    from fika.search.driver import run_search

    resume = storage is not None and (storage / "grid-table").exists()
    storage = storage or Path(tempfile.mkdtemp(prefix="fika-grid-"))
    print(f"the grid runs in {storage} (a stopped one goes on with --storage {storage})", flush=True)
    run_search(grid_spec(spec_path, storage, "grid-table"), resume=resume)
    write_table(spec_path, out, storage)


def grid_spec(spec_path: str, storage: Path, name: str, overrides: tuple[str, ...] = ()):
    """The search that runs a spec's whole space once, with evals at its rungs, a third, two thirds and the end."""
    from fika.search.api import resolved_spec
    from fika.search.spec import load_spec

    searched = load_spec(spec_path)
    evals = sorted({*searched.rungs(), searched.max_steps // 3, 2 * searched.max_steps // 3})
    fixed = ["searcher=grid", "num_samples=1", "scheduler={kind: fifo}", "baseline=false"]
    return resolved_spec(
        spec_path, [f"name={name}", *fixed, f"base.train.eval_steps={evals}", f"storage={storage}", *overrides]
    )


def write_table(spec_path: str, out: Path, storage: Path) -> None:
    """The table of every completed trial of the grid searches in `storage` (one row per config: the first that
    ran it), all scored on the same eval conversations."""
    import yaml

    from fika.files import read_json, read_jsonl
    from fika.search.report.rows import param_value
    from fika.search.spec import load_spec

    searched = load_spec(spec_path)
    spec = grid_spec(spec_path, storage, "grid-table")
    rows, ids = {}, None
    for folder in sorted(storage.glob("*/trials/*/")):
        result = read_json(folder / "result.json") or {}
        if result.get("status") != "completed":
            continue
        config = yaml.safe_load((folder / "config.yaml").read_text())
        params = {key: param_value(spec, config, key) for key in spec.space}  # spelled as in the space
        evals = read_jsonl(folder / "evals.jsonl")
        ids = ids or evals[0]["ids"]
        assert evals[0]["ids"] == ids, f"{folder} was scored on other eval conversations"
        rows.setdefault(
            json.dumps(params, sort_keys=True),
            {
                "trial": folder.name,
                "params": params,
                "status": result.get("status"),
                "train_loss_smooth": [r["train_loss_smooth"] for r in read_jsonl(folder / "metrics.jsonl")],
                "evals": {e["step"]: {"sums": e["sums"], "counts": e["counts"]} for e in evals},
                "seconds_per_step": result.get("seconds_per_step"),
                "eval_time_s": result.get("eval_time_s"),
            },
        )
    out.write_text(
        json.dumps(
            {
                "spec": Path(spec_path).name,
                "space": {k: v.model_dump(exclude_none=True) for k, v in spec.space.items()},
                "max_steps": spec.max_steps,
                "grace": searched.scheduler.grace_period or searched.max_steps // 3,
                "reduction": searched.scheduler.reduction_factor,
                "eval_ids": ids,
                "rows": list(rows.values()),
            }
        )
    )
    print(f"wrote {out}: {len(rows)} configs")

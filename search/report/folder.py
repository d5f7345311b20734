"""Which folder a search's report goes to, and the rule that protects it: a report folder belongs to one search,
and a folder fika did not write is never written into."""

from __future__ import annotations

import os
from pathlib import Path

from fika.console import log
from fika.errors import ConfigError
from fika.files import read_json

REPORT_FILES = ("index.md", "index.html", "trials.csv", "best.yaml", "report.json")


def default_report_dir(name: str) -> Path:
    """Where a search's report goes unless told otherwise: `reports/<name>` under the current folder."""
    return Path("reports") / name


def relative(path: Path) -> str:
    """A path relative to the current folder when it lies below it (reports hold no machine paths)."""
    path = Path(path)
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def is_report_file(name: str) -> bool:
    """A file a report writes: its pages and tables, its plots, or an atomic writer's temporary file."""
    return name in REPORT_FILES or name.endswith(".png") or (name.startswith(".") and name.endswith(".tmp"))


def claim_folder(out: Path, run: Path, run_id: str) -> None:
    """Refuses to replace the report of another search whose run folder still exists, and any folder fika cannot
    prove it wrote (a report is proven by its report.json, which a build writes first): a folder that is not a fika
    report, or holds report files without report.json (an older fika's), is never written into."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"report: {out} is a file; give a folder")
    owner = read_json(out / "report.json")
    if owner is None:  # empty, or a first build killed while it wrote report.json: only temporary files in it
        held = sorted(p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if any(not is_report_file(name) for name in held):
            foreign = next(name for name in held if not is_report_file(name))
            raise ConfigError(
                f"report: {out} exists and is not a fika report (it holds {foreign}); give another folder (--out)"
            )
        if held:
            raise ConfigError(
                f"report: {out} holds a report without report.json (an older fika's?), which fika cannot tell is this "
                "search's; give another folder (--out or report_dir=...), or remove that one"
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

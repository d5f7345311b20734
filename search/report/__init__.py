"""The ranked report of a search, finished or not: `build_report(run_dir, out)` writes index.md, index.html,
trials.csv, best.yaml, report.json and the plots (see fika.search.report.build)."""

from fika.search.report.build import build_report, load_report, ranking_frame
from fika.search.report.folder import claim_folder, default_report_dir

__all__ = ["build_report", "claim_folder", "default_report_dir", "load_report", "ranking_frame"]

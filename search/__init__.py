"""Many trials (installed as `fika.search`): Ray Tune + Optuna over fika trials, and their ranked reports.

import fika.search
result = fika.search.run("demo")            # or a spec file, a mapping; overrides as a list or a dict
result.ranking                              # pandas DataFrame, one row per trial in report order
fika.search.load("runs/demo")               # the same for a finished or running search
"""

from fika.search.api import SearchResult, build_report, confirm, dry_run, load, run

__all__ = ["SearchResult", "build_report", "confirm", "dry_run", "load", "run"]

"""The Python API of searches: run or resume one, check one without running it, re-run its best trials, load one
(finished or running) as a ranking. The `fika search`, `fika confirm` and `fika report` commands are thin layers
over these functions.

    import fika.search
    result = fika.search.run("demo", overrides={"num_samples": 4})
    result.ranking.head()          # a pandas DataFrame, one row per trial in report order
    result.best_config             # the best trial's TrialConfig as a mapping: fika.train(result.best_config)

Every check runs before Ray starts, and a problem raises `fika.FikaError` whose message is the line the command
prints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from fika.console import say
from fika.errors import FikaError
from fika.files import read_json
from fika.overrides import Overrides
from fika.search.spec import SearchSpec, load_spec

SpecSource = str | Path | dict | SearchSpec


@dataclass
class SearchResult:
    """A search as its report shows it: state (`finished`, `running` or `interrupted`), the ranking (a pandas
    DataFrame, one row per trial in report order: what trials.csv holds), the best trial and its config, and the
    run and report folders."""

    name: str
    state: str
    run_dir: Path
    report_dir: Path | None
    ranking: object  # pandas.DataFrame
    best_trial: str | None
    best_metric: float | None
    best_config: dict | None

    def __repr__(self) -> str:
        best = f", best {self.best_trial} ({self.best_metric:.4f})" if self.best_trial else ""
        return f"SearchResult({self.name!r}, {self.state}, {len(self.ranking)} trials{best}, run_dir={self.run_dir})"


def load(run_dir: str | Path, report_dir: str | Path | None = None) -> SearchResult:
    """The search in `run_dir` (`<storage>/<name>`), finished, running or interrupted, as a SearchResult."""
    from fika.search.report.best import best_config
    from fika.search.report.build import load_report, ranking_frame

    r = load_report(Path(run_dir).expanduser(), report_dir)
    best = r.best
    return SearchResult(
        name=r.spec.name,
        state=r.state,
        run_dir=r.run,
        report_dir=Path(report_dir) if report_dir else None,
        ranking=ranking_frame(r),
        best_trial=best.trial_id if best else None,
        best_metric=best.metric if best else None,
        best_config=best_config(r) if best else None,
    )


def resolved_spec(spec: SpecSource, overrides: Overrides = None) -> SearchSpec:
    """A validated spec with its local data paths made absolute and its trackers checked."""
    from fika.search.warm_start import absolute_runs
    from fika.sources import resolve_local_paths
    from fika.trackers import check_reporting

    spec = load_spec(spec, overrides)
    base = spec.base.model_copy(update={"data": resolve_local_paths(spec.base.data, prefix="base.data.")})
    spec = spec.model_copy(update={"base": base, "warm_start": absolute_runs(spec.warm_start)})
    check_reporting("trackers", spec.trackers)
    check_reporting("base.train.report_to", spec.base.train.report_to)
    return spec


def dry_run(spec: SpecSource, overrides: Overrides = None, resume: bool = False, *, address: str | None = None) -> str:
    """What a search would run and cost (trials, budget, data, memory), after every check the real run makes before
    it starts Ray (fika.search.checks); no Ray, nothing written."""
    from fika.search.checks import AFTER_RAY, checks_before_ray
    from fika.search.plan import describe_search
    from fika.search.run_folder import run_dir
    from fika.search.warm_start import plan_warm_start

    spec = resolved_spec(spec, overrides)
    if address is not None:
        spec = spec.model_copy(update={"address": address})
    directory = run_dir(spec)
    state = checks_before_ray(spec, directory, resume, dry_run=True)
    ended = len(list((directory / "trials").glob("*/result.json")))
    doing = {
        "new": f"a new search in {directory}",
        "resume": f"resumes the interrupted search in {directory} ({ended} of {spec.num_trials()} trials ended)",
        "restart": f"continues the interrupted search in {directory} ({ended} of {spec.num_trials()} trials ended) "
        "with a new Tune fit (its Tune state was not saved whole)",
        "finished": f"nothing: the search in {directory} has finished with this spec (its report is rebuilt)",
    }[state]
    checked = f"checked: everything the real run checks before Ray; not: {'; '.join(AFTER_RAY)}"
    warm = [f"warm start: {e.describe()}" for e in plan_warm_start(spec)] if state == "new" else []
    return "\n".join([describe_search(spec), f"run: {doing}", *warm, checked])


def report_dir_of(spec: SearchSpec) -> Path:
    from fika.search.report.folder import default_report_dir

    return Path(spec.report_dir).expanduser() if spec.report_dir else default_report_dir(spec.name)


@contextlib.contextmanager
def live_report(run_dir: Path, report_dir: Path, total: int, metric: str, max_steps: int, only: set[str] | None = None):
    """Around a fit: claims the report folder, yields the progress callback (a line per trial's end) and the report
    refresher (a live build at each trial's end); when the block ends, waits for the last build and refuses to
    report success when no report could be written."""
    from fika.search.progress import SearchProgress
    from fika.search.report.folder import claim_folder
    from fika.search.report.live import ReportRefresher

    claim_folder(report_dir, run_dir, (read_json(run_dir / "run.json") or {}).get("id", ""))
    refresh = ReportRefresher(run_dir, report_dir)
    progress = SearchProgress(run_dir, total, metric, max_steps, on_trial_end=refresh, only=only)
    yield progress, refresh
    refresh.finish()
    if refresh.error or not (report_dir / "report.json").exists():
        raise FikaError(
            f"report: {report_dir} could not be written ({refresh.error or 'no build finished'}); the search's results "
            f"are kept in {run_dir}, and `fika report {run_dir}` builds it again"
        )


def run(spec: SpecSource, overrides: Overrides = None, resume: bool = False, *, address: str | None = None):
    """Runs a search to its end (or resumes an interrupted one) and returns it as a SearchResult; its report is
    written as trials end (`report_dir`, default `reports/<name>`). A search that already finished with the same
    spec is reported again, not run."""
    from fika.search.driver import SearchHooks, run_search
    from fika.search.progress import SearchProgress
    from fika.search.run_folder import run_dir

    spec = resolved_spec(spec, overrides)
    directory, report_dir = run_dir(spec), report_dir_of(spec)
    with live_report(directory, report_dir, spec.num_trials(), spec.metric, spec.max_steps) as (progress, refresh):

        def confirm_callbacks(names: set[str], total: int) -> list:
            steps = max(spec.max_steps, spec.confirm.steps or 0)
            return [SearchProgress(directory, total, spec.metric, steps, on_trial_end=refresh, only=names)]

        # the final report is drawn while a Ray instance the search started shuts down
        hooks = SearchHooks(callbacks=[progress], on_done=refresh.final, confirm_callbacks=confirm_callbacks)
        state = run_search(spec, address=address, resume=resume, hooks=hooks)
        if state == "finished":
            say(f"search {spec.name}: already finished in {directory} with this spec; nothing to run")
            refresh.final()
    return load(directory, report_dir)


def confirm(
    run_dir: str | Path,
    top: int = 3,
    seeds: int = 3,
    steps: int | None = None,
    trials: list[str] | None = None,
    *,
    address: str | None = None,
    out: str | Path | None = None,
) -> SearchResult:
    """Re-runs a finished search's best `top` trials (or the `trials` named) with `seeds` other seeds each and/or
    once at `steps` steps; the report (`out`, default `reports/<name>`) gains the seeds and horizon sections."""
    from fika.folder_lock import exclusive_folder
    from fika.search.report.folder import default_report_dir
    from fika.search.rerun import confirm_name, plan_confirm, run_confirm

    run = Path(run_dir).expanduser()
    spec, runs = plan_confirm(run, top, seeds, steps, trials)
    report_dir = Path(out).expanduser() if out else default_report_dir(spec.name)
    with exclusive_folder(run, "", "fika confirm"):  # one driver at a time writes into a search's folder
        names = {confirm_name(r) for r in runs}
        with live_report(run, report_dir, len(runs), spec.metric, steps or spec.max_steps, only=names) as (
            progress,
            refresh,
        ):
            run_confirm(run, spec, runs, address=address, callbacks=[progress], on_done=refresh.final)
    return load(run, report_dir)


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """(Re)builds the ranked report of the search in `run_dir`, finished or not; returns its folder."""
    from fika.search.report.build import build_report as build

    return build(run_dir, out)

"""The live report of a running search: rebuilt in a background thread when a trial ends, never holding up a
trial's freed slot and never letting a report problem stop the search."""

from __future__ import annotations

import contextlib
from pathlib import Path

from fika.console import log
from fika.errors import error_text


class ReportRefresher:
    """Rebuilds a search's report (in a folder the caller has claimed), never letting a report problem stop
    the search.

    `refresh()` (Tune calls it when a trial ends) asks for a live build: the tables and the loss curves, drawn
    in a background thread so that a trial's freed slot is not held up. `refresh.final()` asks for the whole
    report, with every plot; `finish()` waits until the builds asked for are written. One build runs at a time:
    calls during it coalesce into one more (the whole report if any of them asked for it), which is skipped when
    none of the files the report reads changed since the previous build of at least that kind began. A live build
    starts no sooner than `LIVE_PAUSE_S`, or 4 times the last build's duration, after the last one began, so that a
    long search's report (its builds grow with its trials) takes a bounded share of the driver's time; a final build
    never waits. Tune pickles its callbacks with the experiment state: the thread, its lock and the files seen are
    not part of it.
    """

    LIVE_PAUSE_S = 5.0

    def __init__(self, run: Path, out: Path):
        self.__setstate__({"run": run, "out": out})

    def __getstate__(self) -> dict:
        return {"run": self.run, "out": self.out}

    def __setstate__(self, state: dict) -> None:
        import threading

        self.run, self.out = state["run"], state["out"]
        self.lock, self.thread = threading.Lock(), None
        self.asked = threading.Condition(self.lock)  # a build was asked for (wakes a live build's wait)
        self.next_live = 0.0  # when the next live build may start (time.monotonic)
        self.wanted: str | None = None  # the next build: None, "live" or "final"
        self.built_from: tuple[list, bool] | None = None  # the files of the last build, and whether it was final
        self.error: str | None = None  # why the last build failed

    def files_read(self) -> list[tuple[str, int, int]]:
        """(path, size, mtime) of what a report is built from: the spec, run.json (the fits' ends), the draws,
        every trial's files."""
        paths = [self.run / "spec.yaml", self.run / "run.json", self.run / "draws.jsonl", *self.run.glob("trials/*/*")]
        stats = []
        for path in sorted(paths):
            with contextlib.suppress(OSError):
                stat = path.stat()
                stats.append((str(path), stat.st_size, stat.st_mtime_ns))
        return stats

    def build(self, final: bool) -> None:
        from fika.search.report.build import build_report

        files = self.files_read()
        if self.built_from is not None and self.built_from[0] == files and (self.built_from[1] or not final):
            return
        try:
            build_report(self.run, self.out, claimed=True, live=not final)
            self.built_from, self.error = (files, final), None
        except Exception as err:
            self.error = error_text(err, 300)
            log(f"report: not updated ({self.error})")

    def build_until_current(self) -> None:
        import time

        while True:
            with self.lock:
                if self.wanted is None:
                    self.thread = None
                    return
                wait = self.next_live - time.monotonic()
                if self.wanted == "live" and wait > 0:
                    self.asked.wait(timeout=wait)
                    continue
                final, self.wanted = self.wanted == "final", None
            began = time.monotonic()
            self.build(final)
            self.next_live = began + max(self.LIVE_PAUSE_S, 4 * (time.monotonic() - began))

    def __call__(self, final: bool = False) -> None:
        import threading

        with self.lock:
            self.wanted = "final" if final or self.wanted == "final" else "live"
            self.asked.notify_all()
            if self.thread is None:
                self.thread = threading.Thread(target=self.build_until_current, name="fika-report", daemon=True)
                self.thread.start()

    def final(self) -> None:
        self(final=True)

    def finish(self) -> None:
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join()

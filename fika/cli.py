"""The `fika` command: one entry point, a subcommand per job; heavy imports live inside the commands.

  fika data    [--config FILE.yaml] [key=value ...] [--json] [--show N]       build and describe the data mix
  fika train   [--config FILE.yaml] [key=value ...] [--overwrite] [--dry-run]  one trial, or a full run
  fika train   --resume OUTPUT_DIR                                             continue a killed full run
  fika search  SPEC [key=value ...] [--address auto] [--resume] [--dry-run]    many trials (SPEC: a file or demo, smoke, ...)
  fika confirm RUN_DIR [--top K | --trials ID ...] [--seeds S] [--steps N]      re-run the best trials: seeds, horizon
  fika report  RUN_DIR [--out DIR]                                             the ranked report of a search
  fika space   [export] [--adapter DIR] [--report DIR] [--out DIR]             the FIKA Assistant Gradio app
  fika push    ADAPTER_DIR --repo USER/NAME [--dry-run]                        publish an adapter with a model card

With no --config every command uses the embedded default (fika/default.yaml): the built-in SmolLM2 and
ShareGPT data, offline, sized for a CPU. Bad input prints one line per problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

from fika.common import (
    FikaError,
    Terminated,
    check_reporting,
    exclusive_folder,
    interruption,
    log,
    read_json,
    stop_signals_handled,
)


class Parser(argparse.ArgumentParser):
    """argparse with one line per error (`fika train: error: ...`), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def whole(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f"{low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is not allowed: give {allowed}")
        return value

    return parse


def cmd_data(args: argparse.Namespace) -> None:
    from fika.config import load_config
    from fika.data import format_sources_table, prepare_data, render_masked
    from fika.model import load_tokenizer
    from fika.sources import resolve_local_paths

    config = load_config(args.config, args.overrides)
    config = config.model_copy(update={"data": resolve_local_paths(config.data)})
    tokenizer = load_tokenizer(config.model)
    mix = prepare_data(config.data, tokenizer, config.model.max_seq_length, rebuild=args.rebuild)
    summary = mix.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(format_sources_table(summary))
    for s in summary["sources"]:
        extra = f"repaired {s['repaired']:,}, truncated to {config.model.max_seq_length} tokens {s['truncated']:,}"
        print(f"{s['name']} ({s['path']}): {extra}" + (f"; {s['note']}" if s["note"] else ""))
    eval_text = ", ".join(f"{name} {n}" for name, n in summary["eval_per_source"].items())
    print(f"train {summary['train_rows']:,} conversations ({summary['train_tokens']:,} tokens), "
          f"eval {summary['eval_rows']:,} ({eval_text}); mix {summary['fingerprint']}")  # fmt: skip
    for i in range(min(args.show, len(mix.train))):
        row = mix.train[i]
        print(f"\n--- example {i} (trained-on tokens in [[ ]]) ---")
        print(render_masked(tokenizer, row["input_ids"], row["labels"]))


def time_estimate(config_path: str | None, max_steps: int) -> str:
    """How long `max_steps` take, from the seconds per step a search measured for this config (its report)."""
    report = read_json(Path(config_path).parent / "report.json") if config_path else None
    best = (report or {}).get("best") or {}
    if not best.get("seconds_per_step"):
        return "time: estimated after the first steps"
    seconds = max_steps * best["seconds_per_step"]
    return (f"time: about {seconds / 60:.0f} min of training plus evals, at the {best['seconds_per_step']:.2f} s/step "
            f"search '{report.get('name')}' measured on {best.get('device', '?')}")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from fika.config import load_config
    from fika.trial import check_output_dir, complete_checkpoints, format_result, load_result

    if args.resume:
        if args.config or args.overrides:
            raise FikaError("--resume DIR continues a run with its own config.yaml; give no --config or overrides")
        out = Path(args.resume).expanduser()
        check_output_dir(out, resume=True)
        ended = load_result(out)
        if ended is not None and ended.status in ("completed", "diverged"):  # what it would train is there
            log(f"train: {out} holds a run that ended ({ended.status}); nothing to resume (`fika train --config "
                f"{out / 'config.yaml'} --overwrite` runs it again)")  # fmt: skip
            print(format_result(ended))
            return 0 if ended.status == "completed" else 1
        config = load_config(out / "config.yaml")  # its output.dir may be relative to where the run started
        config = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(out)})})
        if not args.dry_run and not complete_checkpoints(out / "checkpoints"):
            log(f"train: {out} has no complete checkpoint: the run starts again from step 0")
    else:
        config = load_config(args.config, args.overrides)
        out = Path(config.output.dir).expanduser()
        check_output_dir(out, overwrite=args.overwrite)
    from fika.model import check_target_modules, empty_model
    from fika.sources import resolve_local_paths

    problem = check_target_modules(empty_model(config.model), config.lora.target_modules)
    if problem:
        raise FikaError(f"lora.target_modules: {problem}")
    config = config.model_copy(update={"data": resolve_local_paths(config.data)})
    check_reporting("train.report_to", config.train.report_to)
    if args.dry_run:
        from fika.memory import estimate_memory
        from fika.model import device_kind

        print(f"config valid; memory: {estimate_memory(config, device_kind()).describe()}")
        return 0
    from tqdm.auto import tqdm

    from fika.trial import run_trial

    bar = tqdm(total=None, unit="step", disable=None)
    started: dict = {}
    stop = StopAfterStep()

    def on_start(max_steps: int) -> None:
        import time

        stop.training = True
        bar.total = max_steps
        started["at"] = time.perf_counter()
        log(f"train: {max_steps:,} steps of {config.train.batch_size} x {config.train.gradient_accumulation} "
            f"conversations into {out}; {time_estimate(args.config, max_steps)}")  # fmt: skip

    def report(record: dict) -> None:
        bar.update(record["step"] - bar.n)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", avg10=f"{record['train_loss_smooth']:.4f}")
        if record["step"] == 5 and "at" in started and bar.total:
            import time

            pace = (time.perf_counter() - started["at"]) / 5
            log(f"train: {pace:.2f} s/step over the first 5 steps: about {pace * bar.total / 60:.0f} min in all")
        if "eval_loss" in record or (bar.disable and record["step"] % 10 == 0):
            line = f"step {record['step']}/{record['max_steps']}: train loss {record['train_loss']:.4f} "
            line += f"(avg10 {record['train_loss_smooth']:.4f}), lr {record['learning_rate']:.2e}"
            line += f", eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            bar.write(line, file=sys.stderr)

    with stop_signals_handled(stop):
        result = run_trial(config, report, resume=bool(args.resume), on_start=on_start, overwrite=args.overwrite,
                           interrupted=stop.requested)  # fmt: skip
    bar.close()
    print(format_result(result))
    if result.status == "interrupted":
        if config.train.checkpoints:
            then = f"its checkpoint of step {result.steps} is saved, and `fika train --resume {out}` continues it"
        else:
            then = "train.checkpoints is off, so `fika train --resume` would start it again from step 0"
        log(f"train: stopped after step {result.steps} of {result.max_steps}; {then}")
        return stop.exit_code()
    return 0 if result.status == "completed" else 1


def quiet_libraries() -> None:
    """Keeps the terminal for fika's own progress: library warnings and load bars off, errors kept."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Explicit, so that tokenizers does not warn when Ray forks; every core for tokenizing the data once
    # (workers are held to their share: fika.search.tuner.WORKER_ENV_VARS).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(torch|transformers|trl|peft)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class ReportRefresher:
    """Rebuilds a search's report (in a folder the caller has claimed), never letting a report problem stop
    the search.

    `refresh()` (Tune calls it when a trial ends) asks for a live build: the tables and the loss curves, drawn
    in a background thread so that a trial's freed slot is not held up. `refresh.final()` asks for the whole
    report, with every plot; `finish()` waits until the builds asked for are written. One build runs at a time:
    calls during it coalesce into one more (the whole report if any of them asked for it), which is skipped when
    none of the files the report reads changed since the previous build of at least that kind began. Tune
    pickles its callbacks with the experiment state: the thread, its lock and the files seen are not part of it.
    """

    def __init__(self, run: Path, out: Path):
        self.__setstate__({"run": run, "out": out})

    def __getstate__(self) -> dict:
        return {"run": self.run, "out": self.out}

    def __setstate__(self, state: dict) -> None:
        import threading

        self.run, self.out = state["run"], state["out"]
        self.lock, self.thread = threading.Lock(), None
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
        from fika.search.report import build_report

        files = self.files_read()
        if self.built_from is not None and self.built_from[0] == files and (self.built_from[1] or not final):
            return
        try:
            build_report(self.run, self.out, claimed=True, live=not final)
            self.built_from, self.error = (files, final), None
        except Exception as err:
            self.error = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"report: not updated ({self.error})")

    def build_until_current(self) -> None:
        while True:
            with self.lock:
                if self.wanted is None:
                    self.thread = None
                    return
                final, self.wanted = self.wanted == "final", None
            self.build(final)

    def __call__(self, final: bool = False) -> None:
        import threading

        with self.lock:
            self.wanted = "final" if final or self.wanted == "final" else "live"
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


def cmd_search(args: argparse.Namespace) -> int:
    from fika.search.spec import load_spec
    from fika.sources import resolve_local_paths

    spec = load_spec(args.spec, args.overrides)
    base = spec.base.model_copy(update={"data": resolve_local_paths(spec.base.data, prefix="base.data.")})
    spec = spec.model_copy(update={"base": base})
    check_reporting("trackers", spec.trackers)
    check_reporting("base.train.report_to", spec.base.train.report_to)
    if args.dry_run:
        from fika.search.plan import describe_search

        print(describe_search(spec))
        return 0
    from fika.search.progress import SearchProgress
    from fika.search.report import claim_folder, default_report_dir
    from fika.search.tuner import run_dir, run_search

    directory = run_dir(spec)
    report_dir = Path(spec.report_dir).expanduser() if spec.report_dir else default_report_dir(spec.name)
    claim_folder(report_dir, directory, (read_json(directory / "run.json") or {}).get("id", ""))
    refresh = ReportRefresher(directory, report_dir)
    progress = SearchProgress(directory, spec.num_trials(), spec.metric, spec.max_steps, on_trial_end=refresh)
    # the final report is drawn while a Ray instance the search started shuts down
    state = run_search(spec, address=args.address, resume=args.resume, callbacks=[progress], on_done=refresh.final)
    if state == "finished":
        print(f"search {spec.name}: already finished in {directory} with this spec; nothing to run")
        refresh.final()
    refresh.finish()
    if refresh.error or not (report_dir / "report.json").exists():
        raise FikaError(f"report: {report_dir} could not be written ({refresh.error or 'no build finished'}); the "
                        f"search's results are kept in {directory}, and `fika report {directory}` builds it again")  # fmt: skip
    print(f"report: {report_dir / 'index.html'} (also index.md, trials.csv, best.yaml)")
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    from fika.search.confirm import confirm_name, plan_confirm, run_confirm
    from fika.search.progress import SearchProgress
    from fika.search.report import claim_folder, default_report_dir

    run = Path(args.run_dir).expanduser()
    spec, runs = plan_confirm(run, args.top, args.seeds, args.steps, args.trials)
    out = Path(args.out).expanduser() if args.out else default_report_dir(spec.name)
    claim_folder(out, run, (read_json(run / "run.json") or {}).get("id", ""))
    with exclusive_folder(run, "", "fika confirm"):  # one driver at a time writes into a search's folder
        names = {confirm_name(r) for r in runs}
        refresh = ReportRefresher(run, out)
        progress = SearchProgress(run, len(runs), spec.metric, args.steps or spec.max_steps,
                                  on_trial_end=refresh, only=names)  # fmt: skip
        run_confirm(run, spec, runs, address=args.address, callbacks=[progress], on_done=refresh.final)
        refresh.finish()
    print(f"report: {out / 'index.html'} (seeds and horizon sections added)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fika.search.report import build_report

    out = build_report(args.run_dir, args.out)
    print(f"report: {out / 'index.md'} and {out / 'index.html'}")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    if args.action == "export":
        from fika.spaces.export import export_space

        if not args.out:
            raise FikaError("fika space export: --out DIR is required")
        out = export_space(Path(args.out), args.adapter, args.compare, args.report, args.base)
        print(f"Space written to {out}: upload the folder as a Hugging Face Space (sdk gradio), or run "
              f"`python app.py` inside it")  # fmt: skip
        if args.push:
            from fika.hub import push_folder

            print(push_folder(out, args.push, "space", dry_run=args.dry_run))
        return 0
    from fika.spaces.app import build_app

    app = build_app(args.base, args.adapter, args.compare, args.report, base_only=args.base_only,
                    trust_remote_code=args.trust_remote_code)  # fmt: skip
    app.launch(server_name=args.host, server_port=args.port)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from fika.hub import push_adapter

    print(
        push_adapter(Path(args.adapter_dir), args.repo, report=args.report, dry_run=args.dry_run, private=args.private)
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fika", description="LoRA hyperparameter search for chat LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="a TrialConfig YAML (default: the embedded CPU default)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lora.r=32")

    p = sub.add_parser("data", help="build and describe the data mix (per source: in, dropped by reason, kept)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--show", type=whole(0), default=0, metavar="N", help="print N tokenized examples")
    p.add_argument("--rebuild", action="store_true", help="ignore the cached sources and tokenize them again")
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("train", help="run one trial, or a full run (see a report's best.yaml)")
    add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output.dir")
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue a killed run from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the memory estimate; no training")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("search", help="run or resume a search: Ray Tune + Optuna over short trials")
    p.add_argument("spec", help="a search spec YAML, or the name of one that ships with fika (demo, smoke, grid, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. num_samples=4")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search from its storage folder")
    p.add_argument(
        "--dry-run", action="store_true", help="validate the spec; print trials, budget, data, memory; no Ray"
    )
    p.set_defaults(run=cmd_search)

    p = sub.add_parser("confirm", help="re-run a finished search's best trials with other seeds or more steps")
    p.add_argument("run_dir", help="the search folder, <storage>/<name> (e.g. runs/demo)")
    p.add_argument("--top", type=whole(1), default=3, metavar="K", help="how many of the best trials (default 3)")
    p.add_argument("--trials", nargs="+", metavar="ID", help="re-run these trials instead of the best K")
    p.add_argument("--seeds", type=whole(0), default=3, metavar="S", help="other seeds per trial (default 3)")
    p.add_argument("--steps", type=whole(1), metavar="N", help="also re-run each at a horizon of N steps")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT")
    p.add_argument("--out", help="the report folder to update (default: reports/<name>)")
    p.set_defaults(run=cmd_confirm)

    p = sub.add_parser("report", help="(re)build the ranked report of a search, finished or not")
    p.add_argument("run_dir", help="the search folder, <storage>/<name> (e.g. runs/demo)")
    p.add_argument("--out", help="where to write it (default: reports/<name>)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("space", help="serve the FIKA Assistant locally, or `fika space export` a Space folder")
    p.add_argument("action", nargs="?", choices=["serve", "export"], default="serve")
    p.add_argument("--adapter", help="a LoRA adapter dir (from fika train) or hub id")
    p.add_argument("--compare", help="a second adapter for the Compare tab (e.g. the baseline's)")
    p.add_argument("--base", help="the base model (default: the adapter's own, else the built-in SmolLM2)")
    p.add_argument("--base-only", action="store_true", help="serve the base model alone, without an adapter")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with a hub base model")
    p.add_argument("--report", help="a search report folder (reports/<name>) for the Leaderboard tab")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: localhost only)")
    p.add_argument("--port", type=whole(1, 65535), default=7860)
    p.add_argument("--out", help="with export: the folder to write")
    p.add_argument("--push", metavar="USER/SPACE", help="with export: upload the folder as a Hugging Face Space")
    p.add_argument("--dry-run", action="store_true", help="with --push: print what would be uploaded")
    p.set_defaults(run=cmd_space)

    p = sub.add_parser("push", help="upload an adapter to the Hugging Face Hub with a generated model card")
    p.add_argument("adapter_dir", help="an adapter folder from fika train (outputs/<run>/adapter)")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository to create or update")
    p.add_argument("--report", help="the search report the adapter came from (for the card's numbers)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="print the model card and the files; upload nothing")
    p.set_defaults(run=cmd_push)
    return parser


def raise_terminated(signum, frame) -> None:
    raise Terminated()


class StopAfterStep:
    """`fika train`'s Ctrl-C and SIGTERM: the first one during training ends the run after the step it is on
    (with a checkpoint of that step when `train.checkpoints` is on: a preempted job loses no step); a second
    one, or one before training has started, stops at once."""

    def __init__(self):
        self.training = False
        self.signal: int | None = None
        self.told = False

    def __call__(self, signum, frame) -> None:
        if self.signal is not None or not self.training:
            raise interruption(signum)
        self.signal = signum

    def requested(self) -> bool:
        """Asked by the run after each step; says once, outside the handler, that the run is stopping."""
        if self.signal is not None and not self.told:
            self.told = True
            log(f"train: {signal.Signals(self.signal).name}: stopping after this step (again to stop at once)")
        return self.signal is not None

    def exit_code(self) -> int:
        return 143 if self.signal == signal.SIGTERM else 130


def main(argv: list[str] | None = None) -> int:
    import threading

    if threading.current_thread() is not threading.main_thread():
        return run_command(argv)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return run_command(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow the flags
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.exit(2, f"fika {args.command}: error: unrecognized arguments: {' '.join(unknown or extra)}\n")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        quiet_libraries()
        code = args.run(args) or 0
    except FikaError as err:
        from fika.common import mask_secrets

        for line in str(err).splitlines():
            print(f"fika {args.command}: error: {mask_secrets(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print(f"fika {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    return code


if __name__ == "__main__":
    sys.exit(main())

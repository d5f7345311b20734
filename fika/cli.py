"""The `fika` command: one entry point, a subcommand per job; heavy imports live inside the commands.

  fika data  [--config FILE.yaml] [key=value ...] [--json] [--show N]   build and describe the data mix
  fika train [--config FILE.yaml] [key=value ...]                      one trial, or a full run
  fika search SPEC.yaml [key=value ...] [--address auto] [--resume] [--dry-run]   many trials
  fika report RUN_DIR [--out DIR]                                      the ranked report of a search
  fika space [export] [--adapter DIR] [--report DIR] [--out DIR]        the FIKA Assistant Gradio app

With no --config every command uses the embedded default (fika/default.yaml): the built-in SmolLM2 and
ShareGPT data, offline, sized for a CPU. Bad input prints one line per problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fika.config import FikaError, load_config
from fika.data import DROP_REASONS


def format_sources_table(summary: dict) -> str:
    """Per source: rows in, dropped by reason, kept, and how the kept rows split into eval / train."""
    headers = ["source", "format", "rows in", *DROP_REASONS, "kept", "eval", "train", "unused"]
    rows = []
    for s in summary["sources"]:
        rows.append(
            [s["path"], s["format"], s["rows_in"], *(s["dropped"][r] for r in DROP_REASONS)]
            + [s["kept"], s["eval"], s["train"], s["unused"]]
        )
    totals = ["total", ""] + [sum(r[i] for r in rows) for i in range(2, len(headers))]
    cells = [[f"{c:,}" if isinstance(c, int) else str(c) for c in row] for row in [*rows, totals]]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells[:-1]] + [line(["-" * w for w in widths]), line(cells[-1])]
    return "\n".join(out)


def render_masked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decodes an example with the trained-on tokens (labels != -100) wrapped in [[ ]]."""
    parts, span, trained = [], [], None
    for token, label in zip(input_ids, labels, strict=True):
        if (label != -100) != trained and span:
            text = tokenizer.decode(span)
            parts.append(f"[[{text}]]" if trained else text)
            span = []
        trained = label != -100
        span.append(token)
    if span:
        text = tokenizer.decode(span)
        parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)


def cmd_data(args: argparse.Namespace) -> None:
    from fika.data import prepare_data
    from fika.model import load_tokenizer

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model)
    mix = prepare_data(config.data, tokenizer, config.model.max_seq_length, rebuild=args.rebuild)
    summary = mix.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(format_sources_table(summary))
    for s in summary["sources"]:
        extra = [f"repaired {s['repaired']:,}", f"truncated to {config.model.max_seq_length} tokens {s['truncated']:,}"]
        print(f"{s['path']}: " + ", ".join(extra) + (f"; {s['note']}" if s["note"] else ""))
    print(
        f"train {summary['train_rows']:,} conversations ({summary['train_tokens']:,} tokens), "
        f"eval {summary['eval_rows']:,}; mix {summary['fingerprint']} "
        f"{'loaded from' if summary['from_cache'] else 'saved to'} {summary['path']}"
    )
    for i in range(min(args.show, len(mix.train))):
        row = mix.train[i]
        print(f"\n--- example {i} (trained-on tokens in [[ ]]) ---")
        print(render_masked(tokenizer, row["input_ids"], row["labels"]))


def format_result(result) -> str:
    """The summary `fika train` prints at the end of a run."""
    per_step = (result.wall_time_s - (result.time_to_first_step_s or 0)) / max(result.steps - 1, 1)
    evals = ", ".join(f"{step}: {loss:.4f}" for step, loss in sorted(result.eval_losses.items())) or "none"
    lines = [
        f"status      {result.status}" + (f" ({result.error})" if result.error else ""),
        f"steps       {result.steps}/{result.max_steps} on {result.device}",
        f"train loss  {result.train_loss:.4f} (mean of the last 10 steps {result.train_loss_smooth:.4f})"
        if result.train_loss is not None
        else "train loss  none",
        f"eval loss   {evals}",
        f"tokens seen {result.tokens_seen:,}",
        f"time        {result.wall_time_s:.1f} s, first step after {result.time_to_first_step_s or 0:.1f} s, "
        f"then {per_step:.2f} s/step",
        f"peak memory {result.peak_memory_mb:,.0f} MB ({result.memory_kind})",
        f"parameters  {result.trainable_params:,} trainable of {result.total_params:,}",
        f"outputs     {result.output_dir}" + (f" (adapter: {result.adapter_dir})" if result.adapter_dir else ""),
    ]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fika.trial import run_trial

    config = load_config(args.config, args.overrides)
    bar = tqdm(total=config.train.max_steps if config.train.max_steps > 0 else None, unit="step", disable=None)

    def report(record: dict) -> None:
        bar.total = record["max_steps"] or bar.total
        bar.update(record["step"] - bar.n)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", avg10=f"{record['train_loss_smooth']:.4f}")
        if "eval_loss" in record or (bar.disable and record["step"] % 10 == 0):
            line = f"step {record['step']}/{record['max_steps']}: train loss {record['train_loss']:.4f} "
            line += f"(avg10 {record['train_loss_smooth']:.4f}), lr {record['learning_rate']:.2e}"
            line += f", eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            bar.write(line, file=sys.stderr)

    result = run_trial(config, report)
    bar.close()
    print(format_result(result))
    return 0 if result.status == "completed" else 1


def quiet_libraries() -> None:
    """Keeps the terminal for fika's own progress: library warnings and load bars off, errors kept."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(torch|transformers|trl|peft)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cmd_search(args: argparse.Namespace) -> int:
    from search.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.dry_run:
        print(describe_search(spec))
        return 0
    from search.progress import SearchProgress
    from search.report import build_report
    from search.tuner import run_confirm, run_dir, run_search

    directory = run_dir(spec)
    report_dir = Path(spec.report_dir or Path("reports") / spec.name)

    def refresh_report() -> None:  # after every trial: a running search always has an up-to-date report
        try:
            build_report(directory, report_dir)
        except Exception as err:  # a report problem must never stop the search
            print(f"report: not updated ({type(err).__name__}: {err})", file=sys.stderr)

    print(f"search {spec.name}: {spec.num_trials()} trials of {spec.max_steps} steps; results in {directory}")
    progress = SearchProgress(spec.num_trials(), spec.metric, spec.max_steps, on_trial_end=refresh_report)
    if args.resume:  # count what ended before the interruption
        for path in (directory / "trials").glob("*/result.json"):
            status = json.loads(path.read_text())["status"]
            progress.ended[path.parent.name] = {"stopped": "pruned"}.get(status, status)
    run_search(spec, address=args.address, resume=args.resume, callbacks=[progress])
    if args.confirm_top:
        confirm = SearchProgress(
            args.confirm_top * args.seeds, spec.metric, spec.max_steps, on_trial_end=refresh_report
        )
        run_confirm(spec, args.confirm_top, args.seeds, callbacks=[confirm])
    refresh_report()
    print(f"report: {report_dir / 'index.html'} (also index.md, trials.csv, best.yaml)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from search.report import build_report

    out = build_report(args.run_dir, args.out)
    print(f"report: {out / 'index.md'} and {out / 'index.html'}")
    return 0


def space_app_path() -> Path:
    path = Path(__file__).resolve().parents[1] / "spaces" / "app.py"
    if not path.exists():
        raise FikaError(f"fika space needs the spaces/ folder of a fika checkout (not found at {path.parent})")
    return path


def cmd_space(args: argparse.Namespace) -> int:
    if args.action == "export":
        from fika.space_export import export_space

        if not args.out:
            raise FikaError("fika space export: --out DIR is required")
        out = export_space(space_app_path().parent, Path(args.out), args.adapter, args.compare, args.report, args.base)
        print(f"Space written to {out}: upload the folder as a Hugging Face Space (sdk gradio), or run "
              f"`python app.py` inside it")  # fmt: skip
        return 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("fika_space_app", space_app_path())
    app_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_module)
    app = app_module.build_app(args.base, args.adapter, args.compare, args.report)
    app.launch(server_name=args.host, server_port=args.port)
    return 0


def describe_search(spec) -> str:
    """What a search will run and cost, without starting Ray (`fika search --dry-run`)."""
    t = spec.base.train
    tokens = spec.max_steps * t.batch_size * t.gradient_accumulation * spec.base.model.max_seq_length
    lines = [
        f"search {spec.name}: {spec.searcher} searcher, {spec.num_trials()} trials, metric {spec.metric}",
        f"space: {', '.join(f'{k} {v.model_dump(exclude_none=True)}' for k, v in spec.space.items())}",
        f"each trial: {spec.max_steps} steps of {t.batch_size} x {t.gradient_accumulation} conversations, "
        f"at most {tokens:,} tokens (base settings); eval at steps {spec.eval_steps()}",
        f"scheduler: {spec.scheduler.kind}" + (f", rungs at steps {spec.rungs()}" if spec.rungs() else ""),
        f"budget: at most {spec.num_trials() * spec.max_steps:,} trial-steps, {spec.num_trials() * tokens:,} tokens; "
        f"{spec.resources.cpu:g} CPU + {spec.resources.gpu:g} GPU per trial"
        + (f", {spec.max_concurrent} at once" if spec.max_concurrent else ""),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fika", description="LoRA hyperparameter search for chat LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="a TrialConfig YAML (default: the embedded CPU default)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lora.r=32")

    p = sub.add_parser("data", help="build and describe the data mix (per source: in, dropped by reason, kept)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--show", type=int, default=0, metavar="N", help="print N tokenized examples, trained-on tokens marked"
    )
    p.add_argument("--rebuild", action="store_true", help="ignore the cached mix and build it again")
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("train", help="run one trial, or a full run (train.max_steps=-1 train.epochs=3)")
    add_config_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("search", help="run or resume a search: Ray Tune + Optuna over short trials")
    p.add_argument("spec", help="a search spec YAML (search/specs/demo.yaml is the embedded CPU default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. num_samples=4")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search from its storage folder")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and print trials and budget; no Ray")
    p.add_argument(
        "--confirm-top", type=int, default=0, metavar="K", help="then re-run the K best trials with other seeds"
    )
    p.add_argument("--seeds", type=int, default=3, metavar="S", help="seeds per re-run trial (with --confirm-top)")
    p.set_defaults(run=cmd_search)

    p = sub.add_parser("report", help="(re)build the ranked report of a search, finished or not")
    p.add_argument("run_dir", help="the search folder, <storage>/<name> (e.g. runs/demo)")
    p.add_argument("--out", help="where to write it (default: reports/<name>)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("space", help="serve the FIKA Assistant locally, or `fika space export` a Space folder")
    p.add_argument("action", nargs="?", choices=["serve", "export"], default="serve")
    p.add_argument("--adapter", help="a LoRA adapter dir (from fika train) or hub id")
    p.add_argument("--compare", help="a second adapter for the Compare tab (e.g. the baseline's)")
    p.add_argument("--base", help="the base model (default: the adapter's own, else the built-in SmolLM2)")
    p.add_argument("--report", help="a search report folder (reports/<name>) for the Leaderboard tab")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out", help="with export: the folder to write")
    p.set_defaults(run=cmd_space)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow the flags
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        quiet_libraries()
        code = args.run(args) or 0
    except FikaError as err:
        for line in str(err).splitlines():
            print(f"fika {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fika {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

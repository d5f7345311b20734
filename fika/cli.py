"""The `fika` command: one entry point, a subcommand per job, each a thin layer over fika's Python API
(`fika.train`, `fika.data_mix`, `fika.search.run`, ...); heavy imports live inside the commands.

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
import json
import signal
import sys
from pathlib import Path

from fika.errors import FikaError
from fika.stopping import Terminated, exit_code


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
    from fika.api import data_mix, trial_config
    from fika.data import format_sources_table, render_masked

    mix = data_mix(args.config, args.overrides, rebuild=args.rebuild)
    summary = mix.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    max_length = trial_config(args.config, args.overrides).model.max_seq_length
    print(format_sources_table(summary))
    for s in summary["sources"]:
        extra = f"repaired {s['repaired']:,}, truncated to {max_length} tokens {s['truncated']:,}"
        print(f"{s['name']} ({s['path']}): {extra}" + (f"; {s['note']}" if s["note"] else ""))
    eval_text = ", ".join(f"{name} {n}" for name, n in summary["eval_per_source"].items())
    print(
        f"train {summary['train_rows']:,} conversations ({summary['train_tokens']:,} tokens), "
        f"eval {summary['eval_rows']:,} ({eval_text}); mix {summary['fingerprint']}"
    )
    if args.show:
        from fika.model import load_tokenizer

        tokenizer = load_tokenizer(trial_config(args.config, args.overrides).model)
        for i in range(min(args.show, len(mix.train))):
            row = mix.train[i]
            print(f"\n--- example {i} (trained-on tokens in [[ ]]) ---")
            print(render_masked(tokenizer, row["input_ids"], row["labels"]))


def cmd_train(args: argparse.Namespace) -> int:
    import fika
    from fika.result import format_result

    output_dir = args.resume
    if args.dry_run:
        from fika.api import plan_train
        from fika.memory import estimate_memory
        from fika.model import device_kind

        config = plan_train(args.config, args.overrides, output_dir, bool(args.resume), args.overwrite)
        print(f"config valid; memory: {estimate_memory(config, device_kind()).describe()}")
        return 0
    result = fika.train(args.config, args.overrides, output_dir, resume=bool(args.resume), overwrite=args.overwrite)
    print(format_result(result))
    if result.status == "interrupted":
        return exit_code(result.stopped_by)
    return 0 if result.status == "completed" else 1


def quiet_libraries() -> None:
    """Keeps the terminal for fika's own progress: library warnings and load bars off, errors kept."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Explicit, so that tokenizers does not warn when Ray forks; every core for tokenizing the data once
    # (workers are held to their share: fika.search.ray_session.WORKER_ENV_VARS).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(torch|transformers|trl|peft)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cmd_search(args: argparse.Namespace) -> int:
    import fika.search

    overrides = [*args.overrides, *([f"warm_start={json.dumps(args.warm_start)}"] if args.warm_start else [])]
    if args.dry_run:
        print(fika.search.dry_run(args.spec, overrides, args.resume, address=args.address))
        return 0
    result = fika.search.run(args.spec, overrides, resume=args.resume, address=args.address)
    print(f"report: {result.report_dir / 'index.html'} (also index.md, trials.csv, best.yaml)")
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    import fika.search

    result = fika.search.confirm(
        args.run_dir, args.top, args.seeds, args.steps, args.trials, address=args.address, out=args.out
    )
    print(f"report: {result.report_dir / 'index.html'} (seeds and horizon sections added)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import fika.search

    out = fika.search.build_report(args.run_dir, args.out)
    print(f"report: {out / 'index.md'} and {out / 'index.html'}")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    if args.action == "export":
        from fika.spaces.export import export_space

        if not args.out:
            raise FikaError("fika space export: --out DIR is required")
        out = export_space(Path(args.out), args.adapter, args.compare, args.report, args.base)
        print(
            f"Space written to {out}: upload the folder as a Hugging Face Space (sdk gradio), or run "
            f"`python app.py` inside it"
        )
        if args.push:
            from fika.publish import push_folder

            print(push_folder(out, args.push, "space", dry_run=args.dry_run))
        return 0
    from fika.spaces.app import build_app

    app = build_app(
        args.base,
        args.adapter,
        args.compare,
        args.report,
        base_only=args.base_only,
        trust_remote_code=args.trust_remote_code,
    )
    app.launch(server_name=args.host, server_port=args.port)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from fika.publish import push_adapter

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
    p.add_argument("--warm-start", nargs="+", metavar="RUN_DIR", help="start from earlier searches (spec: warm_start)")
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
        from fika.masking import mask_secrets

        for line in str(err).splitlines():
            print(f"fika {args.command}: error: {mask_secrets(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"fika {args.command}: {'terminated' if isinstance(err, Terminated) else 'interrupted'}", file=sys.stderr)
        return exit_code(err)
    return code


if __name__ == "__main__":
    sys.exit(main())

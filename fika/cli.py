"""The `fika` command: one entry point, a subcommand per job; heavy imports live inside the commands.

  fika data  [--config FILE.yaml] [key=value ...] [--json] [--show N]   build and describe the data mix

With no --config every command uses the embedded default (fika/default.yaml): the built-in SmolLM2 and
ShareGPT data, offline, sized for a CPU. Bad input prints one line per problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from fika.config import FikaError, TrialConfig, load_config
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


def cmd_data(args: argparse.Namespace, config: TrialConfig) -> None:
    from fika.data import prepare_data
    from fika.model import load_tokenizer

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        args.run(args, config)
    except FikaError as err:
        for line in str(err).splitlines():
            print(f"fika {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fika {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

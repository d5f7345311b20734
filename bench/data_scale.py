"""Times preparing a large data mix as a new user would, and prints a table: wall time, rows/s, tokens/s and the
peak RSS of the whole process tree (fika and its tokenizing processes).

  python bench/data_scale.py                              # 10,000 / 50,000 / 150,000 rows at length 2048
  python bench/data_scale.py --rows 20000 --workers 1     # one process tokenizes (FIKA_DATA_WORKERS=1)

For each size it writes N ShareGPT-schema rows (one JSON object a line) made from the built-in ShareGPT records
(17,671 of them; pass k > 0 over them puts `(k) ` before each human turn, so that repeats stay distinct
conversations), then runs, with an empty fika cache and an empty `datasets` cache:

  fika data 'data.sources=[{path: FILE}]' model.max_seq_length=2048 --json

The RSS of the process tree is its processes' resident memory summed, sampled every 0.1 s (pages two processes
share count twice, so this is an upper bound of what the tree holds). `CPU s` is the user and system time of the
command and the processes it waited for; `load` is the machine's mean 1-minute load average during the run (on a
machine that others share, wall time / (CPU s / cores) says how much of it they took).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fika.sources import builtin_sharegpt_path, read_sharegpt_v3


def write_rows(path: Path, count: int) -> None:
    """`count` ShareGPT-schema rows from the built-in records, pass k > 0 marked `(k) ` in every human turn."""
    records, _ = read_sharegpt_v3(builtin_sharegpt_path())
    with open(path, "w") as out:
        for i in range(count):
            rank, record = divmod(i, len(records))
            turns = [dict(turn) for turn in records[record].get("conversations") or []]
            for turn in turns:
                if rank and turn.get("from") == "human" and isinstance(turn.get("value"), str):
                    turn["value"] = f"({rank}) {turn['value']}"
            row = {"id": f"{records[record].get('id')}-{rank}", "conversations": turns}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def tree_rss(pid: int) -> int:
    """The resident memory of a process and all its descendants, in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


def run_measured(command: list[str], env: dict) -> dict:
    """Runs a command: its wall time, CPU time, the peak RSS of its process tree, the mean load, its output."""
    import resource

    began, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=sys.stderr)
        peak, loads = 0, []
        while process.poll() is None:
            peak = max(peak, tree_rss(process.pid))
            loads.append(os.getloadavg()[0])
            time.sleep(0.1)
        wall = time.perf_counter() - began
        out.seek(0)
        text = out.read()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    return {"wall": wall, "cpu": cpu, "peak": peak, "load": sum(loads) / max(len(loads), 1), "out": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000, 150_000])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--workers", type=int, help="FIKA_DATA_WORKERS (default: every CPU)")
    parser.add_argument("--keep", type=Path, help="a folder to keep the data files in (default: a temporary one)")
    args = parser.parse_args()
    fika = str(Path(sys.executable).with_name("fika"))
    folder = args.keep or Path(tempfile.mkdtemp(prefix="fika-data-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"CPUs {os.cpu_count()}, workers {args.workers or 'all'}, length {args.length}", flush=True)
    print(
        "| rows | wall s | rows/s | training rows | training tokens | tokens/s | peak RSS GB | cache GB | CPU s | load |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for count in args.rows:
        data = folder / f"sharegpt-{count}.jsonl"
        if not data.exists():
            write_rows(data, count)
        cache = Path(tempfile.mkdtemp(prefix="fika-cache-", dir=folder))
        env = {**os.environ, "FIKA_CACHE": str(cache), "HF_DATASETS_CACHE": str(cache / "datasets")}
        if args.workers:
            env["FIKA_DATA_WORKERS"] = str(args.workers)
        model = Path(os.environ.get("FIKA_CACHE", Path.home() / ".cache" / "fika")) / "models"
        if model.is_dir():  # the converted built-in tokenizer, so that its one-time conversion is not timed
            shutil.copytree(model, cache / "models")
        command = [fika, "data", f"data.sources=[{{path: {data}}}]", f"model.max_seq_length={args.length}", "--json"]
        run = run_measured(command, env)
        summary, wall = json.loads(run["out"]), run["wall"]
        tokens = summary["train_tokens"]
        size = sum(f.stat().st_size for f in (cache / "data").rglob("*") if f.is_file())
        print(
            f"| {count:,} | {wall:.0f} | {count / wall:,.0f} | {summary['train_rows']:,} | {tokens:,} | "
            f"{tokens / wall:,.0f} | {run['peak'] / 1e9:.2f} | {size / 1e9:.2f} | {run['cpu']:.0f} | {run['load']:.1f} |",
            flush=True,
        )
        shutil.rmtree(cache, ignore_errors=True)
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A run's output folder: what a run writes there, and when fika may write into a folder at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fika.errors import FikaError
from fika.result import load_result

OUTPUT_FILES = ("config.yaml", "data.json", "metrics.jsonl", "evals.jsonl", "result.json")
OUTPUT_DIRS = ("adapter", "merged", "checkpoints", "trainer", "tracking")


def holds_a_run(out: Path) -> bool:
    """Whether `out` is the folder of a fika run: its config.yaml is a run's resolved config (every section)."""
    import yaml

    try:
        config = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and {"model", "lora", "train", "data", "output"} <= config.keys()


def check_output_dir(out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuses to write into a file, or into the folder of an earlier run unless asked to (`--overwrite`)."""
    if out.exists() and not out.is_dir():
        raise FikaError(f"output.dir: {str(out)!r} is a file; give a folder")
    earlier = [name for name in OUTPUT_FILES + OUTPUT_DIRS if (out / name).exists()]
    if resume:
        if not (out / "config.yaml").exists():
            raise FikaError(f"--resume: {str(out)!r} holds no run to resume (no config.yaml)")
        return
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if others and not holds_a_run(out):  # --overwrite would delete files that are not a run's
        listed = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise FikaError(
            f"output.dir: {str(out)!r} is not empty and holds no fika run (it holds {listed}); give a new "
            "or empty folder"
        )
    if earlier and not overwrite:
        result = load_result(out)
        what = f"{'an' if result.status[0] in 'aeiou' else 'a'} {result.status} run" if result else "an unfinished run"
        raise FikaError(
            f"output.dir: {str(out)!r} already holds {what}; pass --overwrite to replace it, --resume to continue "
            "it, or choose another output.dir"
        )
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise FikaError(f"output.dir: {str(out)!r} cannot be written (no permission on {parent})")


def clear_outputs(out: Path) -> None:
    """Removes what an earlier run wrote into `out` (for `--overwrite`); other files stay."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)

"""fika installed as a wheel into a fresh virtualenv, used from outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_and_works_outside_the_repository(tmp_path, tiny_adapter):
    """Needs the package registry (as `make install` does): the wheel's dependencies are installed from it."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)], check=True, capture_output=True
    )
    (wheel,) = dist.glob("fika-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = [
        str(venv / "bin" / "pip"),
        "install",
        "-q",
        "-c",
        str(REPO / "constraints" / "cpu.txt"),
        f"{wheel}[space]",
    ]
    subprocess.run(install, check=True)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "FIKA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], cwd=away, env=env, capture_output=True, text=True, timeout=300)

    fika = str(venv / "bin" / "fika")
    assert run(fika, "--help").returncode == 0
    dry = run(fika, "search", "smoke", "--dry-run")
    assert dry.returncode == 0 and "search smoke: optuna searcher, 8 trials" in dry.stdout, dry.stderr
    python = str(venv / "bin" / "python")
    assert run(python, "-c", "import search").returncode != 0  # no generic top-level name is installed
    imported = run(
        python, "-c", "import fika.search.driver, fika.spaces.app, fika.spaces.export; print(fika.spaces.app.__file__)"
    )
    assert imported.returncode == 0 and str(venv) in imported.stdout, imported.stderr
    exported = run(fika, "space", "export", "--adapter", str(tiny_adapter), "--out", "space")
    assert exported.returncode == 0, exported.stderr
    assert {p.name for p in (away / "space").iterdir()} >= {
        "app.py",
        "requirements.txt",
        "README.md",
        "fika",
        "adapter",
    }
    specs = run(
        python, "-c", "from fika.search.spec import SPECS_DIR; print(sorted(p.name for p in SPECS_DIR.glob('*.yaml')))"
    )
    assert "'demo.yaml'" in specs.stdout and "'grid.yaml'" in specs.stdout


def test_the_code_keeps_its_shape():
    """Small files with one job each: no module of fika/, search/ or spaces/ over 450 lines, no function over 80,
    the formatter's layout everywhere (under 15 `fmt: skip` markers), and fika/ never imports Ray, search/ or
    spaces/ (but the command line, which is all of them)."""
    import ast

    problems, skips = [], 0
    for folder in ("fika", "search", "spaces"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            skips += text.count("# fmt: skip")
            name = path.relative_to(REPO)
            if len(text.splitlines()) > 450:
                problems.append(f"{name}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                length = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length > 80:
                    problems.append(f"{name}:{node.lineno} {node.name}: {length} lines")
                if folder == "fika" and path.name != "cli.py" and isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if any(n.split(".")[0] == "ray" or n.startswith(("fika.search", "fika.spaces")) for n in names):
                        problems.append(f"{name}:{node.lineno} imports {names}")
    assert problems == [] and skips < 15

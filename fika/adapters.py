"""LoRA adapters fika serves or ships: what a folder must hold, which base model an adapter was trained on, and
whether it fits a base model (checked from the base's config and the adapter's tensor shapes, no weights loaded),
so that `fika space` and `fika space export` refuse the same adapters, before anything is loaded or written."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fika.config import ModelConfig
from fika.errors import FikaError, first_line


def not_an_adapter(path: Path | str) -> str:
    """Why a folder is not a LoRA adapter, pointing at the adapter inside it when it is a run's folder."""
    inner = Path(path).expanduser() / "adapter"
    hint = f"; the run's adapter is {Path(path) / 'adapter'}" if (inner / "adapter_config.json").exists() else ""
    return f"{path} is not a LoRA adapter folder (no adapter_config.json){hint}"


def check_adapter(flag: str, path: str | None) -> None:
    """Refuses an adapter that is neither a folder holding adapter_config.json nor a hub id (USER/NAME)."""
    if path is None:
        return
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "adapter_config.json").exists():
            raise FikaError(f"{flag}: {not_an_adapter(path)}")
        return
    if folder.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith((".", "/", "~")):
        raise FikaError(
            f"{flag}: {path} not found (give an adapter folder from `fika train`, a hub id, or --base-only to chat "
            "with the base model alone)"
        )


def adapter_model_config(flag: str, adapter: str | None) -> ModelConfig | None:
    """Which base model and chat template an adapter was trained with (the `model` section of its fika.yaml).

    The adapter's file is somebody else's: it may name a model and a template, never turn on remote code.
    """
    path = Path(adapter).expanduser() / "fika.yaml" if adapter else None
    if path is None or not path.exists():
        return None
    try:
        section = (yaml.safe_load(path.read_text()) or {}).get("model")
        if not isinstance(section, dict):
            raise ValueError("it has no `model` section")
        section = {k: v for k, v in section.items() if k in ("name", "revision", "max_seq_length", "chat_template")}
        return ModelConfig.model_validate(section)
    except Exception as err:  # a broken or foreign fika.yaml is the adapter's problem, named in one line
        raise FikaError(f"{flag}: {path} cannot be read: {first_line(err, 200)}") from None


def served_model_config(
    base: str | None, adapter: str | None, compare: str | None, trust_remote_code: bool = False
) -> ModelConfig:
    """The base model a Space serves: `base` when given, else the one the adapters were trained on (else the
    built-in SmolLM2), with the chat template they were trained with; each adapter checked (`check_adapter`)."""
    check_adapter("--adapter", adapter)
    check_adapter("--compare", compare)
    trained = adapter_model_config("--adapter", adapter) or adapter_model_config("--compare", compare)
    config = ModelConfig(name=base) if base else (trained or ModelConfig())
    if trained is not None:
        config = config.model_copy(update={"chat_template": trained.chat_template})
    return config.model_copy(update={"trust_remote_code": trust_remote_code})


def lora_shapes(adapter: Path) -> dict[str, tuple[int, int]]:
    """(in, out) features of each module a saved peft LoRA adapter adapts, read from its tensors' shapes."""
    from safetensors import safe_open

    file = adapter / "adapter_model.safetensors"
    if not file.exists():
        return {}
    shapes: dict[str, list[int]] = {}
    with safe_open(str(file), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(A|B)\.weight", key)
            if match:
                shape = tensors.get_slice(key).get_shape()
                module = shapes.setdefault(match[1], [0, 0])
                module[0 if match[2] == "A" else 1] = shape[1] if match[2] == "A" else shape[0]
    return {name: (i, o) for name, (i, o) in shapes.items()}


def check_adapter_fits(config: ModelConfig, flag: str, adapter: str | None) -> None:
    """Refuses a local adapter whose LoRA layers do not fit the base model: a module it adapts is missing there, or
    has other in/out features (an adapter trained on another model)."""
    if adapter is None or not Path(adapter).expanduser().is_dir():
        return
    from fika.model import empty_model

    model = empty_model(config)
    linear = {name: (m.in_features, m.out_features) for name, m in model.named_modules() if hasattr(m, "in_features")}
    for name, shape in lora_shapes(Path(adapter).expanduser()).items():
        if linear.get(name) != shape:
            there = "is missing there" if name not in linear else f"is {linear[name][0]} x {linear[name][1]} there"
            raise FikaError(
                f"{flag}: {adapter} does not fit the base model {config.name!r}: its layer {name} ({shape[0]} x "
                f"{shape[1]}) {there}; serve it on the model it was trained on (leave out --base)"
            )


def check_served(base: str | None, adapter: str | None, compare: str | None, trust_remote_code: bool = False):
    """Every check `fika space` makes before it loads anything, and `fika space export` before it writes anything:
    the adapters, the base model (a known name, a folder, or a hub id that can be reached or is cached), and that
    each local adapter fits it. Returns the base model's config."""
    from fika.model import resolve_model_path

    config = served_model_config(base, adapter, compare, trust_remote_code)
    resolve_model_path(config, weights=False)
    check_adapter_fits(config, "--adapter", adapter)
    check_adapter_fits(config, "--compare", compare)
    return config

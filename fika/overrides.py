"""Dotted `key=value` overrides (`lora.r=32`, `data.sources.ultrachat.weight=2`), as in torchtune and trl: parsed
as YAML values and set in a nested mapping, list items by index or by a data source's name."""

from __future__ import annotations

import copy
import re
from typing import Any

from fika.errors import ConfigError, shorten
from fika.yaml_files import load_yaml_text


def source_name(path: str, name: str | None, index: int) -> str:
    """A data source's name: its `name`, else one made from its path (`mlabonne/FineTome-100k` -> finetome_100k)."""
    if name:
        return name
    stem = path.removeprefix("builtin:").rstrip("/").split("/")[-1]
    stem = re.sub(r"\.(jsonl?|parquet)(\.gz)?$", "", stem.lower())
    slug = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")
    return slug if slug and slug[0].isalpha() else f"source{index}"


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parses `a.b.c=value` strings; values are read as YAML (`5e-4`, `true`, `[8, 16]`)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {shorten(item)}: expected key=value with a dotted key, e.g. lora.r=32")
        parsed.append((key, load_yaml_text(value, f"override {shorten(item)}") if value else None))
    return parsed


def list_index(node: list, part: str) -> int | None:
    """The index a key part names in a list: a number, or the `name` of a data source (`ultrachat`)."""
    if part.isdigit():
        return int(part) if int(part) < len(node) else None
    for i, item in enumerate(node):
        if isinstance(item, dict) and source_label(item, i) == part:
            return i
    return None


def source_label(raw: dict, index: int) -> str:
    """A data source's name from its raw mapping (its `name:`, else one made from its path)."""
    path, name = raw.get("path", "builtin:sharegpt"), raw.get("name")
    if not isinstance(path, str) or not isinstance(name, (str, type(None))):
        return str(name or f"source{index}")
    return source_name(path, name, index)


def set_dotted(raw: dict, key: str, value: Any, defaults: dict | None = None) -> dict:
    """Sets a dotted key in a nested dict, creating sections; list items by index or source name.

    A section the dict lacks is created from `defaults` (the same tree of default values), so that an override
    into a default list reaches it (`data.sources.0.limit=5` on a config without `data:` edits the default
    source), else empty. A mapping whose keys hold dots (a search space: `lora.dropout`) is matched by its keys,
    longest first, and a new key in it takes the rest of the dotted key whole (`space.train.warmup_steps=...`).
    """
    parts = key.split(".")
    node: Any = raw
    i = 0
    while True:
        if isinstance(node, list):
            index: Any = list_index(node, parts[i])
            if index is None:
                names = ", ".join(source_label(s, j) if isinstance(s, dict) else str(j) for j, s in enumerate(node))
                raise ConfigError(
                    f"{key}: no list item {parts[i]!r} at {'.'.join(parts[: i + 1])} (there are {len(node)}: {names})"
                )
            i += 1
        elif isinstance(node, dict):
            j = next((j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in node), None)
            if j is None:
                j = len(parts) if any("." in str(k) for k in node) else i + 1
            index, i = ".".join(parts[i:j]), j
            if i < len(parts) and not isinstance(node.get(index), (dict, list)):
                if node.get(index) is not None:
                    raise ConfigError(f"{key}: {'.'.join(parts[:i])} is {shorten(node[index])}, not a section")
                default = get_dotted(defaults, ".".join(parts[:i])) if defaults is not None else None
                node[index] = copy.deepcopy(default) if isinstance(default, (dict, list)) else {}
        else:
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not a section")
        if i == len(parts):
            node[index] = value
            return raw
        node = node[index]


def get_dotted(tree: Any, key: str, default: Any = None) -> Any:
    """The value at a dotted key of nested dicts and lists (list items by index or source name), else `default`."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and list_index(node, part) is not None:
            node = node[list_index(node, part)]
        else:
            return default
    return node


Overrides = list[str] | dict[str, Any] | None


def apply_overrides(raw: dict, overrides: Overrides, defaults: dict | None = None) -> dict:
    """Applies overrides to a nested dict: `key=value` strings (the command line's, values read as YAML), or a
    mapping of dotted keys to values (the Python API's). `defaults`: see `set_dotted`."""
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
        bad = next((key for key, _ in pairs if not isinstance(key, str) or not key or "" in key.split(".")), None)
        if bad is not None:
            raise ConfigError(f"override {shorten(bad)}: expected a dotted key, e.g. lora.r")
    elif isinstance(overrides, (list, tuple)):
        pairs = parse_overrides([str(item) for item in overrides])
    elif overrides is None:
        pairs = []
    else:
        raise ConfigError(f"overrides: {shorten(overrides)} is not allowed: give a list of key=value strings or a dict")
    for key, value in pairs:
        set_dotted(raw, key, value, defaults)
    return raw

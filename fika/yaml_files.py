"""YAML files read strictly: a key given twice, an alias bomb, a binary or empty file is one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fika.errors import ConfigError

MAX_YAML_VALUES = 100_000  # an alias bomb expands far beyond any real config


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML would keep the later one)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, what: str) -> Any:
    """Parses YAML text strictly: duplicate keys and alias bombs are refused with one line naming `what`."""
    try:
        value = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{what} is not valid YAML: {problem}{where}") from None
    if count_values(value) > MAX_YAML_VALUES:
        raise ConfigError(f"{what}: more than {MAX_YAML_VALUES:,} values once YAML aliases are expanded")
    return value


def count_values(value: Any, budget: int = MAX_YAML_VALUES + 1) -> int:
    """How many values a parsed YAML document holds with aliases expanded (counting stops past `budget`)."""
    count, stack = 0, [value]
    while stack and count < budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


EMPTY_CONFIG = "give at least one section, or leave out --config for the embedded default"


def read_yaml(path: str | Path, empty: str = EMPTY_CONFIG) -> dict:
    """Reads a YAML mapping; a missing, binary, empty or malformed file is a ConfigError naming it (`empty`: what
    to do about an empty one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give a YAML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (a binary or UTF-16 file?)") from None
    raw = load_yaml_text(text, f"config file {str(path)!r}")
    if raw is None:
        raise ConfigError(f"config file {str(path)!r} is empty; {empty}")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(raw).__name__}")
    return raw

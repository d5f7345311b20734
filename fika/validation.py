"""pydantic's validation errors as fika's lines: one per problem, naming the dotted key, the value given (bounded)
and what is allowed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from fika.errors import shorten


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: the dotted key, the value given (bounded) and what is allowed."""
    lines = []
    unions: dict[str, list[str]] = {}  # a value that matches no member of a union: one line, every option
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not is_type_tag(p)]
        key = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "config"
        message = e["msg"].removeprefix("Value error, ")
        if len(loc) < len(e["loc"]) and e["type"] not in ("extra_forbidden", "missing", "value_error"):
            if key not in unions:
                lines.append((key, shorten(e["input"])))
            unions.setdefault(key, []).append(message[0].lower() + message[1:])
            continue
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(model, e["loc"][:-1]))
            lines.append(f"{key}: unknown key (allowed here: {allowed})")
        elif e["type"] == "missing":
            lines.append(f"{key}: required")
        elif e["type"] == "value_error":
            for line in message.splitlines():  # a model check may name several fields, one per line
                head, sep, rest = line.partition(": ")
                if sep and head.split(".")[0] in _fields_at(model, e["loc"]):
                    lines.append(f"{key + '.' if loc else prefix}{head}: {rest}")
                else:
                    lines.append(f"{key}: {line}")
        else:
            lines.append(f"{key}: {shorten(e['input'])} is not allowed: {message[0].lower()}{message[1:]}")
    text = [
        f"{line[0]}: {line[1]} is not allowed: {', or '.join(unions[line[0]])}" if isinstance(line, tuple) else line
        for line in lines
    ]
    return "\n".join(dict.fromkeys(text))


def is_type_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a type of a union (`list[str]`, `literal['auto']`, `bool`)."""
    return isinstance(part, str) and (any(c in part for c in "[(-") or part in ("bool", "int", "float", "str", "none"))


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section found at `loc` (list indices and dict keys skipped)."""
    for part in loc:
        if part in model.model_fields:
            model = _section_type(model.model_fields[part].annotation) or model
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section class inside an annotation such as `X`, `list[X]`, `dict[str, X]` or `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None

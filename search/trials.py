"""The trials a spec makes: a sampled configuration applied to the base config (paired keys, encoded choices),
the baseline's configuration, every searched value checked before Ray starts, and the data rows the search needs."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import yaml

from fika.config import TrialConfig, build_config
from fika.errors import ConfigError, shorten
from fika.overrides import get_dotted, set_dotted

if TYPE_CHECKING:
    from fika.search.spec import Param, SearchSpec


def split_key(key: str) -> list[str]:
    return [part.strip() for part in key.split(",")]


def apply_params(raw: dict, params: dict[str, Any], space: dict[str, Param]) -> dict:
    """Sets one trial's sampled params in a raw TrialConfig dict (paired keys get one value each)."""
    for key, value in params.items():
        keys = split_key(key)
        encoded = any(isinstance(c, (list, dict)) for c in (space[key].choice or [])) if key in space else False
        values = decode_choice(value) if len(keys) > 1 else [decode_choice(value) if encoded else value]
        if not isinstance(values, list) or len(values) != len(keys):
            raise ConfigError(f"space.{key}: {shorten(value)} is not allowed: give {len(keys)} values, one per key")
        for part, item in zip(keys, values, strict=True):
            set_dotted(raw, part, item)
    return raw


def encode_choice(value: Any) -> Any:
    """Searchers take scalars only: a paired value [8, 16] travels as the string '[8, 16]'."""
    return yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, (list, dict)) else value


def decode_choice(value: Any) -> Any:
    return yaml.safe_load(value) if isinstance(value, str) else value


def trial_config(
    spec: SearchSpec, params: dict[str, Any], output_dir: str, seed: int | None = None, max_steps: int | None = None
) -> TrialConfig:
    """The TrialConfig of one trial: the base config with the sampled params and the search's eval steps.

    `seed` and `max_steps` re-run a trial with another seed or another horizon (`fika confirm`).
    """
    raw = apply_params(spec.base.model_dump(mode="json"), params, spec.space)
    steps = max_steps or spec.max_steps
    evals = spec.eval_steps() if steps == spec.max_steps else sorted({min(spec.max_steps, steps), steps})
    raw["train"].update(max_steps=steps, eval_steps=evals, eval_every=None, num_evals=None, checkpoints=False)
    if seed is not None:
        raw["train"]["seed"] = seed
    raw["output"].update(dir=output_dir, save_adapter=False, save_merged=False)
    return build_config(raw)


def baseline_params(spec: SearchSpec) -> dict[str, Any] | None:
    """The base config's own values of every searched key, if each is a possible value of the space."""
    return space_values(spec, spec.base.model_dump(mode="json"))


def space_values(spec: SearchSpec, config: dict) -> dict[str, Any] | None:
    """A resolved config's values of the searched keys, encoded as the searcher takes them (a choice spelled as in
    the space); None when one of them is not a possible value of the space."""
    params = {}
    for key, param in spec.space.items():
        values = [get_dotted(config, part) for part in split_key(key)]
        value = values if len(values) > 1 else values[0]
        if param.choice is not None:
            if value not in param.choice:
                return None
            params[key] = encode_choice(param.choice[param.choice.index(value)])  # as spelled in the space
        else:
            low, high = param.uniform or param.loguniform
            if not isinstance(value, (int, float)) or not low <= value <= high:
                return None
            params[key] = value
    return params


def check_space(spec: SearchSpec) -> None:
    """Every value of every searched key, and every combination of the data keys' values, must make a valid
    TrialConfig: one line per bad key."""
    errors = []
    for key, param in spec.space.items():
        for value in param.values():
            try:
                trial_config(spec, {key: encode_choice(value)}, "x")
            except ConfigError as err:
                errors.append(f"space.{key}: {err}")
                break
    data_keys = [k for k in spec.space if k.startswith("data.") and spec.space[k].choice is not None]
    combos = itertools.islice(itertools.product(*(spec.space[k].choice for k in data_keys)), 4096)
    for combo in combos if len(data_keys) > 1 and not errors else []:
        params = {k: encode_choice(v) for k, v in zip(data_keys, combo, strict=True)}
        try:
            trial_config(spec, params, "x")
        except ConfigError as err:
            shown = ", ".join(f"{k}={shorten(v)}" for k, v in zip(data_keys, combo, strict=True))
            errors.append(f"space: the combination {shown} is not allowed: {err}")
            break
    if errors:
        raise ConfigError("\n".join(errors))


def data_needs(spec: SearchSpec) -> tuple[list[int | None], list[int | None]]:
    """How many usable rows each source cache must hold for every trial of the search (the largest limit)."""
    from fika.data import reads_needed

    configs = [spec.base]
    for key, param in spec.space.items():
        if any(part.startswith("data.") for part in split_key(key)) and param.choice is not None:
            configs += [trial_config(spec, {key: encode_choice(v)}, "x") for v in param.choice]
    needs = [reads_needed(c.data) for c in configs]

    def most(values: list[int | None]) -> int | None:
        return None if any(v is None for v in values) else max(values)

    train = [most([n[0][i] for n in needs]) for i in range(len(spec.base.data.sources))]
    evals = [most([n[1][i] for n in needs]) for i in range(len(needs[0][1]))]
    return train, evals

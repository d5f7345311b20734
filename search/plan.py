"""What a search will run and cost, known before Ray starts: trials, steps, tokens, the data each extreme of
the space would train on, and the peak memory of its largest trial (`fika search --dry-run`)."""

from __future__ import annotations

import itertools
import re

from fika.config import TrialConfig
from fika.console import say
from fika.errors import ConfigError, first_line
from fika.memory import GIB, MemoryEstimate, estimate_memory
from fika.search.spec import TOP_FIRST, SearchSpec, top_first_key
from fika.search.trials import encode_choice, split_key, trial_config

GPU_SIZES_GB = (24, 40, 80)
# The estimate's largest shortfall against measured peaks on GPU model shapes it was not fitted on
# (bench/memory_estimate.py on Qwen2.5-1.5B and SmolLM2-1.7B shapes): a trial estimated this close to its
# share may still run out of memory.
ESTIMATE_LOW = 0.21
SHARED_PARTS = ("weights", "runtime")  # what the trials of a pack hold once (fika.memory's parts)
MAX_AUTO_PACK = 16  # the most trials `resources.pack: auto` puts in one pack


def largest_trial(spec: SearchSpec, device: str) -> tuple[TrialConfig, MemoryEstimate]:
    """The trial of the space with the largest estimated peak: each key at its most memory-hungry value."""
    params = {}
    for key, param in spec.space.items():
        if param.choice is None:
            continue
        scored = [
            (estimate_memory(trial_config(spec, {key: encode_choice(v)}, "x"), device).total, v) for v in param.choice
        ]
        params[key] = encode_choice(max(scored, key=lambda pair: pair[0])[1])
    config = trial_config(spec, params, "x")
    return config, estimate_memory(config, device)


def gpu_memory(spec: SearchSpec) -> float | None:
    """The memory of the GPUs trials run on: declared in the spec, or read from this machine's GPU."""
    if spec.resources.gpu_memory_gb:
        return spec.resources.gpu_memory_gb * GIB
    if spec.address is None:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory)
    return None


def pack_memory(estimate: MemoryEstimate, members: int) -> float:
    """The estimated peak of a pack of `members` such trials: the base model and the runtime once, the rest (adapter,
    optimizer, activations, loss head) once per member (their micro-batches go through the base together)."""
    shared = sum(estimate.parts.get(part, 0.0) for part in SHARED_PARTS)
    return shared + members * (estimate.total - shared)


def pack_size(spec: SearchSpec) -> int:
    """How many trials one pack trains: `resources.pack`, or for auto the most whose estimated memory (with the
    estimate's known error) fits the pack's share of the GPU; 1 on a CPU or where the GPU's memory is unknown."""
    if spec.resources.pack != "auto":
        return spec.resources.pack
    memory = gpu_memory(spec) if spec.resources.gpu > 0 else None
    if memory is None:
        return 1
    _, estimate = largest_trial(spec, "cuda")
    share = spec.resources.gpu * memory * (1 - ESTIMATE_LOW)
    fits = [k for k in range(1, MAX_AUTO_PACK + 1) if pack_memory(estimate, k) <= share]
    return fits[-1] if fits else 1


def check_memory(spec: SearchSpec) -> None:
    """Refuses a GPU search whose largest trial (or pack of them) would not fit its share of a GPU (one line, before
    Ray)."""
    memory = gpu_memory(spec) if spec.resources.gpu > 0 else None
    if memory is None:
        return
    _, estimate = largest_trial(spec, "cuda")
    members = pack_size(spec)
    need = pack_memory(estimate, members)
    what = "the largest trial" if members == 1 else f"a pack of {members} of the largest trial"
    key = "resources.gpu" if members == 1 else "resources.pack"
    value = f"{spec.resources.gpu:g}" if members == 1 else str(spec.resources.pack)
    share = spec.resources.gpu * memory
    if need > share:
        raise ConfigError(
            f"{key}: {value} is not allowed: {what} needs about {need / GIB:.1f} GiB ({estimate.describe()} per trial), "
            f"more than its share of a {memory / GIB:.0f} GiB GPU ({share / GIB:.1f} GiB); "
            + (
                "give a larger share, or lower batch_size, max_seq_length or r"
                if members == 1
                else "give a smaller pack"
            )
        )
    if need / (1 - ESTIMATE_LOW) > share:
        say(
            f"warning: {key}: {what} needs about {need / GIB:.1f} GiB by the estimate, "
            f"{need / share:.0%} of its share ({share / GIB:.1f} GiB); the estimate has been up to "
            f"{ESTIMATE_LOW:.0%} low, so it may run out of memory (lower batch_size, max_seq_length or r to be sure)"
        )


def rows_per_source(data) -> str:
    """Training rows per source as far as limits and weights tell (`all` where no limit is set)."""
    from fika.data import weighted_take

    limits = [s.limit for s in data.sources]
    weights = [s.weight for s in data.sources] if data.sources[0].weight is not None else None
    if weights is not None and None not in limits:
        takes = weighted_take(limits, weights)
        return ", ".join(f"{name} {t:,}" for name, t in zip(data.source_names(), takes, strict=True))
    shown = []
    for name, limit, weight in zip(data.source_names(), limits, weights or [None] * len(limits), strict=True):
        rows = "0" if weight == 0 else "all" if limit is None else f"{limit:,}"
        shown.append(f"{name} {rows}" + (f" (weight {weight:g})" if weight else ""))
    return ", ".join(shown)


def data_extremes(spec: SearchSpec, limit: int = 16) -> list[str]:
    """The training rows per source at each corner of the data keys' values (smallest and largest of each)."""
    keys = [
        k
        for k in spec.space
        if spec.space[k].choice
        and any(re.match(r"data\.sources\.[a-z0-9_]+\.(weight|limit)$", p) for p in split_key(k))
    ]
    lines = []
    corners = itertools.product(*(sorted({0, len(spec.space[k].choice) - 1}) for k in keys)) if keys else []
    for corner in itertools.islice(corners, limit):
        params = {k: encode_choice(spec.space[k].choice[i]) for k, i in zip(keys, corner, strict=True)}
        shown = ", ".join(f"{k}={spec.space[k].choice[i]}" for k, i in zip(keys, corner, strict=True))
        lines.append(f"  {shown}: at most {rows_per_source(trial_config(spec, params, 'x').data)} training rows")
    return lines


def resources_line(spec: SearchSpec) -> str:
    """What a trial (or a pack of trials) runs on, for the dry run."""
    at_once = f", {spec.max_concurrent} at once" if spec.max_concurrent else ""
    r = spec.resources
    members = pack_size(spec)
    if members == 1:
        alone = " (resources.pack auto: alone)" if r.pack == "auto" else ""
        return f"{r.cpu:g} CPU + {r.gpu:g} GPU per trial{alone}{at_once}"
    return (
        f"packs of {members} trials on one loaded base model (resources.pack {r.pack}), {r.cpu:g} CPU + {r.gpu:g} GPU "
        f"per pack{at_once}"
    )


def describe_search(spec: SearchSpec) -> str:
    """What a search will run and cost, without starting Ray (`fika search --dry-run`)."""
    t = spec.base.train
    tokens = spec.max_steps * t.batch_size * t.gradient_accumulation * spec.base.model.max_seq_length
    model = {"local": "a local search around the best", "optuna": "TPE", "gp": "GP"}.get(spec.searcher)
    top = " and ".join(
        words
        for name, words in TOP_FIRST.items()
        if spec.searcher == "local" and any(top_first_key(k) == name and p.choice for k, p in spec.space.items())
    )
    top = f" (at {top})" if top else ""
    drawn = f", {spec.startup()} drawn at random{top} before {model}" if model else ""
    capped = (
        f" (num_samples {spec.num_samples}, but the space holds {spec.num_trials()} configurations and none runs twice)"
        if spec.num_trials() < spec.num_samples
        else ""
    )
    lines = [
        f"search {spec.name}: {spec.searcher} searcher, {spec.num_trials()} trials{capped}{drawn}, ranked by "
        f"{spec.metric} at step {spec.max_steps}",
        f"space: {', '.join(f'{k} {v.model_dump(exclude_none=True)}' for k, v in spec.space.items())}",
        f"each trial: {spec.max_steps} steps of {t.batch_size} x {t.gradient_accumulation} conversations, "
        f"at most {tokens:,} tokens (base settings); full eval at steps {spec.eval_steps()} on "
        f"{spec.base.data.eval_size} held-out conversations",
        f"scheduler: {spec.scheduler.kind}"
        + (f", rungs at steps {spec.rungs()} on {spec.scheduler.rung_metric}" if spec.rungs() else "")
        + (
            f", each trial compared within its {', '.join(spec.compare_within())}"
            if spec.rungs() and spec.compare_within()
            else ""
        ),
        f"budget: at most {spec.num_trials() * spec.max_steps:,} trial-steps, {spec.num_trials() * tokens:,} tokens; "
        + resources_line(spec),
    ]
    if spec.confirm is not None:
        c = spec.confirm
        runs = c.top * c.seeds + (c.top if c.steps else 0)
        steps = c.top * (c.seeds * spec.max_steps + (c.steps or 0))
        lines.append(
            f"confirm: the best {c.top} re-run with {c.seeds} other seeds"
            + (f" and once at {c.steps} steps" if c.steps else "")
            + f" after the search: {runs} more trials, at most {steps:,} trial-steps "
            f"({spec.num_trials() * spec.max_steps + steps:,} in all)"
        )
    extremes = data_extremes(spec)
    if extremes:
        lines += ["data at the extremes of the space:", *extremes]
    for device in ("cuda", "cpu"):
        try:
            config, estimate = largest_trial(spec, device)
        except ConfigError as err:
            lines.append(f"memory: not estimated ({first_line(err)})")
            break
        line = f"memory of the largest trial (r {config.lora.r}, batch {config.train.batch_size}) on {device}: {estimate.describe()}"
        if device == "cuda":
            fits = ", ".join(f"{int(gb * GIB // estimate.total)} on {gb} GiB" for gb in GPU_SIZES_GB)
            line += f"; such trials per GPU: {fits}"
        lines.append(line)
    return "\n".join(lines)

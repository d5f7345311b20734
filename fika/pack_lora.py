"""LoRA layers for a pack: one frozen base linear and, per member, that member's LoRA applied to its own rows.

peft's `adapter_names=` routing serves several adapters in one batch but only for inference; training needs
each row to pass through its own trial's adapter with its own dropout, and the gradients to reach that adapter
only. A `PackedLoraLinear` runs its base layer (a `Linear`, or bitsandbytes' `Linear4bit`) once for all rows,
then, per member, `B(A(dropout(x))) * scaling` on that member's rows, cut to the member's own sequence length
(the pack pads shorter micro-batches to the longest), exactly as peft's LoRA layer computes it.

A member's adapter is made by peft itself (`get_peft_model` on the base with the pack's layers taken out, after
`set_seed(seed)`), so its initial weights, and the random numbers they consume, are those of the same trial run
alone; its modules are then moved into the pack's layers and peft's layers are removed again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Segment:
    """The rows `start:stop` of a batch belong to `member`; its own sequences end at `length` (the rest is padding
    added for the pack)."""

    member: str
    start: int
    stop: int
    length: int


@dataclass
class Routing:
    """Which rows of the batch in flight belong to which member: set by the pack before each forward pass."""

    segments: list[Segment] = field(default_factory=list)


class MemberRandom:
    """A member's random numbers, drawn as its solo run draws them from torch's global generator: seeded with its
    seed (transformers' Trainer seeds it when it is built), one 64-bit draw when each epoch's data loader starts
    (torch's DataLoader draws its base seed), and its dropout masks in forward order.

    On CUDA the masks come from a CUDA generator seeded alike (a solo run's dropout draws from CUDA's generator).
    When activations are recomputed (activation checkpointing), a layer's second call in a micro-step replays the
    mask of its first: `replay` keeps each layer's generator state from the first call.
    """

    def __init__(self, seed: int, device: torch.device, replayable: bool = False):
        self.host = torch.Generator().manual_seed(seed)
        self.device = self.host if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
        self.replay: dict[str, torch.Tensor] | None = {} if replayable else None

    def new_epoch(self) -> None:
        torch.empty((), dtype=torch.int64).random_(generator=self.host)

    def new_micro_step(self) -> None:
        if self.replay is not None:
            self.replay.clear()

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.host.get_state(), self.device.get_state()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.host.set_state(state[0])
        self.device.set_state(state[1])

    def keep_mask(self, like: torch.Tensor, keep: float, layer: str) -> torch.Tensor:
        """A Bernoulli(keep) mask shaped like `like`, as `torch.nn.functional.dropout` draws it on a CPU."""
        generator = self.device
        if self.replay is not None:
            if layer in self.replay:  # a recomputation: the same mask again, the stream untouched
                generator = torch.Generator(like.device)
                generator.set_state(self.replay[layer])
            else:
                self.replay[layer] = self.device.get_state()
        return torch.empty_like(like).bernoulli_(keep, generator=generator)


class MemberDropout(nn.Module):
    """Dropout drawing from a member's own random numbers (`x * mask / (1 - p)`, as torch's dropout on a CPU)."""

    def __init__(self, p: float, random: MemberRandom, layer: str):
        super().__init__()
        self.p, self.random, self.layer = p, random, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * self.random.keep_mask(x, 1 - self.p, self.layer).div_(1 - self.p)


@dataclass
class LoraParts:
    """One member's LoRA on one layer, as peft made it: A, B, dropout and scaling."""

    lora_A: nn.Module
    lora_B: nn.Module
    dropout: nn.Module
    scaling: float


class PackedLoraLinear(nn.Module):
    """A frozen base linear layer shared by a pack, plus each member's LoRA, applied to that member's rows only."""

    def __init__(self, base_layer: nn.Module, routing: Routing):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.routing = routing

    def add(self, member: str, parts: LoraParts) -> None:
        self.lora_A[member], self.lora_B[member] = parts.lora_A, parts.lora_B
        self.lora_dropout[member], self.scaling[member] = parts.dropout, parts.scaling

    def remove(self, member: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.scaling):
            if member in table:
                del table[member]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        delta = None
        for seg in self.routing.segments:
            if seg.member not in self.scaling:
                continue
            lora_A = self.lora_A[seg.member]
            rows = x[seg.start : seg.stop, : seg.length].to(lora_A.weight.dtype)
            out = self.lora_B[seg.member](lora_A(self.lora_dropout[seg.member](rows))) * self.scaling[seg.member]
            if delta is None:
                delta = result.new_zeros(result.shape, dtype=out.dtype)
            delta[seg.start : seg.stop, : seg.length] = out
        return result if delta is None else (result + delta).to(result.dtype)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def plain_base(model: nn.Module) -> Iterator[dict[str, PackedLoraLinear]]:
    """The model with its pack layers taken out (each back to its base layer) while the block runs; yields them
    by name, and puts back every layer the dict then holds (the block may add new ones)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedLoraLinear)}
    for name, layer in layers.items():
        set_module(model, name, layer.base_layer)
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            set_module(model, name, layer)


@dataclass
class NewAdapter:
    """A member's adapter as peft made it: its parts per layer name, its trainable parameters by peft name (in the
    order of a solo run's optimizer), the names the Trainer applies weight decay to, and the (trainable, total)
    parameter counts."""

    parts: dict[str, LoraParts]
    params: list[tuple[str, nn.Parameter]]
    decay: set[str]
    counts: tuple[int, int]


def peft_adapter(model: nn.Module, peft_config, seed: int) -> NewAdapter:
    """A new LoRA adapter on `model` (a base without pack layers), made by peft after `set_seed(seed)` as a solo
    run makes it; peft's layers are removed again."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import Trainer, set_seed

    set_seed(seed)
    peft_model = get_peft_model(model, peft_config)
    parts = {
        name: LoraParts(m.lora_A["default"], m.lora_B["default"], m.lora_dropout["default"], m.scaling["default"])
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    params = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    decay = set(Trainer.get_decay_parameter_names(None, peft_model))  # a method that does not use its instance
    adapter = NewAdapter(parts, params, decay, peft_model.get_nb_trainable_parameters())
    peft_model.unload()
    return adapter


def drop_empty_layers(model: nn.Module) -> None:
    """Puts the base layer back wherever no member has a LoRA any more."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLoraLinear) and not module.scaling:
            set_module(model, name, module.base_layer)


@contextlib.contextmanager
def peft_view(model: nn.Module, peft_config, parts: dict[str, LoraParts]) -> Iterator[nn.Module]:
    """A peft model of `model` whose adapter is a member's (A and B per layer), for saving it as peft writes it;
    peft's layers are removed again when the block ends."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    with plain_base(model), torch.random.fork_rng(devices=[]):  # peft's throw-away init draws random numbers
        peft_model = get_peft_model(model, peft_config)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                module.lora_A["default"], module.lora_B["default"] = parts[name].lora_A, parts[name].lora_B
        try:
            yield peft_model
        finally:
            peft_model.unload()

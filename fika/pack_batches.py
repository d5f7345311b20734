"""A pack member's micro-batches, in the order and shape its solo run's Trainer reads them.

transformers' Trainer (through accelerate's seedable sampler) reads epoch `e` of the training rows in the order
of `torch.randperm(rows, generator seeded with data_seed + e)`, cuts it into micro-batches of `batch_size` (the
last one smaller), and groups them `gradient_accumulation` at a time into optimizer steps; the last step of an
epoch takes the micro-batches that are left. Each micro-batch is padded by trl's collator on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

COLLATED_COLUMNS = ("input_ids", "labels", "seq_lengths")  # what trl's SFTTrainer keeps of a tokenized dataset


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step, and the labelled positions they hold together (the loss divisor
    transformers passes as `num_items_in_batch`)."""

    batches: list[dict]
    num_items: torch.Tensor


def steps_per_epoch(rows: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (the last one may take fewer micro-batches)."""
    return max(math.ceil(math.ceil(rows / batch_size) / accumulation), 1)


def total_steps(rows: int, batch_size: int, accumulation: int, max_steps: int, epochs: float) -> int:
    """The run's optimizer steps: `max_steps`, or (with -1) `epochs` epochs, as the Trainer counts them."""
    if max_steps > 0:
        return max_steps
    return math.ceil(epochs * steps_per_epoch(rows, batch_size, accumulation))


def epoch_order(rows: int, data_seed: int, epoch: int) -> list[int]:
    """The rows of an epoch in the order the Trainer's sampler reads them."""
    generator = torch.Generator()
    generator.manual_seed(data_seed + epoch)
    return torch.randperm(rows, generator=generator).tolist()


def step_batches(
    dataset, batch_size: int, accumulation: int, data_seed: int, collate: Callable, new_epoch: Callable[[], None]
) -> Iterator[StepBatches]:
    """Yields the collated micro-batches of each optimizer step, epoch after epoch; `new_epoch()` is called when
    an epoch's reading starts (a solo run's data loader draws a random number then)."""
    columns = [c for c in COLLATED_COLUMNS if c in dataset.column_names]
    dataset = dataset.select_columns(columns)
    rows = len(dataset)
    chunks_per_epoch = math.ceil(rows / batch_size)
    epoch_steps = steps_per_epoch(rows, batch_size, accumulation)
    left = chunks_per_epoch % accumulation or accumulation
    epoch = 0
    while True:
        new_epoch()
        order = epoch_order(rows, data_seed, epoch)
        chunks = [order[i : i + batch_size] for i in range(0, rows, batch_size)]
        taken = 0
        for step in range(epoch_steps):
            count = accumulation if step != epoch_steps - 1 else left
            batches = [collate(examples(dataset, chunk)) for chunk in chunks[taken : taken + count]]
            taken += count
            num_items = sum(b["labels"][..., 1:].ne(-100).sum() for b in batches)
            yield StepBatches(batches, num_items)
        epoch += 1


def examples(dataset, rows: list[int]) -> list[dict]:
    """The rows of a datasets.Dataset as a list of dicts, as a DataLoader hands them to a collator."""
    columns = dataset[rows]
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]

"""The held-out eval loss, computed only where it is needed, per conversation.

The per-token cross-entropy over the assistant tokens of a fixed set of conversations (the same definition
as a full forward pass with labels): the decoder runs once per batch under `inference_mode`, and the LM head
and softmax run only on the positions that predict a labelled token, in chunks that bound memory. Batches
are built from conversations sorted by length, so little compute goes to padding. Besides the mean, each
conversation's summed loss and token count are kept: a paired comparison of two trials, the loss per source
and any subset of the eval set follow from them without another forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

HEAD_CHUNK = 1024  # labelled positions per LM-head chunk: bounds the logits to chunk x vocab floats
UNSUPPORTED_HEADS = ("logit_scale", "logits_scaling")  # heads that post-process logits: use the full forward


@dataclass
class EvalResult:
    """An eval over a fixed set: the mean per-token loss and, per conversation, its loss sum and token count."""

    loss: float
    tokens: int
    ids: list[str]
    sources: list[str]
    sums: list[float]
    counts: list[int]

    def per_source(self) -> dict[str, float]:
        """The per-token loss of each source's conversations."""
        totals: dict[str, list[float]] = {}
        for source, s, c in zip(self.sources, self.sums, self.counts, strict=True):
            acc = totals.setdefault(source, [0.0, 0])
            acc[0] += s
            acc[1] += c
        return {source: s / max(c, 1) for source, (s, c) in totals.items()}

    def record(self, step: int) -> dict:
        """The line kept in the trial's `evals.jsonl`."""
        return {
            "step": step,
            "eval_loss": self.loss,
            "tokens": self.tokens,
            "ids": self.ids,
            "sources": self.sources,
            "sums": self.sums,
            "counts": self.counts,
        }


def length_batches(lengths: list[int], max_tokens: int, max_rows: int = 64) -> list[list[int]]:
    """Row indices grouped into batches of similar length whose padded size stays within `max_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens and len(batches[-1]) < max_rows:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def split_model(model):
    """The decoder and LM head of a causal LM (through a peft wrapper), or None for heads fika cannot split."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings()
    if (
        decoder is None
        or head is None
        or decoder is base
        or any(getattr(base.config, k, None) for k in UNSUPPORTED_HEADS)
    ):
        return None
    return decoder, head, getattr(base.config, "final_logit_softcapping", None)


def evaluate(
    model, dataset, pad_token_id: int, max_batch_tokens: int = 4096, rows: list[int] | None = None
) -> EvalResult:
    """Evaluates `dataset` (columns input_ids, labels, id, source), or only its `rows`."""
    return evaluate_copies(model, dataset, pad_token_id, 1, None, max_batch_tokens, rows)[0]


def evaluate_copies(
    model,
    dataset,
    pad_token_id: int,
    copies: int,
    route: Callable[[int, int], None] | None,
    max_batch_tokens: int = 4096,
    rows: list[int] | None = None,
) -> list[EvalResult]:
    """Evaluates `copies` models that share one forward pass (a pack's members): every batch is stacked `copies`
    times, `route(rows, width)` is called before its forward pass (copy i holds rows i*rows to (i+1)*rows), and
    each copy gets its own result. With one copy and no route, this is `evaluate`."""
    import torch

    rows = list(range(len(dataset))) if rows is None else rows
    data = dataset.select(rows) if len(rows) != len(dataset) else dataset
    input_ids, labels = data["input_ids"], data["labels"]
    sums = [[0.0] * len(rows) for _ in range(copies)]
    counts = [sum(1 for t in seq[1:] if t != -100) for seq in labels]
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    with torch.inference_mode():
        for batch in length_batches([len(s) for s in input_ids], max_batch_tokens):
            ids, targets, mask = padded_batch(input_ids, labels, batch, pad_token_id)
            if route is not None:
                route(len(batch), ids.shape[1])
            stacked = [t.repeat(copies, 1).to(device) for t in (ids, targets, mask)]
            per_row = row_losses(model, *stacked)
            for copy in range(copies):
                for row, i in enumerate(batch):
                    sums[copy][i] = float(per_row[copy * len(batch) + row])
    model.train(was_training)
    total = sum(counts)
    return [
        EvalResult(
            loss=sum(copy_sums) / max(total, 1),
            tokens=total,
            ids=list(data["id"]),
            sources=list(data["source"]),
            sums=copy_sums,
            counts=counts,
        )
        for copy_sums in sums
    ]


def padded_batch(input_ids: list, labels: list, batch: list[int], pad_token_id: int):
    """The rows `batch` as right-padded tensors: token ids, labels (-100 on padding) and attention mask."""
    import torch

    width = max(len(input_ids[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        n = len(input_ids[i])
        ids[row, :n] = torch.tensor(input_ids[i])
        targets[row, :n] = torch.tensor(labels[i])
        mask[row, :n] = 1
    return ids, targets, mask


def row_losses(model, ids, targets, mask):
    """Each row's summed loss (float64) over the positions that predict a labelled token."""
    import torch

    device = ids.device
    shifted = targets[:, 1:]
    where = shifted != -100  # positions whose next token is labelled
    owner = torch.arange(len(ids), device=device)[:, None].expand_as(shifted)[where]
    goal = shifted[where]
    parts = split_model(model)
    if parts is not None:
        decoder, head, softcap = parts
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][where]
        losses = []
        for start in range(0, len(goal), HEAD_CHUNK):
            logits = head(hidden[start : start + HEAD_CHUNK]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            losses.append(torch.nn.functional.cross_entropy(logits, goal[start : start + HEAD_CHUNK], reduction="none"))
        token_losses = torch.cat(losses) if losses else torch.zeros(0, device=device)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][where].float()
        token_losses = torch.nn.functional.cross_entropy(logits, goal, reduction="none")
    return torch.zeros(len(ids), dtype=torch.float64, device=device).index_add_(0, owner, token_losses.double())


def subset_rows(sources: list[str], size: int) -> list[int]:
    """`size` rows of an eval set, taken round-robin over its sources (so a subset stays stratified)."""
    by_source: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        by_source.setdefault(source, []).append(i)
    picked: list[int] = []
    queues = list(by_source.values())
    depth = 0
    while len(picked) < min(size, len(sources)):
        for queue in queues:
            if depth < len(queue) and len(picked) < size:
                picked.append(queue[depth])
        depth += 1
    return sorted(picked)

"""One trial of a pack: its files, adapter, optimizer and schedule, data stream and step counters.

A member does what transformers' Trainer does for the same trial run alone, on its own cadence: it takes the
micro-batches of an optimizer step (all read at the step's start, to count the labelled positions that divide
the loss), adds each micro-batch's loss `sum(-log p) / num_items_in_batch` to its logged loss, and after the
step's last micro-batch clips its gradients (accelerate's norm), steps its optimizer (the class and arguments
the Trainer picks for its `training_args`, decay groups as the Trainer makes them), reads the learning rate and
steps its schedule. Its TrialRun writes metrics.jsonl, evals.jsonl and result.json as a solo run's does.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from fika.config import TrialConfig
from fika.observe import TrialRun, eval_schedule
from fika.pack_batches import StepBatches, step_batches, total_steps
from fika.pack_lora import LoraParts, MemberRandom
from fika.result import TrialResult


class PackMember:
    """A trial trained in a pack, stepped by the pack one micro-batch at a time."""

    def __init__(self, key: str, config: TrialConfig, out: Path, trial: TrialRun, folder: contextlib.ExitStack):
        self.key, self.config, self.out, self.trial, self.folder = key, config, out, trial, folder
        self.parts: dict[str, LoraParts] = {}
        self.params: list[torch.nn.Parameter] = []
        self.pending: list[dict] = []  # the micro-batches of the current step not yet taken
        self.micro_batch: dict = {}  # the one being trained
        self.num_items: torch.Tensor | None = None
        self.step = 0  # optimizer steps done
        self.last_logged = 0
        self.tokens_seen = 0
        self.grad_norm: torch.Tensor | None = None
        self.learning_rate = 0.0

    def prepare(self, train_dataset, params, decay: set[str], random: MemberRandom, collate, device: str) -> None:
        """Sets up the optimizer, the schedule and the data stream of a solo run of the member's config."""
        from transformers import Trainer, get_scheduler

        from fika.trial import training_args

        train = self.config.train
        args = training_args(self.config, self.out, device)
        rows = len(train_dataset)
        self.max_steps = total_steps(rows, train.batch_size, train.gradient_accumulation, train.max_steps, train.epochs)
        self.params = [p for _, p in params]
        groups = [
            {"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
        ]
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        self.scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=self.optimizer,
            num_warmup_steps=args.get_warmup_steps(self.max_steps),
            num_training_steps=self.max_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
        self.random = random
        self.stream = step_batches(
            train_dataset, train.batch_size, train.gradient_accumulation, args.data_seed, collate, random.new_epoch
        )
        self.logged_loss = torch.tensor(0.0, device=device)
        self.trial.result.max_steps = self.max_steps
        self.trial.eval_steps = eval_schedule(self.config, self.max_steps)
        if self.trial.hooks.on_start is not None:
            self.trial.hooks.on_start(self.max_steps)

    # --- one micro-batch -----------------------------------------------------------------------------

    def take_micro_batch(self) -> None:
        """Takes the member's next micro-batch (`micro_batch`); a new optimizer step reads all of its micro-batches
        first."""
        if not self.pending:
            step: StepBatches = next(self.stream)
            self.pending, self.num_items = list(step.batches), step.num_items
            self.trial.step_began = time.perf_counter()
        self.micro_batch = self.pending.pop(0)
        self.tokens_seen += int(self.micro_batch["attention_mask"].sum())

    def micro_loss(self, log_probs: torch.Tensor, length: int) -> torch.Tensor:
        """The loss of one micro-batch from the log-probabilities of its rows (padded beyond `length` for the pack),
        divided by the step's labelled positions as trl's SFTTrainer divides it."""
        per_token = -log_probs[:, : length - 1]
        return per_token.sum() / torch.as_tensor(self.num_items).clamp(min=1)

    def trained(self, loss: torch.Tensor) -> None:
        """Adds a trained micro-batch's loss to the loss logged at the next logged step."""
        self.logged_loss += loss.detach()

    @property
    def step_done(self) -> bool:
        """Whether the micro-batch just trained was the last of its optimizer step."""
        return not self.pending

    # --- one optimizer step --------------------------------------------------------------------------

    def optimizer_step(self) -> None:
        """Clips the gradients, steps the optimizer and the schedule (the learning rate logged is the one used), and
        times the step."""
        self.grad_norm = clip_gradients(self.params, self.config.train.max_grad_norm)
        self.optimizer.step()
        self.learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.trial.step_timed(self.step)

    def end_step(self) -> bool:
        """Logs the step when due (every `logging_steps`, and at eval steps), reports it, and says whether the
        member's run ends here (its last step, a stop asked by its report hook, divergence, an interruption)."""
        trial, step = self.trial, self.step
        log = step % self.config.train.logging_steps == 0 or step in trial.eval_steps
        if trial.result.status == "running" and trial.interrupted_at(step):
            trial.result.status = "interrupted"
            log = True
        stop = False
        if log:
            loss = self.logged_loss.item() / (step - self.last_logged)
            self.logged_loss -= self.logged_loss
            self.last_logged = step
            logs = {"loss": loss, "grad_norm": self.grad_norm.item(), "learning_rate": self.learning_rate}
            stop = trial.observe(step, logs, self.tokens_seen)
        return stop or step >= self.max_steps

    def finish(self, status: str, error: str | None = None) -> TrialResult:
        """Writes the member's result and releases its output folder."""
        try:
            return self.trial.finish(status, error)
        finally:
            self.folder.close()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clips gradients to a total norm of `max_norm` as accelerate's `clip_grad_norm_` does in one process, and
    returns the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    if not torch.distributed.is_available():
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    total = torch.nn.utils.get_total_norm([p.grad for p in with_grad], 2.0)
    total = torch.linalg.vector_norm(torch.stack([total]), 2.0)
    torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return total

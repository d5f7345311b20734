"""A pack: one base model in one process, and several LoRA trials trained on it in the same forward passes.

In each micro-step every member's next micro-batch goes through the base model together (stacked along the
batch, padded to the longest), each row through its own member's adapter only (fika.pack_lora); each member
then steps its optimizer on its own cadence (fika.pack_member). A member's numbers are those of the same config
run alone by `fika.trial.run_trial`, up to float rounding: the same initial adapter, data order, dropout masks,
loss normalisation, clipping, optimizer and schedule, evals and files.

The caller drives it:

    pack = Pack(config.model)                 # loads the tokenizer and the base model once
    key = pack.add(config, hooks)             # a trial joins; it starts at its step 0 in the next micro-step
    while pack.members:
        for result in pack.step():            # one micro-step; the results of the trials that ended in it
            ...
    pack.remove(key)                          # a trial leaves early (status `stopped`), its files written

Faults stay local: a member whose loss or grad norm is not finite ends as `diverged`; one whose data, eval or
files fail ends as `failed`; an out-of-memory error in a forward pass is retried with the members split in two
(and later micro-steps take at most that many members per forward pass), and a member that runs out of memory
alone ends as `failed`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch

from fika.config import ModelConfig, TrialConfig
from fika.errors import ConfigError, error_text
from fika.observe import TrialHooks, reset_peak_memory
from fika.pack_lora import MemberDropout, MemberRandom, PackedLoraLinear, Routing, Segment, drop_empty_layers
from fika.pack_member import PackMember
from fika.result import TrialResult


class Pack:
    """One base model and the LoRA trials trained on it together, one micro-step at a time."""

    def __init__(self, model: ModelConfig, base_model=None, tokenizer=None, activation_checkpointing: bool = False):
        from fika.model import device_kind, load_base_model, load_tokenizer
        from fika.trial import import_trial_libraries, score_labelled_positions_only

        import_trial_libraries()
        from trl.trainer.utils import add_fused_lm_head

        self.model_config = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.base = base_model if base_model is not None else load_base_model(model, self.tokenizer)
        add_fused_lm_head(self.base, outputs=("log_probs",))  # the loss head of trl's SFTTrainer
        score_labelled_positions_only()
        self.device_kind = device_kind()
        self.device = next(self.base.parameters()).device
        self.checkpointing = activation_checkpointing
        if activation_checkpointing:  # transformers 5.2x renamed gradient checkpointing (keeping the old name)
            enable = (
                getattr(self.base, "activation_checkpointing_enable", None) or self.base.gradient_checkpointing_enable
            )
            enable({"use_reentrant": False})
        self.routing = Routing()
        self.members: dict[str, PackMember] = {}
        self.held: set[str] = set()  # members that wait (a scheduler's decision at a rung): they train no micro-step
        self.eval_keys: dict[str, str] = {}
        self.joined = 0
        self.group_size: int | None = None  # after an out-of-memory error: the most members one forward pass takes
        reset_peak_memory(self.device_kind)

    # --- joining and leaving -------------------------------------------------------------------------

    def add(self, config: TrialConfig, hooks: TrialHooks | None = None, overwrite: bool = False) -> str:
        """A trial joins the pack (at its step 0, with its own seed and initial adapter); returns its key. Its output
        dir is locked and receives the files a solo run writes."""
        from fika.folder_lock import exclusive_folder
        from fika.output_dir import clear_outputs
        from fika.trial import TrialInputs, start_trial, trial_datasets

        refuse_unpackable(config, self.model_config)
        key = f"member{self.joined}"
        self.joined += 1
        out = Path(config.output.dir).expanduser()
        folder = contextlib.ExitStack()
        folder.enter_context(exclusive_folder(out, "output.dir", "a training run"))
        member = None
        try:
            if overwrite:
                clear_outputs(out)
            inputs = TrialInputs(config, base_model=self.base, tokenizer=self.tokenizer)
            trial, _ = start_trial(config, out, hooks or TrialHooks(), inputs, resume=False, fresh_peak=False)
            member = PackMember(key, config, out, trial, folder)
            train_dataset, trial.eval_dataset = trial_datasets(config, inputs.mix())
            trial.pad_token_id = self.tokenizer.pad_token_id
            self.attach_adapter(member, train_dataset)
        except Exception as err:
            self.detach_adapter(key)
            if member is None:
                folder.close()
            else:
                member.finish("failed", error_text(err))
            raise
        self.eval_keys[key] = eval_fingerprint(trial.eval_dataset)
        self.members[key] = member
        return key

    def attach_adapter(self, member: PackMember, train_dataset) -> None:
        """Makes the member's adapter (as its solo run would), puts it into the pack's layers, and prepares its
        optimizer, schedule and data stream."""
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        from fika.model import lora_config
        from fika.pack_lora import peft_adapter, plain_base

        config = member.config
        random = MemberRandom(config.train.seed, self.device, replayable=self.checkpointing)
        with plain_base(self.base) as layers:
            adapter = peft_adapter(self.base, lora_config(config.lora), config.train.seed)
            for name in adapter.parts:
                if name not in layers:
                    layers[name] = PackedLoraLinear(self.base.get_submodule(name), self.routing)
        for name, part in adapter.parts.items():
            if isinstance(part.dropout, torch.nn.Dropout):
                part.dropout = MemberDropout(part.dropout.p, random, name)
            layers[name].add(member.key, part)
        if getattr(self.base, "is_loaded_in_4bit", False) or getattr(self.base, "is_loaded_in_8bit", False):
            for _, param in adapter.params:  # trl's SFTTrainer trains a quantized model's LoRA weights in bf16
                param.data = param.data.to(torch.bfloat16)
        member.parts = adapter.parts
        member.trial.result.trainable_params, member.trial.result.total_params = adapter.counts
        collate = DataCollatorForLanguageModeling(pad_token_id=self.tokenizer.pad_token_id)
        member.prepare(train_dataset, adapter.params, adapter.decay, random, collate, self.device_kind)

    def detach_adapter(self, key: str) -> None:
        for module in self.base.modules():
            if isinstance(module, PackedLoraLinear):
                module.remove(key)
        drop_empty_layers(self.base)

    def hold(self, key: str) -> None:
        """The member trains no micro-step until `release(key)` (the others go on); it stays at a step boundary."""
        if key in self.members:
            self.held.add(key)

    def release(self, key: str) -> None:
        """A held member trains again from the next micro-step."""
        self.held.discard(key)

    def remove(self, key: str, status: str = "stopped") -> TrialResult:
        """A member leaves before its run ends (an early-stopping decision: `stopped`), its files written."""
        member = self.members[key]
        if member.trial.result.status == "running":
            member.trial.result.status = status
        return self.leave(member, status)

    def leave(self, member: PackMember, status: str, error: str | None = None) -> TrialResult:
        """Ends a member's run: a completed run saves its adapter as a solo run does; the member's layers go."""
        try:
            if status == "completed" and member.trial.result.status == "running" and member.config.output.save_adapter:
                self.save(member)
            result = member.finish(status, error)
        except Exception as err:
            result = member.finish("failed", error_text(err))
        finally:
            self.members.pop(member.key, None)
            self.eval_keys.pop(member.key, None)
            self.held.discard(member.key)
            self.detach_adapter(member.key)
        return result

    def save(self, member: PackMember) -> None:
        """Writes the member's adapter with peft (the files and keys a solo run writes), and its merged model when
        asked for."""
        from fika.model import lora_config
        from fika.pack_lora import peft_view
        from fika.trial import save_adapter

        with peft_view(self.base, lora_config(member.config.lora), member.parts) as peft_model:
            save_adapter(member.config, member.out, member.trial, peft_model, self.tokenizer)

    def close(self) -> list[TrialResult]:
        """Ends the runs still in the pack as `interrupted` and leaves the base model as it was loaded."""
        results = [self.remove(key, "interrupted") for key in list(self.members)]
        if self.checkpointing:
            self.base.gradient_checkpointing_disable()
        return results

    # --- one micro-step ------------------------------------------------------------------------------

    def step(self) -> list[TrialResult]:
        """Trains one micro-batch of every member not held; returns the results of the members whose runs ended in it."""
        active = [m for m in self.members.values() if m.key not in self.held]
        ended = self.each(active, PackMember.take_micro_batch)
        live = [m for m in active if m.key in self.members]
        for member in live:
            member.trial.result.pack_size = max(member.trial.result.pack_size or 0, len(self.members))
        size = self.group_size or max(len(live), 1)
        for start in range(0, len(live), size):
            ended += self.train_group(live[start : start + size])
        done = [m for m in live if m.key in self.members and m.step_done]
        ended += self.each(done, PackMember.optimizer_step)
        ended += self.run_evals([m for m in done if m.key in self.members and m.trial.eval_due(m.step)])
        return ended + self.each(done, PackMember.end_step)

    def each(self, members: list[PackMember], action) -> list[TrialResult]:
        """Runs `action(member)` for each member still in the pack; returns the results of the runs that ended: a
        member whose action returns True has ended its run, one whose action raises ends as `failed`."""
        ended = []
        for member in members:
            if member.key not in self.members:
                continue
            try:
                over = action(member)
            except Exception as err:
                ended.append(self.leave(member, "failed", error_text(err)))
                continue
            if over:
                ended.append(self.leave(member, "completed"))
        return ended

    def train_group(self, group: list[PackMember]) -> list[TrialResult]:
        """One forward and backward pass of `group`'s micro-batches; after an out-of-memory error, the same split in
        two (with each member's random numbers rewound), down to one member, which then fails."""
        states = [m.random.state() for m in group]
        try:
            self.forward_backward(group)
            return []
        except torch.OutOfMemoryError as err:
            for member, state in zip(group, states, strict=True):
                member.random.restore(state)
            if self.device_kind == "cuda":
                torch.cuda.empty_cache()
            if len(group) == 1:
                return [self.leave(group[0], "failed", error_text(err))]
            half = (len(group) + 1) // 2
            self.group_size = min(self.group_size or half, half)
            return self.train_group(group[:half]) + self.train_group(group[half:])
        except Exception as err:  # not a member's own fault: the group's runs fail, the others go on
            return [self.leave(m, "failed", error_text(err)) for m in group]

    def forward_backward(self, group: list[PackMember]) -> None:
        """Adds each member's gradients of its micro-batch loss to its parameters (only once the whole pass
        succeeded, so a retried pass adds nothing twice)."""
        from fika.model import compute_dtype

        ids, mask, labels, self.routing.segments = stack_batches(
            [(m.key, m.micro_batch) for m in group], self.tokenizer.pad_token_id
        )
        for member in group:
            member.random.new_micro_step()
        dtype = compute_dtype()  # a solo run on a GPU trains under autocast in bf16 (or fp16)
        autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(self.device.type, dtype)
        try:
            self.base.train()
            with autocast:
                out = self.base(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    labels=labels.to(self.device),
                    fused_lm_head=True,
                )
                losses = [
                    m.micro_loss(out.log_probs[seg.start : seg.stop], seg.length)
                    for m, seg in zip(group, self.routing.segments, strict=True)
                ]
            params = [p for m in group for p in m.params]
            grads = torch.autograd.grad(sum(losses), params, allow_unused=True)
        finally:
            self.routing.segments = []
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)
        for member, loss in zip(group, losses, strict=True):
            member.trained(loss)

    def run_evals(self, members: list[PackMember]) -> list[TrialResult]:
        """The evals due now, packed: the members that evaluate the same rows of the same eval set share each
        forward pass."""
        groups: dict[tuple, list[PackMember]] = {}
        for member in members:
            rows = member.trial.eval_rows(member.step)
            groups.setdefault((self.eval_keys[member.key], None if rows is None else tuple(rows)), []).append(member)
        ended = []
        for (_, rows), group in groups.items():
            ended += self.evaluate_group(group, None if rows is None else list(rows))
        return ended

    def evaluate_group(self, group: list[PackMember], rows: list[int] | None) -> list[TrialResult]:
        """Evaluates `group`'s members on their shared eval rows in one pass per eval batch; after an out-of-memory
        error, the same split in two, down to one member, which then fails."""
        from fika.evaluate import evaluate_copies

        def route(n: int, width: int) -> None:
            self.routing.segments = [Segment(m.key, i * n, (i + 1) * n, width) for i, m in enumerate(group)]

        began = time.perf_counter()
        dataset = group[0].trial.eval_dataset
        try:
            results = evaluate_copies(self.base, dataset, self.tokenizer.pad_token_id, len(group), route, rows=rows)
        except torch.OutOfMemoryError as err:
            if self.device_kind == "cuda":
                torch.cuda.empty_cache()
            if len(group) == 1:
                return [self.leave(group[0], "failed", error_text(err))]
            half = (len(group) + 1) // 2
            return self.evaluate_group(group[:half], rows) + self.evaluate_group(group[half:], rows)
        except Exception as err:
            return [self.leave(m, "failed", error_text(err)) for m in group]
        finally:
            self.routing.segments = []
        spent = time.perf_counter() - began
        for member, result in zip(group, results, strict=True):
            member.trial.record_eval(member.step, result, spent)
        return []


def stack_batches(keyed: list[tuple[str, dict]], pad_token_id: int):
    """The members' micro-batches stacked along the batch, right-padded to the longest: token ids, attention mask,
    labels, and each member's rows."""
    width = max(batch["input_ids"].shape[1] for _, batch in keyed)
    ids, mask, labels, segments, start = [], [], [], [], 0
    pad = torch.nn.functional.pad
    for key, batch in keyed:
        rows, length = batch["input_ids"].shape
        ids.append(pad(batch["input_ids"], (0, width - length), value=pad_token_id))
        mask.append(pad(batch["attention_mask"], (0, width - length), value=0))
        labels.append(pad(batch["labels"], (0, width - length), value=-100))
        segments.append(Segment(key, start, start + rows, length))
        start += rows
    return torch.cat(ids), torch.cat(mask), torch.cat(labels), segments


def eval_fingerprint(dataset) -> str:
    """What identifies an eval set's content: members with equal fingerprints share their eval forward passes."""
    content = json.dumps([list(dataset[column]) for column in ("id", "input_ids", "labels")])
    return hashlib.sha256(content.encode()).hexdigest()


def refuse_unpackable(config: TrialConfig, model: ModelConfig) -> None:
    """Raises ConfigError for a config a pack cannot train as its solo run would."""
    if config.model != model:
        raise ConfigError(
            f"model: a pack trains on one base model ({model.name}); this trial asks for "
            f"{config.model.model_dump(exclude_defaults=True)}"
        )
    if config.train.checkpoints:
        raise ConfigError(
            "train.checkpoints: a packed trial does not write checkpoints; set it to false or train alone"
        )
    if config.train.report_to:
        raise ConfigError(f"train.report_to: {config.train.report_to} is not available to a packed trial")


def train_packed(pack: Pack) -> list[TrialResult]:
    """Steps the pack until every member's run has ended; returns their results in the order they ended."""
    results: list[TrialResult] = []
    while pack.members:
        results += pack.step()
    return results

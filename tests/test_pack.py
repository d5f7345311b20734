"""A pack trains several LoRA trials on one base model in the same forward passes, and each member gives the numbers
of the same config trained alone by `run_trial` with the same seed.

The members differ in rank, alpha (free, tied, rsLoRA), dropout, target modules, learning rate, scheduler, batch
size, gradient accumulation, seed and data mix; one joins after three micro-steps and leaves at its step 12, one
diverges (a NaN put into its own adapter), one is stopped by its report hook, as a scheduler stops a trial. On a
CPU in fp32 every per-step loss, grad norm, learning rate and eval loss matches the solo run's within 1e-4 (the
measured differences are below 1e-6: only float rounding differs, where a member's rows are padded further for
the pack and attention then takes its masked path), and the tokens seen are equal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fika.config import load_config
from fika.errors import ConfigError
from fika.model import load_base_model, load_tokenizer
from fika.observe import TrialHooks
from fika.pack import Pack, train_packed
from fika.trial import run_trial

TOLERANCE = 1e-4
STEPS = 20
COMMON = [
    "model.name=tiny",
    "data.eval_size=16",
    f"train.max_steps={STEPS}",
    "train.warmup_steps=2",
    "train.eval_steps=[5, 10]",
]
TWO_SOURCES = (
    "data.sources=[{path: tests/data/finetome.jsonl, name: finetome, weight: 3}, "
    "{path: tests/data/sharegpt_english.jsonl, name: sharegpt_english, weight: 1}]"
)
MEMBERS = {
    "dropout": [
        "data.sources.0.limit=400",
        "lora.r=8",
        "lora.alpha=16",
        "lora.dropout=0.1",
        "train.learning_rate=5e-3",
        "train.batch_size=2",
        "train.gradient_accumulation=1",
        "train.seed=1",
    ],
    "accumulates": [
        "data.sources.0.limit=400",
        "lora.r=4",
        "lora.alpha_ratio=2",
        "lora.use_rslora=true",
        "train.learning_rate=2e-3",
        "train.lr_scheduler=cosine_with_restarts",
        "train.num_cycles=2",
        "train.batch_size=1",
        "train.gradient_accumulation=3",
        "train.seed=2",
    ],
    "joins_late": [
        TWO_SOURCES,
        "lora.r=16",
        "lora.dropout=0.05",
        "lora.target_modules=[q_proj, v_proj]",
        "train.learning_rate=1e-3",
        "train.lr_scheduler=constant_with_warmup",
        "train.batch_size=3",
        "train.gradient_accumulation=2",
        "train.max_steps=12",
        "train.seed=3",
    ],
    "diverges": ["data.sources.0.limit=400", "train.learning_rate=5e-3", "train.batch_size=2", "train.seed=4"],
    "stopped": ["data.sources.0.limit=300", "lora.r=2", "train.learning_rate=3e-3", "train.lr_scheduler=cosine"],
}
JOINS_AFTER = {"joins_late": 3}  # micro-steps of the pack before it joins
POISON_STEP, STOP_STEP = 5, 8


def member_config(root: Path, name: str, *more: str):
    return load_config(None, [*COMMON, *MEMBERS[name], *more, f"output.dir={root / name}"])


def first_q_proj_lora_a(base, adapter: str):
    """The A weight of a member's LoRA on the first layer's q_proj (peft's layer alone, a pack layer in a pack)."""
    return base.model.layers[0].self_attn.q_proj.lora_A[adapter].weight


def hooks_for(name: str, records: list[dict], lora_a) -> TrialHooks:
    """Records every step; `diverges` gets a NaN in its own adapter after step 5, `stopped` asks to stop at 8 and
    has a scheduler's quick eval (8 conversations) at step 3."""

    def report(record: dict) -> bool:
        records.append(record)
        if name == "diverges" and record["step"] == POISON_STEP:
            with torch.no_grad():
                lora_a()[0, 0] = float("nan")
        return name == "stopped" and record["step"] == STOP_STEP

    return TrialHooks(report=report, quick_evals=([3], 8) if name == "stopped" else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every member trained alone, then all of them in one pack; their records and results by name."""
    root = tmp_path_factory.mktemp("pack")
    model = member_config(root, "dropout").model
    tokenizer = load_tokenizer(model)
    base = load_base_model(model, tokenizer)
    solo, solo_results = {name: [] for name in MEMBERS}, {}
    for name in MEMBERS:
        hooks = hooks_for(name, solo[name], lambda: first_q_proj_lora_a(base, "default"))
        solo_results[name] = run_trial(member_config(root / "solo", name), hooks=hooks, base_model=base)

    pack = Pack(model, tokenizer=tokenizer)
    packed, keys = {name: [] for name in MEMBERS}, {}

    def join(name: str) -> None:
        hooks = hooks_for(name, packed[name], lambda: first_q_proj_lora_a(pack.base, keys[name]))
        keys[name] = pack.add(member_config(root / "packed", name), hooks)

    for name in MEMBERS:
        if name not in JOINS_AFTER:
            join(name)
    results = []
    for micro_step in range(1, 1000):
        results += pack.step()
        for name, after in JOINS_AFTER.items():
            if micro_step == after:
                join(name)
        if not pack.members:
            break
    packed_results = {name: next(r for r in results if r.output_dir.endswith(f"/{name}")) for name in MEMBERS}
    return root, solo, solo_results, packed, packed_results, pack, base


def differences(solo: list[dict], packed: list[dict], key: str) -> list[float]:
    """Per step, |solo - packed| of `key` (0 where both are NaN, as a diverged step's loss is)."""
    out = []
    for a, b in zip(solo, packed, strict=True):
        if key in a or key in b:
            both_nan = math.isnan(a[key]) and math.isnan(b[key])
            out.append(0.0 if both_nan else abs(a[key] - b[key]))
    return out


def test_every_member_matches_its_solo_run_step_by_step(runs):
    _, solo, solo_results, packed, packed_results, *_ = runs
    for name in MEMBERS:
        assert [r["step"] for r in packed[name]] == [r["step"] for r in solo[name]], name
        assert [r["tokens_seen"] for r in packed[name]] == [r["tokens_seen"] for r in solo[name]], name
        for key in ("train_loss", "train_loss_smooth", "grad_norm", "learning_rate", "eval_loss", "eval_loss_subset"):
            worst = max(differences(solo[name], packed[name], key), default=0.0)
            assert worst < TOLERANCE, f"{name} {key}: {worst}"
        assert packed_results[name].status == solo_results[name].status, name
        assert packed_results[name].trainable_params == solo_results[name].trainable_params
        assert sorted(packed_results[name].eval_losses) == sorted(solo_results[name].eval_losses)
    assert {name: solo_results[name].status for name in MEMBERS} == {
        "dropout": "completed",
        "accumulates": "completed",
        "joins_late": "completed",
        "diverges": "diverged",
        "stopped": "stopped",
    }
    assert packed_results["diverges"].steps == POISON_STEP + 1 and packed_results["stopped"].steps == STOP_STEP
    assert packed_results["joins_late"].steps == 12 and packed_results["dropout"].pack_size == len(MEMBERS)
    assert [r["step"] for r in packed["stopped"] if "eval_loss_subset" in r] == [3]


def test_members_write_the_files_a_solo_run_writes(runs):
    root, _, solo_results, _, packed_results, *_ = runs
    for name in MEMBERS:
        solo_dir, packed_dir = root / "solo" / name, root / "packed" / name
        assert sorted(p.name for p in packed_dir.iterdir()) == sorted(p.name for p in solo_dir.iterdir()), name
        solo_config = (solo_dir / "config.yaml").read_text().replace(str(solo_dir), str(packed_dir))
        assert (packed_dir / "config.yaml").read_text() == solo_config
        assert (packed_dir / "data.json").read_text() == (solo_dir / "data.json").read_text()
        lines = [json.loads(line) for line in (packed_dir / "metrics.jsonl").read_text().splitlines()]
        assert [set(r) for r in lines] == [set(json.loads(line)) for line in (solo_dir / "metrics.jsonl").open()]
        evals = [json.loads(line) for line in (packed_dir / "evals.jsonl").read_text().splitlines()]
        solo_evals = [json.loads(line) for line in (solo_dir / "evals.jsonl").read_text().splitlines()]
        assert [e["ids"] for e in evals] == [e["ids"] for e in solo_evals]
        saved = json.loads((packed_dir / "result.json").read_text())
        assert saved["status"] == solo_results[name].status and saved["pack_size"] >= 1
        assert (saved["adapter_dir"] is None) == (solo_results[name].adapter_dir is None)


def test_saved_adapters_match_the_solo_adapters_and_load_in_plain_peft(runs):
    from peft import PeftModel
    from safetensors.torch import load_file

    root, _, solo_results, _, packed_results, pack, _ = runs
    tokenizer = pack.tokenizer
    ids = torch.tensor([tokenizer("<|im_start|>user\nWhat is a hash table?<|im_end|>")["input_ids"]])
    for name in ("dropout", "accumulates", "joins_late"):
        solo_dir, packed_dir = Path(solo_results[name].adapter_dir), Path(packed_results[name].adapter_dir)
        assert json.loads((packed_dir / "adapter_config.json").read_text()) == json.loads(
            (solo_dir / "adapter_config.json").read_text()
        )
        solo_weights = load_file(solo_dir / "adapter_model.safetensors")
        packed_weights = load_file(packed_dir / "adapter_model.safetensors")
        assert packed_weights.keys() == solo_weights.keys()
        for key, value in packed_weights.items():
            assert value.dtype == solo_weights[key].dtype
            assert (value - solo_weights[key]).abs().max() < TOLERANCE, (name, key)
        logits = {}
        for which, folder in (("solo", solo_dir), ("packed", packed_dir)):
            model = PeftModel.from_pretrained(load_base_model(pack.model_config, tokenizer), folder)
            with torch.no_grad():
                logits[which] = model(input_ids=ids).logits
        assert (logits["solo"] - logits["packed"]).abs().max() < TOLERANCE, name


def test_the_base_model_is_left_as_loaded(runs):
    *_, pack, _ = runs
    from fika.pack_lora import PackedLoraLinear

    fresh = load_base_model(pack.model_config, pack.tokenizer)
    assert not [m for m in pack.base.modules() if isinstance(m, PackedLoraLinear)]
    after, before = pack.base.state_dict(), fresh.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_an_out_of_memory_error_splits_the_pack_and_a_member_too_big_alone_fails(runs, tmp_path):
    """CUDA's out-of-memory error, injected by a hook on the decoder, for a training pass of more than two rows and
    an eval pass of more than one member: the four members (2, 1, 3 and 2 rows) are retried in halves, and the two
    that evaluate at the same micro-steps one after the other; the member whose micro-batch alone has three rows
    ends as `failed`, and the others still give their solo numbers."""
    _, solo, *_ = runs
    pack = Pack(member_config(tmp_path, "dropout").model)
    raised = []

    def too_big(module, args, kwargs):
        rows, members = kwargs["input_ids"].shape[0], len(pack.routing.segments)
        if (module.training and rows > 2) or (not module.training and members > 1):
            raised.append("train" if module.training else "eval")
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    pack.base.model.register_forward_pre_hook(too_big, with_kwargs=True)
    packed = {name: [] for name in ("dropout", "accumulates", "joins_late", "stopped")}
    for name, records in packed.items():
        pack.add(member_config(tmp_path, name), TrialHooks(report=records.append))
    results = {Path(r.output_dir).name: r for r in train_packed(pack)}
    assert results["joins_late"].status == "failed" and "out of memory" in results["joins_late"].error
    assert pack.group_size == 1 and set(raised) == {"train", "eval"}
    for name in ("dropout", "accumulates", "stopped"):
        assert results[name].status == "completed"
        steps = len(solo[name])  # `stopped` was stopped at step 8 when it ran alone
        assert max(differences(solo[name], packed[name][:steps], "train_loss")) < TOLERANCE
        assert max(differences(solo[name], packed[name][:steps], "eval_loss"), default=0.0) < TOLERANCE


def test_a_member_removed_by_the_caller_stops_with_its_files_written(tmp_path):
    config = member_config(tmp_path, "dropout")
    pack = Pack(config.model)
    key = pack.add(config)
    for _ in range(3):
        assert pack.step() == []
    result = pack.remove(key)
    assert result.status == "stopped" and result.steps == 3 and not pack.members
    assert json.loads((tmp_path / "dropout" / "result.json").read_text())["status"] == "stopped"
    assert len((tmp_path / "dropout" / "metrics.jsonl").read_text().splitlines()) == 3
    again = pack.add(config, overwrite=True)  # the folder's lock was released
    pack.close()
    assert again not in pack.members


def test_a_pack_refuses_what_it_cannot_train_as_a_solo_run_would(tmp_path):
    config = member_config(tmp_path, "dropout")
    pack = Pack(config.model)
    with pytest.raises(ConfigError, match="one base model"):
        pack.add(member_config(tmp_path, "dropout", "model.max_seq_length=128"))
    with pytest.raises(ConfigError, match="train.checkpoints"):
        pack.add(member_config(tmp_path, "dropout", "train.checkpoints=true"))
    assert not pack.members


def test_the_4bit_path_matches_solo_4bit_runs(tmp_path):
    """bitsandbytes' NF4 base on a CPU, as a QLoRA trial loads it: trl trains a quantized model's LoRA weights in
    bf16, so the pack does too. Both members take micro-batches of two or more rows: a solo micro-batch of one
    unpadded row runs attention without a padding mask, and the fp32 rounding that differs when the pack pads it
    comes out of bf16 adapters as up to about 1e-4 in the loss after 20 steps (measured: 8e-5)."""
    names = ("dropout", "joins_late")
    extra = ("model.load_in_4bit=true", "train.max_steps=8", "train.eval_steps=[4]")
    solo, packed = {n: [] for n in names}, {n: [] for n in names}
    for name in names:
        run_trial(member_config(tmp_path / "solo", name, *extra), solo[name].append)
    pack = Pack(member_config(tmp_path, "dropout", *extra).model)
    for name in names:
        pack.add(member_config(tmp_path / "packed", name, *extra), TrialHooks(report=packed[name].append))
    assert [r.status for r in train_packed(pack)] == ["completed", "completed"]
    for name in names:
        assert len(packed[name]) == 8
        for key in ("train_loss", "grad_norm", "eval_loss"):
            assert max(differences(solo[name], packed[name], key)) < TOLERANCE, (name, key)


def test_activation_checkpointing_replays_each_members_dropout(runs, tmp_path):
    """With activation checkpointing (a pack's way to fit more members on a GPU), each layer's forward pass runs
    again during the backward pass: a member's dropout must draw the same mask again without moving its stream."""
    _, solo, *_ = runs
    pack = Pack(member_config(tmp_path, "dropout").model, activation_checkpointing=True)
    packed = {name: [] for name in ("dropout", "accumulates")}
    for name, records in packed.items():
        pack.add(member_config(tmp_path, name), TrialHooks(report=records.append))
    assert [r.status for r in train_packed(pack)] == ["completed", "completed"]
    for name, records in packed.items():
        for key in ("train_loss", "grad_norm", "eval_loss"):
            assert max(differences(solo[name], records, key)) < TOLERANCE, (name, key)

"""One real LoRA trial on the tiny model: the loss falls, only the adapter moves, every output is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from fika.config import ModelConfig, load_config
from fika.model import load_base_model, load_tokenizer
from fika.trial import run_trial


def tiny_config(tmp_path, *overrides, name="trial"):
    return load_config(
        None,
        [
            "model.name=tiny",
            "data.sources.0.limit=400",
            "data.eval_size=16",
            "train.learning_rate=5e-3",
            "train.max_steps=40",
            "train.eval_steps=[10, 20, 30]",
            f"output.dir={tmp_path / name}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 40-step tiny trial, run on a base model the test holds, with its reports."""
    tmp_path = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp_path)
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, tokenizer)
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    records: list[dict] = []
    result = run_trial(config, records.append, base_model=base)
    return config, result, records, base, base_before


def test_the_loss_falls_and_eval_is_reported_at_every_eval_step(trained):
    config, result, records, *_ = trained
    assert result.status == "completed" and result.steps == 40 and [r["step"] for r in records] == list(range(1, 41))
    losses = [r["train_loss"] for r in records]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [10, 20, 30, 40]  # the configured steps plus the last one
    assert evals[40] < evals[10] and result.eval_loss == evals[40]
    assert records[-1]["train_loss_smooth"] == pytest.approx(sum(losses[-10:]) / 10)
    for key in ("learning_rate", "grad_norm", "tokens_seen", "elapsed_s"):
        assert all(r[key] is not None for r in records), key
    assert records[-1]["tokens_seen"] > records[0]["tokens_seen"] > 0


def test_only_the_adapter_changed(trained):
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import set_seed

    from fika.model import lora_config

    config, result, _, base, base_before = trained
    after = base.state_dict()
    assert after.keys() == base_before.keys()  # the LoRA layers were removed again
    assert all(torch.equal(after[k], base_before[k]) for k in base_before), "a base weight changed"

    tokenizer = load_tokenizer(config.model)
    set_seed(config.train.seed)
    initial = get_peft_model(load_base_model(config.model, tokenizer), lora_config(config.lora))
    initial_lora = {k: v for k, v in initial.state_dict().items() if "lora_" in k}
    trained_lora = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    assert len(trained_lora) == len(initial_lora) == 2 * 7 * 2  # A and B, 7 linear layers, 2 blocks
    for key, value in trained_lora.items():
        start = initial_lora[key.replace(".weight", ".default.weight")].cpu()  # on the GPU when there is one
        assert not torch.equal(value, start), f"{key} did not change"


def test_outputs_are_written_and_parse(trained):
    config, result, records, *_ = trained
    out = result.output_dir
    assert yaml.safe_load(Path(out, "config.yaml").read_text()) == config.model_dump(mode="json")
    saved = json.loads(Path(out, "result.json").read_text())
    assert saved["status"] == "completed" and saved["eval_loss"] == result.eval_loss
    for key in (
        "train_loss",
        "train_loss_smooth",
        "tokens_seen",
        "wall_time_s",
        "time_to_first_step_s",
        "peak_memory_mb",
    ):
        assert saved[key] and saved[key] > 0, key
    assert saved["trainable_params"] == 32_768 and saved["total_params"] > saved["trainable_params"]
    assert 0 < saved["step_time_s"] < saved["wall_time_s"] and saved["eval_time_s"] > 0
    lines = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    assert not [p for p in Path(out).rglob("*") if p.name.startswith("checkpoint")]
    evals = [json.loads(line) for line in Path(out, "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20, 30, 40] and len(evals[0]["ids"]) == 16
    for e in evals:  # per conversation: summed token loss and token count; the same conversations every time
        assert e["ids"] == evals[0]["ids"] and e["counts"] == evals[0]["counts"]
        assert sum(e["sums"]) / sum(e["counts"]) == pytest.approx(e["eval_loss"])
    data = json.loads(Path(out, "data.json").read_text())
    assert data["eval_rows"] == 16 and data["sources"][0]["train"] == data["train_rows"]


def test_same_seed_same_losses(trained, tmp_path):
    config, result, records, *_ = trained
    again: list[dict] = []
    run_trial(
        config.model_copy(update={"output": config.output.model_copy(update={"dir": str(tmp_path)})}), again.append
    )
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in records]
    assert [r.get("eval_loss") for r in again] == [r.get("eval_loss") for r in records]


def test_logged_loss_does_not_depend_on_how_a_batch_is_split(tmp_path):
    """Loss is a mean over the tokens of the whole optimizer step, whatever batch x accumulation is."""
    runs = {}
    for batch, accumulation in [(4, 1), (2, 2), (1, 4)]:
        records: list[dict] = []
        config = tiny_config(
            tmp_path,
            f"train.batch_size={batch}",
            f"train.gradient_accumulation={accumulation}",
            "train.max_steps=6",
            "train.eval_steps=[6]",
            "output.save_adapter=false",
            name=f"b{batch}x{accumulation}",
        )
        run_trial(config, records.append)
        runs[(batch, accumulation)] = records
    reference = runs[(4, 1)]
    for records in runs.values():
        assert [r["tokens_seen"] for r in records] == [r["tokens_seen"] for r in reference]
        for a, b in zip(records, reference, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_a_nan_stops_the_trial_as_diverged(tmp_path):
    config = tiny_config(tmp_path, "train.max_steps=30")
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, tokenizer)
    records: list[dict] = []

    def poison_at_step_5(record: dict) -> None:
        records.append(record)
        if record["step"] == 5:  # a NaN enters the forward pass from step 6 on (the final norm: never 4-bit)
            with torch.no_grad():
                base.model.norm.weight[0] = float("nan")

    result = run_trial(config, poison_at_step_5, base_model=base)
    assert result.status == "diverged" and result.steps == 6
    assert math.isnan(records[-1]["train_loss"]) and records[-1]["status"] == "diverged"
    assert result.adapter_dir is None
    assert json.loads(Path(result.output_dir, "result.json").read_text())["status"] == "diverged"


def test_cosine_with_restarts_differs_from_cosine(tmp_path):
    lrs = {}
    for scheduler in ("cosine", "cosine_with_restarts"):
        records: list[dict] = []
        config = tiny_config(
            tmp_path, f"train.lr_scheduler={scheduler}", "train.max_steps=30", "output.save_adapter=false"
        )
        run_trial(config, records.append)
        lrs[scheduler] = [r["learning_rate"] for r in records]
    assert lrs["cosine"] != lrs["cosine_with_restarts"]
    after_warmup = lrs["cosine_with_restarts"][5:]
    assert sum(b > a for a, b in zip(after_warmup, after_warmup[1:], strict=False)) == 2  # 3 cycles: 2 restarts


def reference_eval(model, dataset) -> list[float]:
    """Summed token loss per conversation from a plain full forward pass, one conversation at a time."""
    sums = []
    model.eval()
    with torch.no_grad():
        for row in dataset:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = torch.tensor([row["labels"]], device=model.device)
            logits = model(input_ids=ids).logits
            sums.append(
                float(
                    torch.nn.functional.cross_entropy(
                        logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum"
                    )
                )
            )
    return sums


@pytest.mark.parametrize("name", ["tiny", pytest.param("builtin:smollm2-135m-instruct", marks=pytest.mark.slow)])
def test_the_fast_eval_equals_a_full_forward_pass(name, tmp_path):
    """Labelled positions only, length-sorted batches, chunked head: the same numbers as the plain definition."""
    from fika.data import prepare_data
    from fika.evaluate import evaluate, subset_rows

    config = load_config(
        None, [f"model.name={name}", "model.max_seq_length=128", "data.sources.0.limit=40", "data.eval_size=12"]
    )
    tokenizer = load_tokenizer(config.model)
    mix = prepare_data(config.data, tokenizer, config.model.max_seq_length)
    model = load_base_model(config.model, tokenizer)
    expected = reference_eval(model, mix.eval)
    result = evaluate(model, mix.eval, tokenizer.pad_token_id, max_batch_tokens=300)  # several batches, padding
    rel = 1e-5 if model.device.type == "cpu" else 1e-2  # a GPU computes in bf16: other batch shapes, other sums
    assert result.sums == pytest.approx(expected, rel=rel)
    assert result.loss == pytest.approx(sum(expected) / sum(result.counts), rel=rel)
    rows = subset_rows(result.sources, 5)
    subset = evaluate(model, mix.eval, tokenizer.pad_token_id, rows=rows)
    assert subset.sums == pytest.approx([expected[i] for i in rows], rel=rel)


def test_the_head_on_labelled_positions_only_gives_the_same_loss_and_gradients(tmp_path):
    """On a CPU, trl's fused LM head then skips unlabelled positions: same log-probs, metrics and LoRA gradients."""
    import trl.trainer.utils as trl_utils
    from peft import get_peft_model
    from transformers import LlamaForCausalLM
    from trl.kernels.chunked_logprob import _use_triton as trl_choice

    from fika.model import lora_config, tiny_model_dir
    from fika.trial import score_labelled_positions_only

    config = tiny_config(tmp_path)
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir(), device_map="cpu")  # the CPU path, on any machine
    trl_utils.add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    model = get_peft_model(base, lora_config(config.lora))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at the start; a random B gives every LoRA weight a gradient
            param.data.normal_(0, 0.02)
    ids = torch.randint(0, base.config.vocab_size, (2, 48))
    labels = ids.clone()
    labels[0, :30] = labels[1, :10] = -100

    def forward_backward() -> tuple:
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (-out.log_probs.sum() / out.label_mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    before = trl_utils._use_triton  # patched already if a trial ran in this process
    try:
        trl_utils._use_triton = trl_choice
        assert not trl_choice(torch.device("cpu"))  # trl's own choice on a CPU: every position
        full, full_grads = forward_backward()
        score_labelled_positions_only()
        assert trl_utils._use_triton(torch.device("cpu"))
        compact, compact_grads = forward_backward()
    finally:
        trl_utils._use_triton = before
    for field in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(compact, field), getattr(full, field), rtol=1e-5, atol=1e-6)
    assert len(full_grads) == 2 * 14 and full_grads.keys() == compact_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-4, atol=1e-7)


def test_the_4bit_qlora_path_runs_on_a_cpu(tmp_path):
    """bitsandbytes NF4 on a CPU: k-bit preparation, LoRA on Linear4bit layers, loss falls, only the adapter moves."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    config = tiny_config(tmp_path, "model.load_in_4bit=true", "train.max_steps=30", "train.eval_steps=[10]")
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, tokenizer)
    linear4 = [m for m in base.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linear4) == 14  # 7 linear layers x 2 blocks, the head stays unquantized
    before = {k: v.clone() for k, v in base.state_dict().items()}
    records: list[dict] = []
    result = run_trial(config, records.append, base_model=base)
    assert result.status == "completed" and result.quantized
    losses = [r["train_loss"] for r in records]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    after = base.state_dict()  # on an AVX512-BF16 CPU bitsandbytes would have repacked the weights at the eval
    assert all(torch.equal(after[k], before[k]) for k in before), "a base weight changed"
    reloaded = PeftModel.from_pretrained(load_base_model(config.model, tokenizer), result.adapter_dir)
    assert any("lora_A" in name for name, _ in reloaded.named_parameters())


def test_the_trial_libraries_are_imported_without_collections_and_then_frozen():
    """A fresh process imports torch, transformers, peft and trl with the collector paused, and freezes them."""
    import subprocess
    import sys

    code = (
        "import gc; from fika.trial import import_trial_libraries; "
        "runs = lambda: sum(s['collections'] for s in gc.get_stats()); before = runs(); import_trial_libraries(); "
        "print(gc.get_freeze_count(), gc.isenabled(), runs() - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    frozen, enabled, collections = out.split()
    assert int(frozen) > 100_000 and enabled == "True" and collections == "0"


def test_a_trial_runs_in_a_process_that_hides_bitsandbytes_and_wandb(tmp_path):
    """A search's CPU worker hides the libraries its trials do not use: peft, transformers and trl still train."""
    import subprocess
    import sys

    code = (
        "import sys; from fika.model import hide_libraries; from fika.config import load_config; "
        "from fika.trial import run_trial; hide_libraries(['bitsandbytes', 'wandb']); "
        "config = load_config(None, ['model.name=tiny', 'data.sources.0.limit=100', 'data.eval_size=4', "
        f"'train.max_steps=3', 'train.warmup_steps=1', 'output.dir={tmp_path / 'run'}']); "
        "print(run_trial(config, lambda record: None).status, sys.modules['bitsandbytes'], sys.modules['wandb'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-3:] == ["completed", "None", "None"]


def test_a_process_keeps_one_value_per_kind_until_the_key_changes():
    from fika.trial import kept

    loads = []
    assert kept("test", "a", lambda: loads.append("a") or 1) == 1
    assert kept("test", "a", lambda: loads.append("a again") or 2) == 1  # kept: not loaded again
    assert kept("test", "b", lambda: loads.append("b") or 3) == 3  # another key replaces it
    assert loads == ["a", "b"]


def test_a_trial_that_raises_is_recorded_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("FIKA_FAIL_AT_STEP", "3")
    config = tiny_config(tmp_path, "train.max_steps=10", "train.eval_steps=[5]")
    with pytest.raises(RuntimeError, match="out of memory"):
        run_trial(config)
    saved = json.loads((tmp_path / "trial" / "result.json").read_text())
    assert saved["status"] == "failed" and "CUDA out of memory (simulated" in saved["error"] and saved["steps"] == 2


FULL_RUN = [
    "model.name=tiny",
    "data.sources.0.limit=200",
    "data.eval_size=8",
    "train.learning_rate=3e-3",
    "train.max_steps=-1",
    "train.epochs=3",
    "train.num_evals=6",
    "train.checkpoints=true",
    "train.keep_checkpoints=2",
    "train.batch_size=4",
    "train.gradient_accumulation=1",
]


def test_a_killed_full_run_resumes_where_it_stopped(tmp_path, capsys):
    """kill -9 after the second checkpoint, `fika train --resume`: the exact step count, metrics that continue,
    and the result of an uninterrupted run of the same config. While the run is alive, a second run into its
    folder (a resume, an overwrite) is refused and changes nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fika.cli import main

    env = dict(os.environ)
    cmd = [sys.executable, "-m", "fika.cli", "train", *FULL_RUN]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "output.dir=killed"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in (killed / "checkpoints").glob("checkpoint-*") if (p / "fika_state.json").exists()]
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGSTOP)  # alive, holding its folder, writing nothing meanwhile
    files = {p: p.read_bytes() for p in sorted(killed.rglob("*")) if p.is_file()}
    for command in (["train", "--resume", str(killed)], ["train", *FULL_RUN, f"output.dir={killed}", "--overwrite"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by a training run (pid {proc.pid} on " in err[0], err
    assert {p: p.read_bytes() for p in sorted(killed.rglob("*")) if p.is_file()} == files
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists()
    elsewhere = tmp_path / "elsewhere"  # a requeued job that starts in another folder: its output.dir is relative
    elsewhere.mkdir()
    resumed = subprocess.run(
        [sys.executable, "-m", "fika.cli", "train", "--resume", str(killed)],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(elsewhere.iterdir())  # it resumed the folder it was given, and wrote nothing where it ran
    full = subprocess.run(
        [*cmd, f"output.dir={tmp_path / 'full'}"], env=env, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 0, full.stderr[-3000:]
    a = json.loads((killed / "result.json").read_text())
    b = json.loads((tmp_path / "full" / "result.json").read_text())
    assert a["resumed_from"] and a["steps"] == a["max_steps"] == b["steps"]
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, a["steps"] + 1))  # no step lost, none counted twice
    assert a["tokens_seen"] == b["tokens_seen"]
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=2e-3 if a["device"] == "cpu" else 1e-2)  # GPU: bf16
    assert sorted(a["eval_losses"]) == sorted(b["eval_losses"])
    kept = sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*"))
    assert 2 <= len(kept) <= 3  # the last two and the best by eval loss
    files = {p: p.read_bytes() for p in sorted(killed.rglob("*")) if p.is_file()}
    assert main(["train", "--resume", str(killed)]) == 0  # again, once it ended: nothing is trained or rewritten
    assert "holds a run that ended (completed); nothing to resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(killed.rglob("*")) if p.is_file()} == files


def test_a_terminated_full_run_saves_the_step_it_was_on_and_resumes_from_it(tmp_path):
    """SIGTERM (a scheduler preempting the job) between two checkpoints: the run ends after its current step with
    a checkpoint of that step, exit 143, and `--resume` ends as the uninterrupted run does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "fika.cli", "train", *FULL_RUN]
    run = tmp_path / "preempted"
    proc = subprocess.Popen([*cmd, f"output.dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and 5 <= result["steps"] < result["max_steps"]
    assert (run / "checkpoints" / f"checkpoint-{result['steps']}" / "fika_state.json").exists()
    assert not (run / "adapter").exists()
    assert "status      interrupted" in out
    assert f"stopped after step {result['steps']} of {result['max_steps']}; its checkpoint of step" in err
    assert f"`fika train --resume {run}` continues it" in err
    resumed = subprocess.run([*cmd[:4], "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = subprocess.run([*cmd, f"output.dir={tmp_path / 'full'}"], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    a = json.loads((run / "result.json").read_text())
    b = json.loads((tmp_path / "full" / "result.json").read_text())
    assert a["resumed_from"] == result["steps"] and a["status"] == "completed" and a["steps"] == b["steps"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, a["steps"] + 1))
    assert a["tokens_seen"] == b["tokens_seen"]
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=2e-3 if a["device"] == "cpu" else 1e-2)


def test_a_second_signal_or_one_before_training_stops_at_once():
    """`fika train`'s handler: the first signal during training only asks for a stop after the step."""
    import signal

    from fika.stopping import StopAfterStep, Terminated, exit_code

    stop = StopAfterStep()
    with pytest.raises(KeyboardInterrupt):  # still loading: nothing to save
        stop(signal.SIGINT, None)
    stop.training = True
    stop(signal.SIGTERM, None)
    assert stop.requested() == "SIGTERM" and exit_code(stop.requested()) == 143
    with pytest.raises(Terminated):
        stop(signal.SIGTERM, None)


@pytest.mark.slow
def test_builtin_smollm2_trains_offline_on_builtin_sharegpt(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(
        None,
        [
            "model.max_seq_length=128",
            "data.sources.0.limit=200",
            "data.eval_size=8",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.eval_steps=[4]",
            f"output.dir={tmp_path}",
        ],
    )
    records: list[dict] = []
    result = run_trial(config, records.append)
    assert result.status == "completed" and len(records) == 4
    assert 0 < result.eval_loss < 5  # a pretrained instruct model, not a random one (ln 49152 = 10.8)
    assert result.total_params > 134_000_000 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def small_llama(tmp_path) -> Path:
    """A 2-layer Llama of hidden size 256 with fika's tiny tokenizer, saved as a local model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(model_dir)
    load_tokenizer(ModelConfig(name="tiny")).save_pretrained(model_dir)
    return model_dir


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_4bit_qlora_on_the_trials_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    config = tiny_config(
        tmp_path,
        f"model.name={small_llama(tmp_path)}",
        "model.chat_template=chatml",
        "train.max_steps=6",
        "train.warmup_steps=1",
        "train.eval_steps=[6]",
        "model.load_in_4bit=auto",
    )
    base = load_base_model(config.model, load_tokenizer(config.model))
    assert base.is_loaded_in_4bit and next(base.parameters()).device == torch.device("cuda", 0)
    result = run_trial(config, base_model=base)
    assert result.status == "completed" and result.memory_kind == "gpu" and result.device == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_gpu_trial_in_one_process_reports_its_own_peak(tmp_path):
    """A large-rank trial, then a small-rank one in the same process: the second's peak is its own, not the first's.

    On an H100 the two peaks are 142.2 and 135.2 MB (LoRA r 256 against r 8 on a 2-layer, 256-wide Llama).
    """
    pytest.importorskip("bitsandbytes")
    model = [
        f"model.name={small_llama(tmp_path)}",
        "model.chat_template=chatml",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_steps=[4]",
    ]
    large = run_trial(tiny_config(tmp_path, *model, "lora.r=256", "lora.alpha=256", name="large"))
    small = run_trial(tiny_config(tmp_path, *model, "lora.r=8", "lora.alpha=8", name="small"))
    assert large.memory_kind == small.memory_kind == "gpu"
    assert large.peak_memory_mb > small.peak_memory_mb + 3, (large.peak_memory_mb, small.peak_memory_mb)

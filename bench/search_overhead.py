"""Where a search's time goes: pure training steps, evals, start-up, idle slots; fika against the usual way.

  python bench/search_overhead.py                      # the demo search (SmolLM2, 6 trials, 2 at a time)
  python bench/search_overhead.py --spec smoke         # any spec, by name or path
  python bench/search_overhead.py --naive              # then the same trials written the usual way, and the speed-up

fika's search runs as `fika search` does, its progress lines and live report included. Per trial, from its own
result.json: the pure training-step time (the optimizer steps only), the eval time, the start-up (until the first
step: tokenizer, data, base model on a fresh worker), the rest (trainer set-up, logging), and the trial's wall
time. The slot time is the fit's wall time x the trials that run at once; what no trial used of it is idle, split
into before each slot's first trial (a fresh worker's start and imports), between trials on a worker, and after a
slot's last trial (the tail, when one slot has nothing left to run). The ratio that matters: slot time / pure
step time; the floor is that ratio with only the pure steps, the evals, the workers' start and the tail.

`--naive` runs the same trials, each for the steps fika ran it, the way a user writes them from the Ray Tune and
trl docs: a function trainable (a new worker process per trial) that loads the tokenizer and the model, reads and
tokenizes the data with trl's SFTTrainer, evaluates with `trainer.evaluate` at the same steps, and reports every
step with `tune.report`. Same resources, FIFO, the same concurrency, and the same numerics as fika's CPU trials
(fp32, no gradient checkpointing: trl's defaults, bf16 and checkpointing, make a CPU step about 12x slower).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fika.files import read_json, read_jsonl
from fika.search.spec import load_spec


def trial_rows(run: Path) -> list[dict]:
    rows = []
    for folder in sorted((run / "trials").iterdir()):
        result = read_json(folder / "result.json") or {}
        records = read_jsonl(folder / "metrics.jsonl")
        if not records:
            continue
        pure = sum(r.get("step_time_s") or 0 for r in records)
        evals = sum(r.get("eval_time_s") or 0 for r in records)
        first_step = records[0].get("step_time_s") or 0
        startup = (result.get("time_to_first_step_s") or records[0]["elapsed_s"]) - first_step
        wall = result.get("wall_time_s") or records[-1]["elapsed_s"]
        rows.append(
            {
                "trial": folder.name,
                "status": result.get("status", "?"),
                "steps": records[-1]["step"],
                "pure": pure,
                "eval": evals,
                "startup": startup,
                "other": wall - pure - evals - startup,
                "wall": wall,
                "started": result.get("started_at", 0),
                "ended": result.get("ended_at", 0),
            }
        )
    return rows


def idle_parts(rows: list[dict], fit: tuple[float, float], slots: int) -> dict:
    """The idle slot time split by where it falls: before each slot's first trial (a fresh worker's start and
    imports), between two trials on a slot, and after a slot's last trial (the tail, while another slot still
    runs). Trials are put on slots in the order they started (a slot takes the next trial when its last ended)."""
    ends: list[list[float]] = []
    parts = {"before the first trial": 0.0, "between trials": 0.0, "after the last trial": 0.0}
    for row in sorted(rows, key=lambda r: r["started"]):
        free = [i for i, e in enumerate(ends) if e[-1] <= row["started"] + 0.5]
        if len(ends) < slots and not free:
            ends.append([row["ended"]])
            parts["before the first trial"] += row["started"] - fit[0]
        else:
            slot = min(free or range(len(ends)), key=lambda i: ends[i][-1])
            parts["between trials"] += max(row["started"] - ends[slot][-1], 0.0)
            ends[slot].append(row["ended"])
    parts["after the last trial"] = sum(fit[1] - e[-1] for e in ends) + (slots - len(ends)) * (fit[1] - fit[0])
    return parts


def table(title: str, rows: list[dict], fit: tuple[float, float], slots: int) -> dict:
    """Prints the per-trial table and the totals (`fit`: the fit's start and end, unix time); returns the totals."""
    fit_s = fit[1] - fit[0]
    print(f"\n{title}")
    print("| trial | status | steps | pure step s | eval s | start-up s | other s | trial wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['trial']} | {r['status']} | {r['steps']} | {r['pure']:.1f} | {r['eval']:.1f} | {r['startup']:.1f} | "
            f"{r['other']:.1f} | {r['wall']:.1f} |"
        )
    total = {k: sum(r[k] for r in rows) for k in ("steps", "pure", "eval", "startup", "other", "wall")}
    slot = fit_s * slots
    total.update(
        fit=fit_s,
        slot=slot,
        idle=slot - total["wall"],
        ratio=slot / total["pure"],
        framework=(slot - total["eval"]) / total["pure"],
    )
    print(
        f"| total | | {total['steps']} | {total['pure']:.1f} | {total['eval']:.1f} | {total['startup']:.1f} | "
        f"{total['other']:.1f} | {total['wall']:.1f} |"
    )
    print(
        f"search wall (Tune fit) {fit_s:.1f} s x {slots} slots = slot time {slot:.1f} s; idle slot time "
        f"{total['idle']:.1f} s ({100 * total['idle'] / slot:.0f}%); evals {100 * total['eval'] / slot:.0f}%"
    )
    parts = idle_parts(rows, fit, slots)
    print("idle: " + "; ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items()))
    fixed = total["eval"] + parts["before the first trial"] + parts["after the last trial"]
    floor = (total["pure"] + fixed) / total["pure"]
    print(
        f"slot time / pure step time = {total['ratio']:.3f} (without evals: {total['framework']:.3f}; "
        f"pure + evals + the workers' start + the tail alone: {floor:.3f})"
    )
    total.update(idle_parts=parts, floor=floor)
    return total


def run_fika(spec, storage: Path) -> tuple[Path, dict, float]:
    """Runs the search as `fika search` does (its progress lines and its live report too); returns its folder,
    its fit as `run.json` records it (start and end, unix time, and the trials at a time) and the seconds before
    the fit."""
    from fika.search.driver import SearchHooks, run_search
    from fika.search.progress import SearchProgress
    from fika.search.report.live import ReportRefresher
    from fika.search.run_folder import run_dir

    began = time.time()
    directory = run_dir(spec)
    refresh = ReportRefresher(directory, storage / "report")
    progress = SearchProgress(directory, spec.num_trials(), spec.metric, spec.max_steps, on_trial_end=refresh)
    run_search(spec, hooks=SearchHooks(callbacks=[progress], on_done=refresh.final))
    refresh.finish()
    fit = read_json(directory / "run.json")["fits"][-1]
    return directory, fit, fit["started_at"] - began


def naive_trainable(config: dict) -> None:
    """One trial the way the Ray Tune and trl docs show it: load, tokenize, train, evaluate, all per trial."""
    from datasets import Dataset
    from ray import tune
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fika.config import TrialConfig
    from fika.model import load_tokenizer, resolve_model_path
    from fika.sources import STANDARDIZERS, Dropped, detect_format, load_source, repair

    trial = TrialConfig.model_validate(config["trial"])
    tokenizer = load_tokenizer(trial.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(trial.model))
    source = trial.data.sources[0]
    rows, columns, _ = load_source(source)
    column, standardize = STANDARDIZERS[detect_format(columns, rows, source.path)]
    conversations = []
    for row in rows:
        try:
            conversations.append({"messages": repair(standardize(row[column]))[0]})
        except Dropped:
            continue
        if len(conversations) >= (source.limit or 10**9) + trial.data.eval_size:
            break
    data = Dataset.from_list(conversations)
    eval_data, train_data = (
        data.select(range(trial.data.eval_size)),
        data.select(range(trial.data.eval_size, len(data))),
    )
    from peft import LoraConfig

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                tune.report({"step": state.global_step, "train_loss": logs["loss"]})
            if state.global_step >= config["stop_at"]:
                control.should_training_stop = True

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            tune.report({"step": state.global_step, "eval_loss": metrics["eval_loss"]})

    t = trial.train
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=config["eval_every"],
        per_device_eval_batch_size=8,
        save_strategy="no",
        report_to="none",
        max_length=trial.model.max_seq_length,
        bf16=False,
        gradient_checkpointing=False,  # the numerics fika's CPU trials use
        assistant_only_loss=True,
        use_cpu=True,
        disable_tqdm=True,
        seed=t.seed,
    )
    peft = LoraConfig(
        r=trial.lora.r,
        lora_alpha=trial.lora.alpha,
        lora_dropout=trial.lora.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[Report()],
    )
    trainer.train()


def run_naive(spec, fika_run: Path, storage: Path, slots: int) -> tuple[Path, float]:
    """The same trials (config and the steps fika ran), written the usual way; returns the run and its fit time."""
    import yaml
    from ray import tune

    trials = []
    for folder in sorted((fika_run / "trials").iterdir()):
        result = read_json(folder / "result.json") or {}
        trials.append(
            {
                "trial": yaml.safe_load((folder / "config.yaml").read_text()),
                "name": folder.name,
                "stop_at": result.get("steps", spec.max_steps),
                "eval_every": spec.max_steps,
            }
        )
    tuner = tune.Tuner(
        tune.with_resources(naive_trainable, {"cpu": spec.resources.cpu}),
        param_space=tune.grid_search(trials),
        tune_config=tune.TuneConfig(max_concurrent_trials=slots),
        run_config=tune.RunConfig(name="naive", storage_path=str(storage), verbose=0),
    )
    started = time.perf_counter()
    tuner.fit()
    return storage / "naive", time.perf_counter() - started


def naive_rows(run: Path) -> list[dict]:
    """Per naive trial, from Tune's own result files: steps, the wall time, and the time until its first step."""
    rows = []
    for path in sorted(run.glob("*/result.json")):
        results = read_jsonl(path)
        steps = [r for r in results if "train_loss" in r]
        if not steps:
            continue
        rows.append(
            {
                "trial": results[0]["config"]["name"],
                "steps": steps[-1]["step"],
                "startup": steps[0]["time_total_s"],
                "wall": results[-1]["time_total_s"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="demo")
    parser.add_argument("--naive", action="store_true", help="also run the same trials the usual way")
    parser.add_argument("--storage", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    storage = Path(args.storage or tempfile.mkdtemp(prefix="fika-overhead-"))
    spec = load_spec(args.spec, [f"storage={storage}", f"name={Path(args.spec).stem}-overhead"])
    run, recorded, before = run_fika(spec, storage)
    fit, slots = (recorded["started_at"], recorded["ended_at"]), recorded["slots"]
    fika = table(f"fika: {spec.name} ({spec.num_trials()} trials, {slots} at a time)", trial_rows(run), fit, slots)
    print(
        f"before the fit (Ray's start, the data, the tuner): {before:.1f} s; from the spec to the fit's end "
        f"{before + fika['fit']:.1f} s"
    )
    fika.update(before_fit=before)
    summary = {"fika": fika}
    if args.naive:
        import ray

        # a local Ray started the usual way: fika's own has its workers import fika's trial libraries in advance
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        naive_run, naive_fit = run_naive(spec, run, storage, slots)
        rows = naive_rows(naive_run)
        slot = naive_fit * slots
        print(f"\nthe usual way: the same {len(rows)} trials, {sum(r['steps'] for r in rows)} steps")
        print("| trial (fika's) | steps | time to the first step s | trial wall s |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['trial']} | {r['steps']} | {r['startup']:.1f} | {r['wall']:.1f} |")
        print(
            f"search wall {naive_fit:.1f} s x {slots} slots = slot time {slot:.1f} s; slot time / fika's pure step time "
            f"= {slot / fika['pure']:.3f}; fika's speed-up: {naive_fit / fika['fit']:.2f}x"
        )
        summary["naive"] = {
            "fit": naive_fit,
            "slot": slot,
            "ratio": slot / fika["pure"],
            "speedup": naive_fit / fika["fit"],
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Every command, fed garbage: each bad input gets one line per problem naming the key, exit code 2, no
traceback, no pre-existing file changed, no Ray started, and (unless the problem is in the data itself)
nothing tokenized."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from fika.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search" / "specs" / "smoke.yaml"
TINY = ["model.name=tiny", "data.sources.0.limit=100", "data.eval_size=4"]

# (command line, regex of the one error line, reads the data?) -- the workspace's files are named in the text
CASES: list[tuple[str, str, bool]] = [
    # fika train: config files
    ("train --config missing.yaml", r"config file 'missing.yaml' not found", False),
    ("train --config binary.yaml", r"is not UTF-8 text", False),
    ("train --config utf16.yaml", r"is not UTF-8 text", False),
    ("train --config empty.yaml", r"config file 'empty.yaml' is empty", False),
    ("train --config comments.yaml", r"config file 'comments.yaml' is empty", False),
    ("train --config list.yaml", r"expected a mapping of sections, got list", False),
    ("train --config bomb.yaml", r"more than 100,000 values once YAML aliases are expanded", False),
    ("train --config duplicate.yaml", r"the key 'lora' is given twice \(line 3\)", False),
    ("train --config afolder", r"config file 'afolder' is a folder", False),
    ("train --config broken.yaml", r"config file 'broken.yaml' is not valid YAML: .*line", False),
    # fika train: overrides
    ("train lora.r=[8", r"override 'lora.r=\[8' is not valid YAML", False),
    ("train model.name=@me/model", r"override 'model.name=@me/model' is not valid YAML", False),
    ("train lora.r", r"override 'lora.r': expected key=value", False),
    ("train =5", r"override '=5': expected key=value", False),
    ("train lora..r=5", r"override 'lora..r=5': expected key=value", False),
    ("train lora.r=0", r"^lora.r: 0 is not allowed: input should be greater than 0", False),
    ("train lora.r=abc", r"^lora.r: 'abc' is not allowed: input should be a valid integer", False),
    ("train lora.r=1000000000", r"^lora.r: 1000000000 is not allowed: input should be less than or equal", False),
    ("train lora.alpha=-1", r"^lora.alpha: -1 is not allowed", False),
    ("train lora.alpha=.inf", r"^lora.alpha: inf is not allowed: input should be a finite number", False),
    ("train lora.dropout=1", r"^lora.dropout: 1 is not allowed: input should be less than 1", False),
    ("train lora.dropout=.nan", r"^lora.dropout: nan is not allowed", False),
    ("train lora.alpha_ratio=0", r"^lora.alpha_ratio: 0 is not allowed", False),
    ("train lora.target_modules=[]", r"^lora.target_modules: .*give module names", False),
    ("train lora.target_modules=5", r"^lora.target_modules: 5 is not allowed: input should be 'all-linear', or", False),
    (
        "train lora.use_rslora=maybe",
        r"^lora.use_rslora: 'maybe' is not allowed: input should be a valid boolean",
        False,
    ),
    ("train lora.rank=8", r"^lora.rank: unknown key \(allowed here: r, alpha", False),
    ("train train.learning_rate=0", r"^train.learning_rate: 0 is not allowed", False),
    (
        "train train.learning_rate=2",
        r"^train.learning_rate: 2 is not allowed: input should be less than or equal to 1",
        False,
    ),
    ("train train.learning_rate=.inf", r"^train.learning_rate: inf is not allowed", False),
    ("train train.lr_scheduler=step", r"^train.lr_scheduler: 'step' is not allowed", False),
    ("train train.num_cycles=0", r"^train.num_cycles: 0 is not allowed", False),
    ("train train.warmup_steps=-1", r"^train.warmup_steps: -1 is not allowed", False),
    ("train train.warmup_steps=60", r"^train.warmup_steps: 60 is not allowed: it must be below max_steps 60", False),
    ("train train.max_steps=0", r"^train.max_steps: 0 is not allowed: give a positive step count", False),
    ("train train.max_steps=-2", r"^train.max_steps: -2 is not allowed", False),
    ("train train.epochs=.inf", r"^train.epochs: inf is not allowed", False),
    ("train train.epochs=0", r"^train.epochs: 0 is not allowed", False),
    ("train train.batch_size=0", r"^train.batch_size: 0 is not allowed", False),
    ("train train.gradient_accumulation=0", r"^train.gradient_accumulation: 0 is not allowed", False),
    ("train train.weight_decay=.inf", r"^train.weight_decay: inf is not allowed", False),
    ("train train.weight_decay=-0.1", r"^train.weight_decay: -0.1 is not allowed", False),
    ("train train.optimizer=sgd", r"^train.optimizer: 'sgd' is not allowed", False),
    ("train train.max_grad_norm=0", r"^train.max_grad_norm: 0 is not allowed", False),
    ("train train.seed=-1", r"^train.seed: -1 is not allowed", False),
    ("train train.seed=5000000000", r"^train.seed: 5000000000 is not allowed", False),
    ("train train.eval_steps=[0]", r"^train.eval_steps: \[0\] is not allowed: eval steps must be positive", False),
    ("train train.eval_steps=[80]", r"^train.eval_steps: \[80\] is not allowed: beyond max_steps 60", False),
    ("train train.eval_steps=five", r"^train.eval_steps: 'five' is not allowed", False),
    ("train train.eval_every=0", r"^train.eval_every: 0 is not allowed", False),
    ("train train.eval_every=100", r"^train.eval_every: 100 is not allowed: beyond max_steps 60", False),
    ("train train.num_evals=0", r"^train.num_evals: 0 is not allowed", False),
    (
        "train train.eval_every=10 train.num_evals=3",
        r"^train.eval_every: give eval_every or num_evals, not both",
        False,
    ),
    ("train train.logging_steps=60", r"^train.logging_steps: 60 is not allowed: it must be below max_steps 60", False),
    ("train train.report_to=[wandb]", r"^train.report_to: wandb has no API key .* set WANDB_MODE=offline", False),
    ("train train.report_to=[neptune]", r"^train.report_to.0: 'neptune' is not allowed", False),
    ("train train.keep_checkpoints=0", r"^train.keep_checkpoints: 0 is not allowed", False),
    ("train train.lr=1e-4", r"^train.lr: unknown key \(allowed here: learning_rate, lr_scheduler", False),
    ("train optimizer.name=adam", r"^optimizer: unknown key \(allowed here: model, lora, train, data, output\)", False),
    ("train model.max_seq_length=0", r"^model.max_seq_length: 0 is not allowed", False),
    (
        "train model.load_in_4bit=maybe",
        r"^model.load_in_4bit: 'maybe' is not allowed: input should be a valid boolean.*or input should be 'auto'",
        False,
    ),
    ("train model.chat_template=alpaca", r"^model.chat_template: 'alpaca' is not allowed", False),
    ("train model.name=builtin:gpt5", r"^model.name: 'builtin:gpt5' is not a built-in model", False),
    ("train model.name=./no/such/model", r"^model.name: './no/such/model': folder not found", False),
    ("train model.name=notes.txt", r"^model.name: 'notes.txt' is a file", False),
    ("train model.name=afolder", r"^model.name: cannot load the config of 'afolder'", False),
    ("train model.name=someone/some-model", r"^model.name: cannot load the config of 'someone/some-model'", False),
    ("train model.name=", r"^model.name: None is not allowed", False),
    # fika train: data sections (the last ones have to read the data to find the problem)
    ("train data.sources=[]", r"^data.sources: \[\] is not allowed: list should have at least 1 item", False),
    (
        "train data.sources.5.limit=1",
        r"data.sources.5.limit: no list item '5' at data.sources.5 \(there are 1: sharegpt\)",
        False,
    ),
    ("train data.sources.chat.limit=1", r"no list item 'chat' at data.sources.chat \(there are 1: sharegpt\)", False),
    ("train data.sources.0.limit=-3", r"^data.sources.0.limit: -3 is not allowed", False),
    ("train data.sources.0.weight=-1", r"^data.sources.0.weight: -1 is not allowed", False),
    ("train data.sources.0.weight=.inf", r"^data.sources.0.weight: inf is not allowed", False),
    ("train data.sources.0.weight=0", r"^data.sources: every weight is 0", False),
    ("train data.sources.0.limit=0", r"^data.sources: every limit is 0", False),
    ("train data.sources.0.format=xml", r"^data.sources.0.format: 'xml' is not allowed", False),
    ("train data.sources.0.name=Bad-Name", r"^data.sources.0.name: 'Bad-Name' is not allowed", False),
    ("train data.sources.0.min_tokens=-1", r"^data.sources.0.min_tokens: -1 is not allowed", False),
    (
        "train data.sources=[{path: a.jsonl, weight: 1}, {path: b.jsonl}]",
        r"^data.sources: give a weight to every source or to none",
        False,
    ),
    ("train data.sources=[{path: a.jsonl}, {path: b/a.jsonl}]", r"^data.sources: the name 'a' is used twice", False),
    ("train data.eval_size=0", r"^data.eval_size: 0 is not allowed", False),
    ("train data.eval_size=100000000", r"^data.eval_size: 100000000 is not allowed", False),
    ("train data.seed=-1", r"^data.seed: -1 is not allowed", False),
    ("train data.overlong=cut", r"^data.overlong: 'cut' is not allowed", False),
    ("train data.min_tokens=-1", r"^data.min_tokens: -1 is not allowed", False),
    ("train data.max_tokens=0", r"^data.max_tokens: 0 is not allowed", False),
    ("train data.shuffle=true", r"^data.shuffle: unknown key \(allowed here: sources, eval_size", False),
    (
        "train data.sources.0.path=missing.jsonl",
        r"^data.sources.0.path: 'missing.jsonl' not found in /\S+ \(a local file",
        False,
    ),
    (
        "train data.sources.0.path=~/no-such-file.jsonl",
        r"^data.sources.0.path: '~/no-such-file.jsonl' not found",
        False,
    ),
    (
        "train --dry-run data.sources.0.path=./missing.jsonl",
        r"^data.sources.0.path: './missing.jsonl' not found",
        False,
    ),
    ("train data.eval_sources=[{path: gone.parquet}]", r"^data.eval_sources.0.path: 'gone.parquet' not found", False),
    (
        "train data.sources.0.path=notes.txt",
        r"^data.sources.0.path: 'notes.txt' is not allowed: unknown file type '.txt'",
        False,
    ),
    (
        "search smoke --dry-run base.data.sources.0.path=notes.txt",
        r"^base.data.sources.0.path: 'notes.txt' is not allowed: unknown file type '.txt' \(allowed: .json, .jsonl",
        False,
    ),
    (
        "train data.sources.0.path=builtin:imagenet",
        r"^data.sources.0.path: 'builtin:imagenet' is not allowed: unknown",
        False,
    ),
    ("train data.sources.0.path=afolder", r"data source '/\S+/afolder': cannot load it", True),
    (
        "train data.sources.0.path=cut.jsonl",
        r"data source '/\S+/cut.jsonl': cannot load it: line 2 is not valid JSON \(Unterminated string .* at column 16\)",
        True,
    ),
    (
        "train data.sources.0.path=array.jsonl",
        r"data source '/\S+/array.jsonl': cannot load it: line 2 is a JSON array, not a JSON object \(one conversation",
        True,
    ),
    ("train data.sources.0.path=empty.jsonl", r"data source '/\S+/empty.jsonl': the file is empty", True),
    ("train data.sources.0.path=plain.jsonl", r"unknown schema, columns \['text'\]", True),
    ("train data.sources.0.path=useless.jsonl", r"no usable conversations .* no_assistant 1", True),
    ("train data.eval_size=5000", r"^data.eval_size: 5000 is not allowed: source 'sharegpt' has only", True),
    (
        "train data.sources.0.path=two-formats.jsonl",
        r"/two-formats.jsonl': 1 of 3 rows have `conversations` and no `messages` \(two formats in one source\)",
        True,
    ),
    (
        "train data.sources.0.path=long-questions.jsonl model.max_seq_length=32",
        r"dropped: too_long 2\); too_long: longer than model.max_seq_length 32 tokens, with no answer in the first 32",
        True,
    ),
    (
        "train data.sources.0.path=repeats.jsonl data.eval_size=2",
        r"source 'repeats' has only 1 distinct usable conversations \(3 with repeats\) for its 2 eval rows",
        True,
    ),
    # fika train: outputs and flags
    ("train output.dir=notes.txt", r"^output.dir: 'notes.txt' is a file", False),
    (
        "train output.dir=afolder-with-notes --overwrite",
        r"^output.dir: 'afolder-with-notes' is not empty and holds no fika run \(it holds notes.md\); give a new",
        False,
    ),
    (
        "train output.dir=runs/smoke",
        r"^output.dir: 'runs/smoke' is not empty and holds no fika run \(it holds d",
        False,
    ),
    ("train output.dir=finished", r"^output.dir: 'finished' already holds a completed run; pass --overwrite", False),
    ("train output.save_adapter=maybe", r"^output.save_adapter: 'maybe' is not allowed", False),
    ("train --resume afolder", r"^--resume: 'afolder' holds no run to resume", False),
    ("train --resume finished lora.r=8", r"--resume DIR continues a run with its own config.yaml", False),
    ("train --bogus", r"unrecognized arguments: --bogus", False),
    ("train hello", r"override 'hello': expected key=value", False),
    # fika data
    ("data --show -3", r"argument --show: -3 is not allowed: give 0 or more", False),
    ("data --show x", r"argument --show: 'x' is not a whole number", False),
    ("data --config missing.yaml", r"config file 'missing.yaml' not found", False),
    ("data data.sources.0.limit=-3", r"^data.sources.0.limit: -3 is not allowed", False),
    ("data data.sources.0.path=/no/such/dir/", r"^data.sources.0.path: '/no/such/dir/' not found", False),
    # fika search: specs
    (
        "search no-such-spec storage=fresh",
        r"spec 'no-such-spec': no such file, and not a spec that ships with fika",
        False,
    ),
    ("search binary.yaml storage=fresh", r"is not UTF-8 text", False),
    ("search smoke storage=fresh spaces={}", r"^spaces: unknown key \(allowed here: name, base, space", False),
    (
        "search smoke storage=fresh base.data.sources.0.path=nope.jsonl",
        r"^base.data.sources.0.path: 'nope.jsonl' not f",
        False,
    ),
    (
        "search smoke --dry-run base.data.sources.0.path=nope.jsonl",
        r"^base.data.sources.0.path: 'nope.jsonl' not f",
        False,
    ),
    (
        "search smoke space.lora.dropout.choice=[]",
        r"^space.lora.dropout.choice: \[\] is not allowed: list should have at least 1 item",
        False,
    ),
    (
        "search smoke space.train.learning_rate={loguniform: [0.001, 0.0001]}",
        r"loguniform \[0.001, 0.0001\] is not allowed: low must be < high",
        False,
    ),
    ("search smoke storage=fresh space.train.learning_rate={loguniform: [0, 0.001]}", r"low must be > 0", False),
    (
        "search smoke space.train.learning_rate={choice: [0.1], uniform: [0.1, 0.2]}",
        r"give exactly one of choice, uniform, loguniform",
        False,
    ),
    ("search smoke storage=fresh metric=accuracy", r"^metric: 'accuracy' is not allowed", False),
    ("search smoke storage=fresh searcher=bayes", r"^searcher: 'bayes' is not allowed", False),
    ("search smoke storage=fresh num_samples=0", r"^num_samples: 0 is not allowed", False),
    ("search smoke storage=fresh startup_trials=-1", r"^startup_trials: -1 is not allowed", False),
    ("search smoke storage=fresh resources.gpu=2", r"^resources.gpu: 2 is not allowed: a trial runs on one GPU", False),
    ("search smoke storage=fresh resources.gpu=1", r"^resources.gpu: 1 is not allowed: this machine has no GPU", False),
    ("search smoke storage=fresh resources.cpu=0", r"^resources.cpu: 0 is not allowed", False),
    (
        "search smoke storage=fresh resources.pack=0",
        r"^resources.pack: 0 is not allowed: .*or input should be 'auto'",
        False,
    ),
    (
        "search smoke storage=fresh resources.pack=2 base.train.checkpoints=true",
        r"^resources.pack: 2 is not allowed with base.train.checkpoints \(a packed trial keeps none\)$",
        False,
    ),
    (
        "search smoke storage=fresh resources.pack=auto space.model.load_in_4bit={choice: [true, false]}",
        r"^resources.pack: auto is not allowed with a searched model key \(model.load_in_4bit\)",
        False,
    ),
    (
        "search smoke storage=refused resources.cpu=512",
        r"^resources.cpu: 512 is not allowed: this machine has \d+ CPUs",
        True,
    ),
    (
        "search smoke space.lora.dropout.choice=[0.0, 1.5]",
        r"^space.lora.dropout: lora.dropout: 1.5 is not allowed",
        False,
    ),
    (
        "search smoke space.train.lr_sched={choice: [linear]}",
        r"^space.train.lr_sched: train.lr_sched: unknown key",
        False,
    ),
    ("search smoke storage=fresh space.output.dir={choice: [a, b]}", r"output.dir cannot be searched", False),
    (
        "search smoke storage=fresh space.train.eval_steps={choice: [[4]]}",
        r"train.eval_steps cannot be searched",
        False,
    ),
    (
        "search smoke storage=fresh space.train.max_steps={choice: [-1, 12]}",
        r"train.max_steps cannot be searched",
        False,
    ),
    ("search smoke storage=fresh space.data.eval_size={choice: [4, 8]}", r"data.eval_size cannot be searched", False),
    (
        "search smoke space.lora.r={uniform: [8, 32]}",
        r"^space.lora.r: a range over an integer key is not allowed",
        False,
    ),
    (
        "search smoke space.train.batch_size={uniform: [1, 4]}",
        r"^space.train.batch_size: a range over an integer key",
        False,
    ),
    ("search smoke storage=fresh space={'lora.r,lora.r': {choice: [[8, 8]]}}", r"it names the same key twice", False),
    (
        "search smoke storage=fresh space={'lora.r,lora.alpha': {choice: [[8, 8, 8]]}}",
        r"give 2 values, one per key",
        False,
    ),
    (
        "search smoke scheduler.grace_period=12",
        r"^scheduler.grace_period: 12 is not allowed: it must be below base.train.max_steps 12",
        False,
    ),
    (
        "search smoke storage=fresh scheduler.rung_metric=accuracy",
        r"^scheduler.rung_metric: 'accuracy' is not allowed",
        False,
    ),
    (
        "search smoke scheduler.rung_eval_size=100",
        r"^scheduler.rung_eval_size: 100 is not allowed: larger than base.data.eval_size 16",
        False,
    ),
    (
        "search smoke storage=fresh scheduler.reduction_factor=1",
        r"^scheduler.reduction_factor: 1 is not allowed",
        False,
    ),
    ("search smoke storage=fresh name=bad!name", r"^name: 'bad!name' is not allowed", False),
    (
        "search smoke storage=fresh trackers=[wandb]",
        r"^trackers: wandb has no API key on this machine; run `wandb",
        False,
    ),
    ("search smoke storage=fresh trackers=[neptune]", r"^trackers.0: 'neptune' is not allowed", False),
    ("search smoke storage=fresh base.train.max_steps=-1", r"base.train.max_steps: must be > 0 in a search", False),
    ("search smoke storage=fresh base.lora.r=0", r"^base.lora.r: 0 is not allowed", False),
    (
        "search smoke base.train.warmup_steps=20",
        r"^base.train.warmup_steps: 20 is not allowed: it must be below max_steps 12",
        False,
    ),
    ("search withbase.yaml storage=fresh base.lora.r=0", r"^base.lora.r: 0 is not allowed", False),
    ("search missingbase.yaml storage=fresh", r"^base: config file .*nowhere.yaml' not found", False),
    (
        "search smoke searcher=grid space.lora.dropout={uniform: [0.0, 0.1]}",
        r"searcher: grid needs choice lists",
        False,
    ),
    # fika search: data keys in the space
    (
        "search smoke space.data.sources.nosuch.weight={choice: [1]}",
        r"no list item 'nosuch' at data.sources.nosuch \(there are 1: sharegpt\)",
        False,
    ),
    (
        "search smoke storage=fresh space.data.sources.3.limit={choice: [10]}",
        r"no list item '3' at data.sources.3",
        False,
    ),
    (
        "search smoke storage=fresh space.data.sources.0.weight={choice: [-1, 1]}",
        r"data.sources.0.weight: -1 is not allowed",
        False,
    ),
    (
        "search smoke storage=fresh space.data.sources.0.weight={choice: [0, 1]}",
        r"data.sources: every weight is 0",
        False,
    ),
    (
        "search smoke storage=fresh space.data.sources.0.limit={choice: [0, 100]}",
        r"data.sources: every limit is 0",
        False,
    ),
    (
        "search twosources.yaml",
        r"the combination data.sources.a.limit=0, data.sources.b.limit=0 is not allowed: .*every limit is 0",
        False,
    ),
    # fika search: where it runs
    ("search smoke storage=fresh optuna_storage=not-a-url", r"^optuna_storage: 'not-a-url' cannot be used", False),
    (
        "search smoke storage=fresh optuna_storage=postgresql://fika:s3cret@127.0.0.1:1/db",
        r"^optuna_storage: 'postgresql://fika:\*\*\*@127.0.0.1:1/db' cannot be used",
        False,
    ),
    ("search smoke storage=notes.txt", r"^storage: cannot create .*notes.txt/smoke", False),
    ("search smoke storage=" + "x" * 300, r"^storage: cannot use .*: File name too long", False),
    ("search smoke storage=fresh --address 127.0.0.1:1", r"^address: '127.0.0.1:1' does not answer", False),
    (
        "search smoke storage=fresh --address nonsense",
        r"^address: 'nonsense' is not allowed: give auto or HOST:PORT",
        False,
    ),
    (
        "search smoke storage=runs num_samples=9",
        r"already has a search in .* with another spec \(num_samples 8 -> 9\)",
        False,
    ),
    ("search smoke storage=runs report_dir=notes.txt", r"^report: notes.txt is a file", False),
    # fika report and confirm
    ("report nowhere", r"nowhere: not a search folder \(no spec.yaml\)", False),
    ("report notes.txt", r"notes.txt: not a search folder", False),
    ("report runs/smoke --out notes.txt", r"^report: notes.txt is a file", False),
    (
        "report runs/smoke --out afolder-with-notes",
        r"^report: afolder-with-notes exists and is not a fika report",
        False,
    ),
    ("report corrupt", r"corrupt/spec.yaml: not a spec this fika can read", False),
    ("confirm runs/smoke --top 0", r"argument --top: 0 is not allowed: give 1 or more", False),
    ("confirm runs/smoke --top -1", r"argument --top: -1 is not allowed", False),
    ("confirm runs/smoke --steps 5", r"^--steps: 5 is not allowed: give more than the search's 12 steps", False),
    ("confirm runs/smoke --seeds 0", r"^--seeds: 0 is not allowed without --steps", False),
    (
        "confirm runs/cut --top 1 --seeds 1",
        r"^runs/cut: the search was interrupted; .*`fika search runs/cut/spec.yaml --resume` finishes it first",
        False,
    ),
    ("confirm nowhere", r"nowhere: not a search folder", False),
    (
        "confirm runs/smoke --trials nosuch --seeds 1",
        r"^--trials: nosuch is not a completed trial of the search",
        False,
    ),
    # fika space, export, push
    ("space --port 99999", r"argument --port: 99999 is not allowed: give 1 to 65535", False),
    ("space --port 0", r"argument --port: 0 is not allowed", False),
    ("space --adapter no-such-adapter", r"^--adapter: no-such-adapter not found", False),
    ("space --adapter afolder", r"^--adapter: afolder is not a LoRA adapter folder", False),
    (
        "space --adapter finished",
        r"^--adapter: finished is not a LoRA .*; the run's adapter is finished/adapter$",
        False,
    ),
    ("space --adapter nosection", r"^--adapter: nosection/fika.yaml cannot be read: it has no `model` section", False),
    ("space --adapter adapter --report afolder", r"^--report: afolder is not a search report folder", False),
    ("space --report afolder", r"^--report: afolder is not a search report folder", False),
    ("space", r"^--adapter: no adapter given", False),
    ("space export --adapter adapter", r"--out DIR is required", False),
    (
        "space export --adapter adapter --out afolder-with-notes",
        r"^--out: afolder-with-notes exists and is not an empty folder",
        False,
    ),
    ("space export --adapter adapter --out notes.txt", r"^--out: notes.txt exists and is not an empty folder", False),
    ("space export --adapter afolder --out new-space", r"^--adapter: afolder is not a LoRA adapter folder", False),
    (
        "space export --adapter adapter --report afolder --out new-space",
        r"^--report: afolder is not a search report folder",
        False,
    ),
    ("push adapter --repo not/a/repo", r"^--repo: 'not/a/repo' is not allowed: give USER/NAME", False),
    ("push afolder --repo me/model", r"^afolder is not a LoRA adapter folder \(no adapter_config.json\)$", False),
    ("push finished --repo me/model", r"^finished is not a LoRA .*; the run's adapter is finished/adapter$", False),
    ("push adapter --repo me/model", r"no Hugging Face token: set HF_TOKEN or run `hf auth login`", False),
    (
        "push adapter --repo me/model --report afolder --dry-run",
        r"^--report: afolder is not a fika report folder",
        False,
    ),
    (
        "space export --adapter adapter --base builtin:nope --out new-space",
        r"^model.name: 'builtin:nope' is not a built-in model",
        False,
    ),
    (
        "space export --adapter adapter --base builtin:smollm2-135m-instruct --out new-space",
        r"^--adapter: adapter does not fit the base model 'builtin:smollm2-135m-instruct': its layer .* is 1536 x 576 there",
        False,
    ),
    (  # fika space refuses the same Space the export refuses
        "space --adapter adapter --base builtin:smollm2-135m-instruct",
        r"^--adapter: adapter does not fit the base model 'builtin:smollm2-135m-instruct'",
        False,
    ),
    # the dry run refuses what the real run refuses, with the same line
    (
        "search smoke storage=fresh optuna_storage=not-a-url --dry-run",
        r"^optuna_storage: 'not-a-url' cannot be used",
        False,
    ),
    ("search smoke storage=fresh --address nonsense --dry-run", r"^address: 'nonsense' is not allowed", False),
    (
        "search smoke storage=notes.txt --dry-run",
        r"^storage: cannot create .*notes.txt/smoke: .*notes.txt is a file",
        False,
    ),
    (
        "search smoke storage=fresh space.data.sources.0.path={choice: [builtin:sharegpt, nope.jsonl]} --dry-run",
        r"^space.data.sources.0.path: data.sources.0.path: 'nope.jsonl' not found in ",
        False,
    ),
    (
        "search smoke storage=fresh space.data.sources.0.path={choice: [builtin:sharegpt, nope.jsonl]}",
        r"^space.data.sources.0.path: data.sources.0.path: 'nope.jsonl' not found in ",
        False,
    ),
    (
        "search smoke storage=fresh resources.gpu=1 --dry-run",
        r"^resources.gpu: 1 is not allowed: this machine has no GPU",
        False,
    ),
    (
        "data data.sources.0.path=notgzip.jsonl.gz",
        r"^data source .*notgzip.jsonl.gz.*: cannot load it: it cannot be read as gzip",
        False,
    ),
    (
        "train model.name=no-tokenizer",
        r"^model.name: 'no-tokenizer' holds no tokenizer \(none of tokenizer.json, ",
        False,
    ),
    (
        "search empty.yaml",
        r"^config file 'empty.yaml' is empty; give a search spec: at least name, base and space$",
        False,
    ),
    ("report invalid-spec", r"spec.yaml: not a spec this fika can read \(num_samples: 0 is not allowed", False),
    (
        "report runs/smoke --out old-report",
        r"^report: old-report holds a report without report.json \(an older fika",
        False,
    ),
    ("bogus", r"invalid choice: 'bogus'", False),
]


def workspace_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smoke_report, tiny_adapter):
    root = tmp_path_factory.mktemp("workspace")
    (root / "binary.yaml").write_bytes(bytes(range(256)))
    (root / "utf16.yaml").write_bytes("model: {name: tiny}\n".encode("utf-16"))
    (root / "empty.yaml").write_text("")
    (root / "comments.yaml").write_text("# only a comment\n\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "bomb.yaml").write_text(
        "a: &a [1,1,1,1,1,1,1,1,1]\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcde", "bcdef", strict=True))
    )
    (root / "duplicate.yaml").write_text("lora:\n  r: 8\nlora:\n  r: 16\n")
    (root / "broken.yaml").write_text("model:\n  name: [tiny\n")
    (root / "afolder").mkdir()
    (root / "afolder-with-notes").mkdir()
    (root / "afolder-with-notes" / "notes.md").write_text("mine\n")
    (root / "notes.txt").write_text("notes\n")
    (root / "cut.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"ro\n')
    (root / "empty.jsonl").write_text("")
    (root / "array.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n[1, 2]\n")
    (root / "plain.jsonl").write_text(json.dumps({"text": "just text"}) + "\n")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (root / "repeats.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]}
    (root / "two-formats.jsonl").write_text(
        json.dumps(chat) + "\n" + json.dumps(sharegpt) + "\n" + json.dumps(chat) + "\n"
    )
    long = {"messages": [{"role": "user", "content": "why " * 40}, {"role": "assistant", "content": "because"}]}
    (root / "long-questions.jsonl").write_text(json.dumps(long) + "\n" + json.dumps(long) + "\n")
    (root / "useless.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hm"}]}) + "\n")
    (root / "withbase.yaml").write_text(yaml.safe_dump({**yaml.safe_load(SMOKE.read_text()), "base": "trial.yaml"}))
    (root / "trial.yaml").write_text(
        yaml.safe_dump({"model": {"name": "tiny"}, "train": {"max_steps": 12, "warmup_steps": 1}})
    )
    (root / "missingbase.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load(SMOKE.read_text()), "base": "nowhere.yaml"})
    )
    two = yaml.safe_load(SMOKE.read_text())
    two["base"]["data"] = {
        "sources": [{"path": "x.jsonl", "name": "a", "limit": 5}, {"path": "y.jsonl", "name": "b", "limit": 5}]
    }
    two["space"] = {"data.sources.a.limit": {"choice": [0, 5]}, "data.sources.b.limit": {"choice": [0, 5]}}
    (root / "twosources.yaml").write_text(yaml.safe_dump(two))
    run, report = smoke_report
    shutil.copytree(run, root / "runs" / "smoke", ignore=shutil.ignore_patterns("tune", "tune-confirm"))
    shutil.copytree(run, root / "runs" / "cut", ignore=shutil.ignore_patterns("tune", "tune-confirm"))
    info = json.loads((root / "runs" / "cut" / "run.json").read_text())  # a search whose driver was killed
    (root / "runs" / "cut" / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "finished_at"}))
    (root / "runs" / "cut" / ".fika.lock").unlink()  # it names this process (the fixture's confirm ran in it)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "spec.yaml").write_text("name: [unclosed\n")
    shutil.copytree(tiny_adapter, root / "adapter")
    (root / "nosection").mkdir()
    shutil.copy(tiny_adapter / "adapter_config.json", root / "nosection")
    (root / "nosection" / "fika.yaml").write_text("train: {max_steps: 5}\n")
    finished = root / "finished"
    shutil.copytree(tiny_adapter.parent, finished)
    (root / "notgzip.jsonl.gz").write_text(json.dumps(chat) + "\n")
    (root / "no-tokenizer").mkdir()
    from fika.model import tiny_llama_config

    tiny_llama_config(300).save_pretrained(root / "no-tokenizer")  # a model's config, no tokenizer files
    (root / "invalid-spec").mkdir()
    (root / "invalid-spec" / "spec.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load(SMOKE.read_text()), "num_samples": 0})
    )
    (root / "old-report").mkdir()
    for name in ("index.md", "trials.csv", "best.yaml"):  # an older fika's report: no report.json
        shutil.copy(report / name, root / "old-report" / name)
    return root


@pytest.mark.parametrize(("command", "message", "reads_data"), CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input_is_one_clear_line(workspace, monkeypatch, capsys, fika_cache, command, message, reads_data):
    import ray

    monkeypatch.chdir(workspace)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(workspace.parent / "hf-home"))
    for name in ("WANDB_API_KEY", "WANDB_MODE"):  # a machine without a W&B login
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(workspace / "no-netrc"))
    args = split_keeping_yaml(command)
    if args[0] in ("train", "data") and not any(a.startswith(("--config", "--resume")) for a in args):
        args = [args[0], *TINY, *args[1:]]  # the tiny model and a little data; the case's own keys come last
    builds = fika_cache / "data" / "builds.log"
    built_before = builds.read_text() if builds.exists() else ""
    before = workspace_files(workspace)
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]  # progress lines are not errors
    assert code == 2, (args, captured.err[-2000:])
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"fika {args[0]}: error: ") or errors[0].startswith("fika: error: "), errors
    assert re.search(message, errors[0].split(": error: ", 1)[1]), errors[0]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert "s3cret" not in captured.err + captured.out
    assert workspace_files(workspace) == before, "a pre-existing file changed"
    assert not ray.is_initialized()
    if not reads_data:
        assert (builds.read_text() if builds.exists() else "") == built_before, "data were tokenized"


def split_keeping_yaml(command: str) -> list[str]:
    """Splits on spaces outside YAML brackets (`space.x={choice: [1, 2]}` stays one argument)."""
    args, depth, current = [], 0, ""
    for char in command:
        depth += char in "[{"
        depth -= char in "]}"
        if char == " " and depth == 0:
            args.append(current)
            current = ""
        else:
            current += char
    return [*args, current] if current else args


def test_there_are_more_than_a_hundred_cases_over_every_command():
    from fika.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    assert len(CASES) >= 100
    assert commands <= {c[0].split(" ")[0] for c in CASES}


@pytest.mark.parametrize("command", ["data", "train", "search smoke storage=fresh"])
def test_a_cache_that_cannot_be_written_is_one_line(workspace, monkeypatch, capsys, command):
    """FIKA_CACHE naming a file: one line naming it, exit 2, nothing left behind (no run folder, no search)."""
    import ray

    monkeypatch.chdir(workspace)
    monkeypatch.setenv("FIKA_CACHE", str(workspace / "notes.txt"))
    args = command.split()
    if args[0] in ("train", "data"):
        args = [args[0], *TINY, "output.dir=cacheless"] if args[0] == "train" else [args[0], *TINY]
    before = workspace_files(workspace)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1 and re.search(r"FIKA_CACHE: cannot write fika's cache in .*notes.txt \(.*is a file\)", err[0])
    assert workspace_files(workspace) == before
    assert not (workspace / "cacheless").exists() and not (workspace / "fresh").exists()
    assert not ray.is_initialized()


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of a given size (tmpfs), resizable: `disk, resize = small_disk; resize("300k")`."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()

    def resize(size: str) -> None:
        mounted = os.path.ismount(disk)
        options = f"remount,size={size}" if mounted else f"size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True)
        if done.returncode != 0 and not mounted:
            pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")
        assert done.returncode == 0, done.stderr.decode()

    yield disk, resize
    if os.path.ismount(disk):
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_the_run_goes_on_after_it(small_disk, monkeypatch, capsys, fika_cache):
    """A disk that fills up while a run or a search writes: one line naming the key and the folder (no traceback,
    exit 2), no half-written adapter; with space again, --overwrite reruns the run and --resume ends the search."""
    disk, resize = small_disk
    resize("300k")  # the data and the steps fit; an adapter of rank 64 (512 KB) does not
    run = ["train", *TINY, "train.max_steps=6", "train.warmup_steps=1", "lora.r=64", f"output.dir={disk / 'run'}"]
    assert main(run) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert errors == [
        f"fika train: error: output.dir: cannot write into {disk / 'run'} (No space left on device); "
        "what was written before is kept there; free space or pick another output.dir, then run it "
        "again (--overwrite replaces it)"
    ]
    assert "Traceback" not in captured.err
    assert json.loads((disk / "run" / "result.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (disk / "run").iterdir()) == [
        ".fika.lock",
        "config.yaml",
        "data.json",
        "evals.jsonl",
        "metrics.jsonl",
        "result.json",
    ]
    resize("8M")
    assert main([*run, "--overwrite"]) == 0
    assert (disk / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert not list((disk / "run").glob(".adapter.*"))

    shutil.rmtree(disk / "run")
    resize("250k")  # a search whose storage fills up: while its trials write, or while its report does
    search = ["search", str(SMOKE), "num_samples=4", f"storage={disk}", f"report_dir={disk / 'report'}"]
    assert main(search) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.match(
        rf"fika search: error: (storage: cannot write into {re.escape(str(disk / 'smoke'))} \(No space left on "
        rf"device\)|report: {re.escape(str(disk / 'report'))} could not be written)",
        errors[0],
    ), errors
    resize("16M")
    with open(disk / "smoke" / "optuna.journal", "ab") as journal:  # as when the disk filled mid-append
        journal.write(b'{"op_code": 7, "worker_id": "w", "tri')
    assert main([*search, "--resume"]) == 0
    results = [json.loads(p.read_text()) for p in (disk / "smoke" / "trials").glob("*/result.json")]
    assert len(results) == 4 and {r["status"] for r in results} <= {"completed", "stopped", "failed"}
    for result in results:  # a trial that failed says why: the full disk, or the driver's end before Ray recorded it
        assert result["status"] != "failed" or re.search("No space left on device|^interrupted: ", result["error"])
    assert (disk / "report" / "report.json").exists()

    monkeypatch.setenv("FIKA_CACHE", str(disk / "cache"))  # a cache whose disk is full: tokenizing, converting
    shutil.rmtree(disk / "smoke")
    shutil.rmtree(disk / "report")
    resize("100k")
    for command in (["data", *TINY], ["train", *TINY, f"output.dir={disk / 'cacheless'}"]):
        assert main(command) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert errors == [
            f"fika {command[0]}: error: FIKA_CACHE: cannot write fika's cache in {disk / 'cache'} (No "
            "space left on device); free space there or set FIKA_CACHE to a folder on another disk"
        ]
        assert not list((disk / "cache").rglob("*.tmp")) and not (disk / "cacheless").exists()


def test_a_model_whose_weights_are_cut_short_is_one_line(tmp_path, monkeypatch, capsys, fika_cache):
    """A local model folder whose weights file was cut short (an interrupted copy): one line naming model.name
    and the file's problem, exit 2, the run recorded as failed."""
    from fika.model import build_tiny_tokenizer, tiny_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    build_tiny_tokenizer().save_pretrained(model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"model.name={model}",
                *TINY[1:],
                "train.max_steps=2",
                "train.warmup_steps=0",
                f"output.dir={out}",
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert errors == [
        f"fika train: error: model.name: cannot load the model of {str(model)!r}: Error while "
        "deserializing header: incomplete metadata, file not fully covered"
    ], errors
    assert "Traceback" not in captured.err
    assert json.loads((out / "result.json").read_text())["status"] == "failed"

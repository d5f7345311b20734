"""The data mix: standardizers, format detection, filters, split, labels, the tokenized cache."""

from __future__ import annotations

import json

import pytest

from fika.chat_tokens import assistant_turns, chat_tokens, fit_to_length
from fika.config import DataConfig, DataSource
from fika.data import DROP_REASONS, prepare_data, weighted_take
from fika.source_cache import ROWS_FILE, load_rows, read_source
from fika.source_rows import open_source
from fika.sources import (
    STANDARDIZERS,
    DataError,
    Dropped,
    detect_format,
    load_source,
    read_sharegpt_v3,
    repair,
    resolve_local_paths,
    standardize_messages,
    standardize_sharegpt,
    standardize_sharegpt_english,
)

from .conftest import FINETOME_ROWS, SHAREGPT_ENGLISH_ROWS, ULTRACHAT_ROWS


def mix_config(*paths, **kwargs) -> DataConfig:
    kwargs.setdefault("eval_size", 2)
    return DataConfig(sources=[DataSource(path=str(p)) for p in paths], **kwargs)


def test_standardize_sharegpt_maps_every_assistant_name():
    turns = [
        {"from": "system", "value": "Be terse."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "And?"},
        {"from": "chatgpt", "value": "a"},
        {"from": "bing", "value": "b"},
        {"from": "bard", "value": "c"},
    ]
    roles = [m["role"] for m in standardize_sharegpt(turns)]
    assert roles == ["system", "user", "assistant", "user", "assistant", "assistant", "assistant"]
    assert standardize_sharegpt(turns)[2] == {"role": "assistant", "content": "Hello"}


def test_standardize_sharegpt_english_and_messages():
    assert standardize_sharegpt_english(SHAREGPT_ENGLISH_ROWS[0]["conversations"]) == [
        {"role": "user", "content": "What is the capital of Australia?"},
        {"role": "assistant", "content": SHAREGPT_ENGLISH_ROWS[0]["conversations"][1]["text"]},
    ]
    assert standardize_messages(ULTRACHAT_ROWS[0]["messages"]) == ULTRACHAT_ROWS[0]["messages"]


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        (None, "empty"),
        ("not a list", "malformed"),
        ([{"from": "human", "value": ["a", "list"]}], "malformed"),
        (["a string turn"], "malformed"),
        ([{"from": "tool", "value": "x"}], "unknown_role"),
    ],
)
def test_standardize_rejects_broken_turns(turns, reason):
    with pytest.raises(Dropped) as drop:
        standardize_sharegpt(turns)
    assert drop.value.reason == reason


def test_repair_merges_trims_and_rejects():
    fixed, changed = repair(
        [
            {"role": "assistant", "content": "stray"},
            {"role": "user", "content": "a "},
            {"role": "user", "content": "b"},
            {"role": "system", "content": "late system"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "dangling"},
        ]
    )
    assert changed
    assert fixed == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]
    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert repair(ok) == (ok, False)
    for messages, reason in [
        ([{"role": "user", "content": " "}], "empty"),
        ([{"role": "user", "content": "only a question"}], "no_assistant"),
    ]:
        with pytest.raises(Dropped) as drop:
            repair(messages)
        assert drop.value.reason == reason


def test_detect_format_from_columns(data_files):
    expected = {"finetome": "sharegpt", "sharegpt_english": "sharegpt_english", "ultrachat": "messages"}
    for name, fmt in expected.items():
        rows, columns, _ = load_source(DataSource(path=str(data_files[name])))
        assert detect_format(columns, rows, name) == fmt
    with pytest.raises(DataError, match=r"unknown schema, columns \['text'\]"):
        detect_format(["text"], [{"text": "x"}], "plain.jsonl")
    with pytest.raises(DataError, match=r"unknown turn keys \['speaker', 'words'\]"):
        detect_format(["conversations"], [{"conversations": [{"speaker": "a", "words": "b"}]}], "odd.jsonl")


def test_read_sharegpt_v3_survives_a_truncated_file(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)]
    full = json.dumps(records)
    path = tmp_path / "cut.json"
    path.write_text(full[: len(full) - 20])  # cut inside the last record
    rows, note = read_sharegpt_v3(path)
    assert [r["id"] for r in rows] == ["0", "1"]
    assert "2 complete records" in note
    path.write_text(full)
    assert read_sharegpt_v3(path) == (records, "")


def test_builtin_sharegpt_reads_every_complete_record():
    rows, columns, note = load_source(DataSource(path="builtin:sharegpt"))
    assert len(rows) == 17_671  # the packaged file is cut at 125 MB
    assert "conversations" in columns and "17,671 complete records" in note


def test_ultrachat_survives_a_mix_with_finetome(data_files, tiny_tokenizer):
    """The lab's trap: ultrachat has `messages`, not `conversations`; standardizing first keeps it."""
    mix = prepare_data(mix_config(data_files["finetome"], data_files["ultrachat"]), tiny_tokenizer, 512)
    assert [s.format for s in mix.sources] == ["sharegpt", "messages"]
    assert [s.eval + s.train for s in mix.sources] == [len(FINETOME_ROWS), len(ULTRACHAT_ROWS)]
    assert set(mix.eval["source"]) == {"finetome", "ultrachat_train_sft"}  # stratified: one per source
    assert len(mix.train) + len(mix.eval) == len(FINETOME_ROWS) + len(ULTRACHAT_ROWS)


def test_drop_counts_add_up_with_a_reason_each(data_files, tiny_tokenizer):
    mix = prepare_data(
        mix_config(data_files["messy"], data_files["sharegpt_english"], eval_size=1), tiny_tokenizer, 256
    )
    messy = mix.sources[0]
    assert {k: v for k, v in messy.dropped.items() if v} == {
        "unknown_role": 1,
        "empty": 2,
        "no_assistant": 1,
        "too_long": 1,
        "duplicate": 1,
    }
    assert messy.eval + messy.train == 3 and messy.repaired + (messy.eval and 0) >= 0
    for s in mix.sources:
        assert s.rows_in == sum(s.dropped.values()) + s.eval + s.train + s.unused
    assert sum(s.train for s in mix.sources) == len(mix.train) and sum(s.eval for s in mix.sources) == len(mix.eval)
    assert set(messy.dropped) == set(DROP_REASONS)


def test_seed_fixes_the_order_and_eval_is_disjoint(data_files, tiny_tokenizer):
    files = (data_files["finetome"], data_files["sharegpt_english"], data_files["ultrachat"])

    def run(seed):
        mix = prepare_data(mix_config(*files, seed=seed, eval_size=3), tiny_tokenizer, 512)
        return [tuple(x) for x in mix.train["input_ids"]], list(mix.eval["id"])

    train_a, eval_a = run(1)
    assert run(1) == (train_a, eval_a)
    assert len(eval_a) == 3
    orders = {tuple(run(seed)[0]) for seed in range(2, 7)}
    assert len(orders | {tuple(train_a)}) > 1


def test_the_eval_set_does_not_depend_on_limits_weights_or_filters(data_files, tiny_tokenizer):
    files = (data_files["finetome"], data_files["sharegpt_english"], data_files["ultrachat"])
    base = mix_config(*files, eval_size=3)
    variants = [
        base.model_copy(
            update={
                "sources": [
                    s.model_copy(update={"limit": 1, "weight": w}) for s, w in zip(base.sources, [1, 0, 2], strict=True)
                ]
            }
        ),
        base.model_copy(update={"min_tokens": 80, "dedupe": False}),
        base.model_copy(
            update={
                "sources": [s.model_copy(update={"weight": w}) for s, w in zip(base.sources, [0, 0, 1], strict=True)]
            }
        ),
    ]
    reference = prepare_data(base, tiny_tokenizer, 512)
    for config in variants:
        mix = prepare_data(config, tiny_tokenizer, 512)
        assert list(mix.eval["id"]) == list(reference.eval["id"])
        assert not set(map(tuple, mix.train["input_ids"])) & set(map(tuple, mix.eval["input_ids"]))
    left_out = prepare_data(variants[2], tiny_tokenizer, 512)  # weight 0: the source trains on nothing
    assert [s.train for s in left_out.sources][:2] == [0, 0] and left_out.sources[2].train > 0


def test_filters_drop_by_reason_and_count(data_files, tiny_tokenizer):
    files = (data_files["finetome"], data_files["ultrachat"])
    plain = prepare_data(mix_config(*files, eval_size=2), tiny_tokenizer, 512)
    lengths = sorted(len(ids) for ids in plain.train["input_ids"])
    cut = lengths[len(lengths) // 2]
    config = mix_config(*files, eval_size=2, min_tokens=cut, min_assistant_turns=2)
    mix = prepare_data(config, tiny_tokenizer, 512)
    dropped = {r: sum(s.dropped[r] for s in mix.sources) for r in ("under_min_tokens", "few_assistant_turns")}
    assert dropped["under_min_tokens"] > 0 and dropped["few_assistant_turns"] >= 0
    assert all(len(ids) >= cut for ids in mix.train["input_ids"])
    own = config.model_copy(
        update={
            "sources": [
                config.sources[0],
                config.sources[1].model_copy(update={"min_tokens": 0, "min_assistant_turns": 0}),
            ]
        }
    )
    assert (
        prepare_data(own, tiny_tokenizer, 512).sources[1].train == plain.sources[1].train
    )  # a source's own filters win


def test_sources_are_named_and_searchable_by_name(data_files):
    from fika.config import build_config

    raw = {
        "model": {"name": "tiny"},
        "data": {
            "sources": [
                {"path": str(data_files["finetome"])},
                {"path": str(data_files["ultrachat"]), "name": "ultrachat"},
            ]
        },
    }
    config = build_config(raw, ["data.sources.ultrachat.weight=0", "data.sources.finetome.weight=2"])
    assert [s.weight for s in config.data.sources] == [2, 0]
    assert config.data.source_names() == ["finetome", "ultrachat"]
    from fika.config import ConfigError

    with pytest.raises(ConfigError, match=r"no list item 'sharegpt' .* \(there are 2: finetome, ultrachat\)"):
        build_config(raw, ["data.sources.sharegpt.weight=1"])


def test_eval_sources_hold_out_their_own_set(data_files, tiny_tokenizer):
    config = DataConfig(
        sources=[DataSource(path=str(data_files["finetome"]))],
        eval_sources=[DataSource(path=str(data_files["ultrachat"]))],
        eval_size=2,
    )
    mix = prepare_data(config, tiny_tokenizer, 512)
    assert set(mix.eval["source"]) == {"ultrachat_train_sft"} and len(mix.eval) == 2
    assert mix.sources[0].train == len(FINETOME_ROWS) and mix.sources[0].eval == 0


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, overlong: str) -> tuple[dict, bool]:
    return fit_to_length(*chat_tokens(tokenizer, [messages], max_length + 1)[0], max_length, overlong)


def test_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    messages = standardize_sharegpt(FINETOME_ROWS[1]["conversations"])
    example, truncated = tokenize_conversation(tiny_tokenizer, messages, 4096, "truncate")
    assert not truncated
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert tiny_tokenizer.decode(trained) == expected
    assert all(label in (-100, t) for t, label in zip(example["input_ids"], example["labels"], strict=True))


def test_overlong_conversations_are_cut_after_a_whole_assistant_turn(tiny_tokenizer):
    messages = standardize_sharegpt(FINETOME_ROWS[1]["conversations"])
    full, _ = tokenize_conversation(tiny_tokenizer, messages, 4096, "truncate")
    first_two_turns, _ = tokenize_conversation(tiny_tokenizer, messages[:3], 4096, "truncate")
    cut, truncated = tokenize_conversation(tiny_tokenizer, messages, len(full["input_ids"]) - 5, "truncate")
    assert truncated
    # The second reply no longer fits: the cut falls right after the first reply's end-of-turn token.
    assert cut["input_ids"] == first_two_turns["input_ids"][: len(cut["input_ids"])]
    assert tiny_tokenizer.decode(cut["input_ids"]).endswith("<|im_end|>")
    with pytest.raises(Dropped, match="too_long"):
        tokenize_conversation(tiny_tokenizer, messages, len(full["input_ids"]) - 5, "drop")
    with pytest.raises(Dropped, match="too_long"):
        tokenize_conversation(tiny_tokenizer, messages, 20, "truncate")  # not one assistant token fits


def read_rows(source: DataSource, tokenizer, max_length: int, overlong: str, need: int | None, folder):
    """`read_source`'s rows (written to an Arrow file in `folder`, memory-mapped) and how it read them."""
    meta = read_source(open_source(source, 0), tokenizer, max_length, overlong, need, folder / ROWS_FILE)
    return load_rows(folder), meta


def one_at_a_time(source: DataSource, tokenizer, max_length: int, overlong: str, need: int | None) -> list[tuple]:
    """What `read_source` must keep: each row of the seeded order encoded whole, on its own, until `need` are kept."""
    import random

    rows, _, _ = load_source(source)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    kept, read = [], 0
    for i in order:
        if need is not None and sum(len(row) > 2 for row in kept) >= need:
            break
        read += 1
        try:
            messages, _ = repair(STANDARDIZERS["sharegpt"][1](rows[i]["conversations"]))
            full = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
            example, truncated = fit_to_length(full["input_ids"], full["assistant_masks"], max_length, overlong)
        except Dropped as drop:
            kept.append((read, drop.reason))
            continue
        kept.append((read, example["input_ids"], example["labels"], truncated, assistant_turns(example["labels"])))
    return kept


@pytest.mark.parametrize(
    ("path", "max_length", "overlong", "need"),
    [
        ("messy", 256, "truncate", None),
        ("builtin:sharegpt", 128, "truncate", 150),
        ("builtin:sharegpt", 2048, "drop", 10),
    ],
)
def test_batched_tokenizing_keeps_what_one_at_a_time_keeps(
    data_files, tiny_tokenizer, tmp_path, path, max_length, overlong, need
):
    source = DataSource(path=str(data_files.get(path, path)))
    rows, meta = read_rows(source, tiny_tokenizer, max_length, overlong, need, tmp_path)
    got = sorted(
        [(r["read_pos"], r["input_ids"], r["labels"], r["truncated"], r["n_assistant"]) for r in rows] + meta["drops"]
    )
    assert got == one_at_a_time(source, tiny_tokenizer, max_length, overlong, need)
    assert meta["rows_read"] == len(got) and meta["usable"] == len(rows) > 0


def test_a_template_error_names_the_conversation_not_the_batch(data_files, tiny_tokenizer, tmp_path):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'Canberra' in m['content'] %}{{ raise_exception('no capitals: ' + m['content'][:20]) }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    with pytest.raises(Exception, match="no capitals: Canberra. Many peop"):
        read_rows(DataSource(path=str(data_files["sharegpt_english"])), tokenizer, 256, "truncate", None, tmp_path)


def test_weights_set_the_shares_of_the_training_mix():
    assert weighted_take([100, 100], None) == [100, 100]
    assert weighted_take([100, 30], [1, 1]) == [30, 30]
    assert weighted_take([100, 100], [3, 1]) == [100, 33]
    assert weighted_take([100, 100], [0, 1]) == [0, 100]  # weight 0 leaves the source out


def test_limits_and_weights_in_a_real_mix(data_files, tiny_tokenizer):
    config = DataConfig(
        sources=[
            DataSource(path=str(data_files["finetome"]), limit=2, weight=1),
            DataSource(path=str(data_files["ultrachat"]), weight=1),
        ],
        eval_size=2,
    )
    mix = prepare_data(config, tiny_tokenizer, 512)
    finetome, ultrachat = mix.sources
    assert finetome.eval == 1 and finetome.train + finetome.unused == 2  # the limit counts training candidates
    assert finetome.train == ultrachat.train  # equal weights: equal shares
    assert sum(s.unused for s in mix.sources) == 2 + 2 - len(mix.train)


def test_each_source_is_tokenized_once_and_rebuilt_when_an_input_changes(
    data_files, tiny_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("FIKA_CACHE", str(tmp_path / "cache"))
    config = mix_config(data_files["finetome"], data_files["ultrachat"])

    def builds() -> int:
        log = tmp_path / "cache" / "data" / "builds.log"
        return len(log.read_text().splitlines()) if log.exists() else 0

    first = prepare_data(config, tiny_tokenizer, 512)
    assert builds() == 2
    second = prepare_data(
        config.model_copy(
            update={"min_tokens": 10, "sources": [s.model_copy(update={"weight": 1}) for s in config.sources]}
        ),
        tiny_tokenizer,
        512,
    )
    assert builds() == 2  # filters and weights select from the caches: nothing is tokenized again
    assert list(second.eval["id"]) == list(first.eval["id"])
    prepare_data(mix_config(data_files["finetome"], data_files["ultrachat"], seed=7), tiny_tokenizer, 512)
    prepare_data(config, tiny_tokenizer, 128)
    assert builds() == 6  # a new seed or length re-reads both sources
    data_files["ultrachat"].write_text(data_files["ultrachat"].read_text().replace("51.", "Fifty-one."))
    prepare_data(config, tiny_tokenizer, 512)
    assert builds() == 7  # only the changed file


BUILD_SCRIPT = """
import json, sys, time
from fika.config import DataConfig, DataSource, ModelConfig
from fika.data import prepare_data
from fika.model import load_tokenizer
import fika.source_cache as source_cache
original = source_cache.read_source
def slow(*args, **kwargs):
    time.sleep(2)  # hold the lock long enough for the other process to wait on it
    return original(*args, **kwargs)
source_cache.read_source = slow
mix = prepare_data(DataConfig(sources=[DataSource(path=sys.argv[1])], eval_size=2), load_tokenizer(ModelConfig(name="tiny")), 512)
print(json.dumps(list(mix.eval["id"])))
"""


def test_two_processes_share_one_build(data_files, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "FIKA_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_SCRIPT, str(data_files["finetome"])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]  # both loaded the same rows
    builds = (tmp_path / "cache" / "data" / "builds.log").read_text().splitlines()
    assert len(builds) == 1  # one built, the other waited and loaded


def test_bad_sources_are_clear_errors(data_files, tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="file not found"):
        prepare_data(mix_config(tmp_path / "missing.jsonl"), tiny_tokenizer, 256)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type"):
        prepare_data(mix_config(tmp_path / "notes.txt"), tiny_tokenizer, 256)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        prepare_data(mix_config(tmp_path / "empty.jsonl"), tiny_tokenizer, 256)
    useless = tmp_path / "useless.jsonl"
    useless.write_text(json.dumps({"messages": [{"role": "user", "content": "hello?"}]}) + "\n")
    with pytest.raises(DataError, match="no usable conversations .* no_assistant 1"):
        prepare_data(mix_config(useless), tiny_tokenizer, 256)
    with pytest.raises(DataError, match="eval_size: 50 is not allowed"):
        prepare_data(mix_config(data_files["finetome"], eval_size=50), tiny_tokenizer, 256)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(DataError, match="cannot load it"):
        prepare_data(mix_config(folder), tiny_tokenizer, 256)


def test_rows_that_are_not_utf8_are_dropped_as_malformed(tmp_path, tiny_tokenizer):
    """Arrow keeps a JSON file's bytes as read: a row that is not UTF-8 fails only when it is read."""
    path = tmp_path / "latin1.jsonl"
    bad = '{"conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "oui"}]}\n'
    good = [
        {"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "answer"}]}
        for i in range(4)
    ]
    path.write_bytes(bad.encode("latin-1") + "".join(json.dumps(row) + "\n" for row in good).encode())
    mix = prepare_data(mix_config(path, eval_size=1), tiny_tokenizer, 256)
    source = mix.sources[0]
    assert source.rows_in == 5 and source.dropped["malformed"] == 1 and source.eval + source.train == 4
    path.write_bytes(bad.encode("latin-1"))  # nothing readable: an error with the reason, not a traceback
    with pytest.raises(DataError, match="no usable conversations .* malformed 1"):
        prepare_data(mix_config(path, eval_size=1), tiny_tokenizer, 256)


def test_local_paths_are_made_absolute_and_others_kept(data_files, tmp_path, monkeypatch):
    """A run records its local sources as absolute paths (its config and a search's best.yaml then name the same
    files from any folder); the built-in data and hub ids stay as written."""
    monkeypatch.chdir(data_files["finetome"].parent)
    data = DataConfig(
        sources=[
            DataSource(path=data_files["finetome"].name),
            DataSource(path="builtin:sharegpt"),
            DataSource(path="HuggingFaceH4/ultrachat_200k"),
        ],
        eval_sources=[DataSource(path=f"./{data_files['ultrachat'].name}")],
    )
    resolved = resolve_local_paths(data)
    assert [s.path for s in resolved.sources] == [
        str(data_files["finetome"]),
        "builtin:sharegpt",
        "HuggingFaceH4/ultrachat_200k",
    ]
    assert [s.path for s in resolved.eval_sources] == [str(data_files["ultrachat"])]
    assert [s.label(i) for i, s in enumerate(resolved.sources)] == [s.label(i) for i, s in enumerate(data.sources)]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=rf"^data.sources.0.path: 'finetome.parquet' not found in {tmp_path}/elsewhere"):
        resolve_local_paths(data)

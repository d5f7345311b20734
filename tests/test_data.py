"""The data mix: standardizers, format detection, filters, split, labels, the tokenized cache."""

from __future__ import annotations

import json

import pytest

from fika.config import DataConfig, DataSource
from fika.data import (
    DROP_REASONS,
    DataError,
    Dropped,
    build_mix,
    detect_format,
    load_source,
    prepare_data,
    read_sharegpt_v3,
    repair,
    standardize_messages,
    standardize_sharegpt,
    standardize_sharegpt_english,
    tokenize_conversation,
    weighted_take,
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
    assert len(rows) == 17_671  # facts.md: the packaged file is cut at 125 MB
    assert "conversations" in columns and "17,671 complete records" in note


def test_ultrachat_survives_a_mix_with_finetome(data_files, tiny_tokenizer):
    """The lab's trap: ultrachat has `messages`, not `conversations`; standardizing first keeps it."""
    config = mix_config(data_files["finetome"], data_files["ultrachat"])
    train, eval_rows, stats = build_mix(config, tiny_tokenizer, 512)
    assert [s.format for s in stats] == ["sharegpt", "messages"]
    assert stats[1].kept == len(ULTRACHAT_ROWS) and stats[0].kept == len(FINETOME_ROWS)
    assert {r["source"] for r in train + eval_rows} == {0, 1}
    assert len(train) + len(eval_rows) == len(FINETOME_ROWS) + len(ULTRACHAT_ROWS)


def test_drop_counts_add_up_with_a_reason_each(data_files, tiny_tokenizer):
    config = mix_config(data_files["messy"], data_files["sharegpt_english"], eval_size=1)
    train, eval_rows, stats = build_mix(config, tiny_tokenizer, 256)
    messy = stats[0]
    assert messy.dropped == {
        "malformed": 0,
        "unknown_role": 1,
        "empty": 2,
        "no_assistant": 1,
        "duplicate": 1,
        "too_long": 1,
    }
    assert messy.kept == 3 and messy.repaired >= 1
    for s in stats:
        assert s.rows_in == sum(s.dropped.values()) + s.kept
        assert s.kept == s.eval + s.train + s.unused
    assert sum(s.train for s in stats) == len(train) and sum(s.eval for s in stats) == len(eval_rows)
    assert set(messy.dropped) == set(DROP_REASONS)


def test_seed_fixes_the_order_and_eval_is_disjoint(data_files, tiny_tokenizer):
    files = (data_files["finetome"], data_files["sharegpt_english"], data_files["ultrachat"])

    def run(seed):
        train, eval_rows, _ = build_mix(mix_config(*files, seed=seed, eval_size=3), tiny_tokenizer, 512)
        return [r["messages"] for r in train], [r["messages"] for r in eval_rows]

    train_a, eval_a = run(1)
    assert run(1) == (train_a, eval_a)
    assert not set(train_a) & set(eval_a)
    assert len(eval_a) == 3
    orders = {tuple(run(seed)[0]) for seed in range(2, 7)}
    assert len(orders | {tuple(train_a)}) > 1


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


def test_weights_set_the_shares_of_the_training_mix():
    assert weighted_take([100, 100], None) == [100, 100]
    assert weighted_take([100, 30], [1, 1]) == [30, 30]
    assert weighted_take([100, 100], [3, 1]) == [100, 33]


def test_limits_and_weights_in_a_real_mix(data_files, tiny_tokenizer):
    config = DataConfig(
        sources=[
            DataSource(path=str(data_files["finetome"]), limit=3, weight=1),
            DataSource(path=str(data_files["ultrachat"]), weight=1),
        ],
        eval_size=1,
    )
    train, eval_rows, stats = build_mix(config, tiny_tokenizer, 512)
    assert stats[0].rows_in == 3 and stats[0].kept == 3
    assert stats[0].train == stats[1].train  # equal weights: equal shares
    assert sum(s.unused for s in stats) == 3 + 3 - 1 - len(train)


def test_the_cache_is_reused_and_rebuilt_when_an_input_changes(data_files, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FIKA_CACHE", str(tmp_path / "cache"))
    config = mix_config(data_files["finetome"], data_files["ultrachat"])
    first = prepare_data(config, tiny_tokenizer, 512)
    assert not first.from_cache
    second = prepare_data(config, tiny_tokenizer, 512)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert second.train["input_ids"] == first.train["input_ids"]

    changed = [
        prepare_data(mix_config(data_files["finetome"], data_files["ultrachat"], seed=7), tiny_tokenizer, 512),
        prepare_data(mix_config(data_files["finetome"], data_files["ultrachat"], eval_size=3), tiny_tokenizer, 512),
        prepare_data(config, tiny_tokenizer, 128),
        prepare_data(mix_config(data_files["finetome"]), tiny_tokenizer, 512),
    ]
    template_before = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = template_before.replace("<|im_end|>\\n", "<|im_end|>\\n\\n")
    try:
        changed.append(prepare_data(config, tiny_tokenizer, 512))
    finally:
        tiny_tokenizer.chat_template = template_before
    data_files["ultrachat"].write_text(data_files["ultrachat"].read_text().replace("51.", "Fifty-one."))
    changed.append(prepare_data(config, tiny_tokenizer, 512))
    assert all(not m.from_cache for m in changed)
    assert len({first.fingerprint, *(m.fingerprint for m in changed)}) == 1 + len(changed)


def test_bad_sources_are_clear_errors(data_files, tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="file not found"):
        build_mix(mix_config(tmp_path / "missing.jsonl"), tiny_tokenizer, 256)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type"):
        build_mix(mix_config(tmp_path / "notes.txt"), tiny_tokenizer, 256)
    useless = tmp_path / "useless.jsonl"
    useless.write_text(json.dumps({"messages": [{"role": "user", "content": "hello?"}]}) + "\n")
    with pytest.raises(DataError, match="no usable conversations .* no_assistant 1"):
        build_mix(mix_config(useless), tiny_tokenizer, 256)
    with pytest.raises(DataError, match="eval_size: 50 is not allowed"):
        build_mix(mix_config(data_files["finetome"], eval_size=50), tiny_tokenizer, 256)

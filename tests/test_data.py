"""Tests of tinyonn.data: reading probe files, response-only labels, batching and per-sample loss."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import zstandard

from tinyonn import data
from tinyonn.config import DataConfig
from tinyonn.data import (
    EncodedSample,
    Example,
    collate,
    encode_example,
    encode_examples,
    examples_from_records,
    iter_batches,
    load_probe_set,
    per_sample_loss,
    read_examples,
    response_token_counts,
)
from tinyonn.errors import DataFormatError

EOS = "<|endoftext|>"
IM_END = "<|im_end|>"
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "The capital of France is Paris. What is the capital of France?",
    "User: hello there\nAssistant: general kenobi\nSystem: be brief and kind.",
    "Translate to French: good morning. Bonjour, the answer is four because two plus two is four.",
    "Write a haiku about the sea. Waves fold over stones, salt wind carries gulls away.",
]


def _build_tokenizer(chat_template: str | None, trim_offsets: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS, "<|im_start|>", IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=["<|im_start|>", IM_END],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="session")
def tokenizers():
    """{"chat": Qwen-style chat template, "plain": no chat template (plain User/Assistant template)}."""
    return {"chat": _build_tokenizer(QWEN_TEMPLATE), "plain": _build_tokenizer(None)}


ROWS = {
    "messages": {"messages": [{"role": "user", "content": "What is the capital of France?"},
                              {"role": "assistant", "content": "Paris is the capital."}]},
    "multi_turn": {"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello there"},
                                {"role": "assistant", "content": "general kenobi"},
                                {"role": "user", "content": "two plus two?"},
                                {"role": "assistant", "content": "It is four, because two plus two is four."}],
                   "category": "math", "source": "quiz"},
    "prompt_response": {"prompt": "Write a haiku about the sea.", "response": "Waves fold over stones.",
                        "category": "poetry"},
    "instruction": {"instruction": "Translate to French:", "input": "good morning", "output": "Bonjour"},
    "instruction_no_input": {"instruction": "Say hello.", "input": "", "output": "hello there"},
}
RESPONSES = {
    "messages": "Paris is the capital.",
    "multi_turn": "It is four, because two plus two is four.",
    "prompt_response": "Waves fold over stones.",
    "instruction": "Bonjour",
    "instruction_no_input": "hello there",
}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _labelled(sample: EncodedSample) -> list[int]:
    """Labelled token ids; also checks labels equal input ids there and form one contiguous run."""
    positions = [i for i, label in enumerate(sample.labels) if label != -100]
    assert positions, "a sample must have at least one label token"
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert all(sample.labels[i] == sample.input_ids[i] for i in positions)
    assert len(sample.labels) == len(sample.input_ids)
    return [sample.input_ids[i] for i in positions]


@pytest.fixture(scope="session")
def examples(tmp_path_factory) -> dict[str, Example]:
    path = _write_jsonl(tmp_path_factory.mktemp("rows") / "shapes.jsonl", list(ROWS.values()))
    return dict(zip(ROWS, read_examples(path)))


# ---------------------------------------------------------------------------------------------
# Reading


def test_read_examples_normalises_every_shape(examples):
    assert examples["messages"] == Example(
        messages=({"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris is the capital."}),
        category="all", source="",
    )
    assert examples["multi_turn"].category == "math" and examples["multi_turn"].source == "quiz"
    assert [m["role"] for m in examples["multi_turn"].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert examples["prompt_response"].messages == (
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold over stones."},
    )
    assert examples["prompt_response"].category == "poetry"
    assert examples["instruction"].messages[0] == {"role": "user", "content": "Translate to French:\n\ngood morning"}
    assert examples["instruction_no_input"].messages[0] == {"role": "user", "content": "Say hello."}
    for name, example in examples.items():
        assert example.response == RESPONSES[name]


def test_blank_lines_skipped_and_compressed_files(tmp_path):
    rows = list(ROWS.values())
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n   \n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    plain = tmp_path / "p.jsonl"
    plain.write_text(text, encoding="utf-8")
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    zst = tmp_path / "p.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    expected = read_examples(plain)
    assert len(expected) == len(rows)
    assert read_examples(gz) == expected
    assert read_examples(str(zst)) == expected


def test_error_line_inside_gzip_file(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n'))
    with pytest.raises(DataFormatError, match=r"bad\.jsonl\.gz:3: missing field 'response'") as err:
        read_examples(path)
    assert err.value.line == 3


def test_corrupt_compressed_file(tmp_path):
    path = tmp_path / "corrupt.jsonl.zst"
    path.write_bytes(b"this is not zstd data at all\n")
    with pytest.raises(DataFormatError, match=r"corrupt\.jsonl\.zst:1: cannot decompress"):
        read_examples(path)


GOOD = json.dumps({"prompt": "a", "response": "b"})
BAD_ROWS = [
    ("malformed_json", '{"prompt": "a", "response": ', "malformed JSON"),
    ("not_object", "[1, 2]", "expected a JSON object, found array"),
    ("string_row", '"hello"', "expected a JSON object, found string"),
    ("missing_all", json.dumps({"text": "x"}), 'missing fields (found keys: text); accepted shapes: {"messages"'),
    ("missing_response", json.dumps({"prompt": "x"}), "missing field 'response'; accepted shapes"),
    ("missing_output", json.dumps({"instruction": "x", "input": "y"}), "missing field 'output'"),
    ("prompt_type", json.dumps({"prompt": 3, "response": "x"}), "field 'prompt' must be a string, found number"),
    ("output_type", json.dumps({"instruction": "x", "output": ["y"]}), "field 'output' must be a string, found array"),
    ("input_type", json.dumps({"instruction": "x", "input": 1, "output": "y"}), "field 'input' must be a string"),
    ("category_type", json.dumps({"prompt": "x", "response": "y", "category": ["a"]}),
     "field 'category' must be a string, found array"),
    ("source_type", json.dumps({"prompt": "x", "response": "y", "source": True}),
     "field 'source' must be a string, found boolean"),
    ("messages_type", json.dumps({"messages": "hi"}), "field 'messages' must be an array, found string"),
    ("messages_empty", json.dumps({"messages": []}), "field 'messages' is empty"),
    ("message_type", json.dumps({"messages": ["hi"]}), "field 'messages[0]' must be an object, found string"),
    ("content_type", json.dumps({"messages": [{"role": "assistant", "content": 5}]}),
     "field 'messages[0].content' must be a string, found number"),
    ("content_missing", json.dumps({"messages": [{"role": "assistant"}]}), "field 'messages[0]' is missing 'content'"),
    ("bad_role", json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "field 'messages[0].role' is 'robot'; expected one of system, user, assistant"),
    ("last_not_assistant", json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}),
     "the last message must be from the assistant, found role 'user'"),
]


@pytest.mark.parametrize("name,line,message", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_read_examples_errors_name_file_and_line(tmp_path, name, line, message):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n", encoding="utf-8")  # bad row on line 4
    with pytest.raises(DataFormatError) as err:
        read_examples(path)
    assert err.value.line == 4
    assert f"{name}.jsonl:4: " in str(err.value)
    assert message in str(err.value)


def test_non_utf8_reports_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + b'{"prompt": "caf\xe9", "response": "x"}\n' + GOOD.encode() + b"\n")
    with pytest.raises(DataFormatError, match=r"latin\.jsonl:3: invalid UTF-8 at byte 15") as err:
        read_examples(path)
    assert err.value.line == 3


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank_lines"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: no examples") as err:
        read_examples(path)
    assert err.value.line is None


def test_datasets_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [ROWS["prompt_response"], {"prompt": "Say hi.", "response": "hi", "category": None}]
    dataset = datasets.Dataset.from_list(rows)
    assert read_examples(dataset) == examples_from_records(rows, "rows")
    assert [e.category for e in read_examples(dataset)] == ["poetry", "all"]
    chat = datasets.Dataset.from_list([ROWS["multi_turn"], ROWS["messages"]])
    assert [e.response for e in read_examples(chat)] == [RESPONSES["multi_turn"], RESPONSES["messages"]]

    bad = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": None}])
    with pytest.raises(DataFormatError, match=r"<datasets\.Dataset.*>:1: missing field 'response'") as err:
        read_examples(bad)
    assert err.value.line == 1

    splits = datasets.DatasetDict({"train": dataset, "validation": chat})
    assert load_probe_set(splits, split="validation") == read_examples(chat)
    assert load_probe_set(dataset) == read_examples(dataset)
    with pytest.raises(ValueError, match="unknown split 'test'; available splits: train, validation"):
        load_probe_set(splits, split="test")


def test_load_probe_set_paths_and_splits(tmp_path, monkeypatch):
    rows = list(ROWS.values())
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    _write_jsonl(tmp_path / "validation.jsonl", rows[:2])
    monkeypatch.setattr(data, "BUILTIN_PROBE_DIR", tmp_path)
    assert len(load_probe_set()) == len(rows)
    assert len(load_probe_set("builtin", "validation")) == 2
    assert load_probe_set(tmp_path, "validation") == load_probe_set(tmp_path / "validation.jsonl")
    with pytest.raises(ValueError, match="unknown split 'test' in .*; available splits: train, validation"):
        load_probe_set("builtin", "test")
    monkeypatch.setattr(data, "BUILTIN_PROBE_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no probe splits"):
        load_probe_set()


@pytest.mark.skipif(not (data.BUILTIN_PROBE_DIR / "train.jsonl.gz").is_file(), reason="builtin probe set not built")
def test_builtin_probe_set():
    examples = load_probe_set("builtin", "train")
    assert examples and all(isinstance(e, Example) for e in examples)
    assert all(e.messages[-1]["role"] == "assistant" for e in examples)


# ---------------------------------------------------------------------------------------------
# Encoding


def _expected_text(kind: str, example: Example, system_prompt: str | None = None) -> str:
    messages = list(example.messages)
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if kind == "chat":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    plain = {"user": "User: {}\n", "system": "System: {}\n", "assistant": "Assistant: {}" + EOS + "\n"}
    return "".join(plain[m["role"]].format(m["content"]) for m in messages)


# Plain template: when byte-level BPE merges the separator space of "Assistant: " into the first
# response token (" Paris" is in the test vocabulary), that token, space included, is labelled; when
# the space stays a token of its own (" It" is not in the vocabulary) it belongs to the prompt.
SPACE_MERGED = {"messages": True, "multi_turn": False, "prompt_response": True, "instruction": True,
                "instruction_no_input": True}


def _expected_labels(kind: str, shape: str) -> str:
    if kind == "chat":
        return RESPONSES[shape] + IM_END
    return (" " if SPACE_MERGED[shape] else "") + RESPONSES[shape] + EOS


@pytest.mark.parametrize("kind", ["chat", "plain"])
@pytest.mark.parametrize("shape", list(ROWS))
def test_labels_are_exactly_the_response(tokenizers, examples, kind, shape):
    tok = tokenizers[kind]
    example = examples[shape]
    sample = encode_example(tok, example, DataConfig(), index=7)
    assert sample is not None and sample.index == 7 and sample.category == example.category
    assert tok.decode(list(sample.input_ids)) == _expected_text(kind, example)
    assert tok.decode(_labelled(sample)) == _expected_labels(kind, shape)
    # nothing after the end-of-turn token is labelled (the trailing newline is the last token)
    assert sample.labels[-1] == -100 and tok.decode([sample.input_ids[-1]]) == "\n"


@pytest.mark.parametrize("trim_offsets", [True, False])
def test_labels_do_not_depend_on_offset_trimming(tokenizers, examples, trim_offsets):
    for kind, template in (("chat", QWEN_TEMPLATE), ("plain", None)):
        tok = _build_tokenizer(template, trim_offsets=trim_offsets)
        for shape, example in examples.items():
            sample = encode_example(tok, example, DataConfig())
            assert sample == encode_example(tokenizers[kind], example, DataConfig())
            assert tok.decode(_labelled(sample)) == _expected_labels(kind, shape)


def test_use_chat_template_false_and_system_prompt(tokenizers, examples):
    chat = tokenizers["chat"]
    plain = encode_example(chat, examples["messages"], DataConfig(use_chat_template=False))
    assert plain == encode_example(tokenizers["plain"], examples["messages"], DataConfig())

    config = DataConfig(system_prompt="Be kind.")
    sample = encode_example(chat, examples["messages"], config)
    text = chat.decode(list(sample.input_ids))
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")
    assert text == _expected_text("chat", examples["messages"], "Be kind.")
    assert chat.decode(_labelled(sample)) == RESPONSES["messages"] + IM_END
    # an example that has its own system message keeps it and gets no second one
    multi = encode_example(chat, examples["multi_turn"], config)
    assert multi == encode_example(chat, examples["multi_turn"], DataConfig())
    sample = encode_example(tokenizers["plain"], examples["messages"], config)
    assert tokenizers["plain"].decode(list(sample.input_ids)).startswith("System: Be kind.\nUser: ")


def test_template_with_text_between_generation_prompt_and_response(examples):
    # Qwen3-style: an empty think block is rendered before the final answer; it is not labelled
    template = QWEN_TEMPLATE.replace(
        "{{ message['content'] }}",
        "{% if loop.last and message['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}"
        "{{ message['content'] }}",
    )
    tok = _build_tokenizer(template)
    for shape, example in examples.items():
        sample = encode_example(tok, example, DataConfig())
        assert "<think>\n\n</think>\n\n" + RESPONSES[shape] + IM_END in tok.decode(list(sample.input_ids))
        assert tok.decode(_labelled(sample)) == RESPONSES[shape] + IM_END


def test_template_whose_prompt_is_not_a_prefix_is_rejected(examples):
    tok = _build_tokenizer("{% if add_generation_prompt %}GEN{% endif %}" + QWEN_TEMPLATE)
    with pytest.raises(ValueError, match="not a prefix"):
        encode_example(tok, examples["messages"], DataConfig())


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_left_truncation_keeps_response_and_drops_prompt(tokenizers, examples, kind):
    tok = tokenizers[kind]
    example = examples["multi_turn"]
    full = encode_example(tok, example, DataConfig())
    n_response = len(_labelled(full)) + 1  # + trailing newline
    max_length = n_response + 4
    assert len(full.input_ids) > max_length
    sample = encode_example(tok, example, DataConfig(max_length=max_length, truncation_side="left"))
    assert len(sample.input_ids) == max_length
    assert sample.input_ids == full.input_ids[-max_length:]
    assert sample.labels == full.labels[-max_length:]
    assert tok.decode(_labelled(sample)) == _expected_labels(kind, "multi_turn")
    assert all(label == -100 for label in full.labels[:-max_length])  # only prompt tokens were dropped


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_right_truncation_cuts_response_end(tokenizers, examples, kind):
    tok = tokenizers[kind]
    example = examples["multi_turn"]
    full = encode_example(tok, example, DataConfig())
    max_length = _first_label(full) + 3
    sample = encode_example(tok, example, DataConfig(max_length=max_length, truncation_side="right"))
    assert sample.input_ids == full.input_ids[:max_length]
    assert sample.labels == full.labels[:max_length]
    labelled = _labelled(sample)  # checks labels == input ids on labelled positions
    assert len(labelled) == 3
    assert _expected_labels(kind, "multi_turn").startswith(tok.decode(labelled))


def _first_label(sample: EncodedSample) -> int:
    return next(i for i, label in enumerate(sample.labels) if label != -100)


def test_skips_empty_and_truncated_away(tokenizers, examples):
    tok = tokenizers["chat"]
    empty = Example(messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}))
    blank = Example(messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}))
    items = [examples["messages"], empty, examples["prompt_response"], blank, examples["multi_turn"]]
    # right truncation that stops exactly where the multi-turn response starts
    config = DataConfig(max_length=_first_label(encode_example(tok, items[4], DataConfig())), truncation_side="right")
    assert encode_example(tok, items[4], config) is None
    assert encode_example(tok, empty, DataConfig()) is None
    samples, report = encode_examples(tok, items, config)
    assert [s.index for s in samples] == [0, 2]
    assert [s.category for s in samples] == ["all", "poetry"]
    assert (report.total, report.empty_response, report.truncated_away, report.kept) == (5, 2, 1, 2)
    assert samples[0] == encode_example(tok, items[0], config, index=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_never_a_zero_label_sample(tokenizers, examples, side):
    tok = tokenizers["plain"]
    full = encode_example(tok, examples["multi_turn"], DataConfig())
    for max_length in range(2, len(full.input_ids) + 2):
        config = DataConfig(max_length=max_length, truncation_side=side)
        samples, report = encode_examples(tok, [examples["multi_turn"]], config)
        assert report.total == 1 and len(samples) + report.truncated_away == 1
        for sample in samples:
            assert len(sample.input_ids) == min(max_length, len(full.input_ids))
            assert response_token_counts(torch.tensor([sample.labels])).item() >= 1


# ---------------------------------------------------------------------------------------------
# Batching and loss


def _sample(ids, labels, index, category="c"):
    return EncodedSample(input_ids=tuple(ids), labels=tuple(labels), category=category, index=index)


def test_collate_right_and_left_padding():
    a = _sample([5, 6, 7, 8], [-100, -100, 7, 8], index=3, category="x")
    b = _sample([9, 10], [-100, 10], index=1, category="y")
    right = collate([a, b], pad_token_id=0, padding_side="right")
    assert right.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert right.labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert right.sample_index.tolist() == [3, 1] and right.categories == ("x", "y")
    left = collate([a, b], pad_token_id=0, padding_side="left")
    assert left.input_ids.tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert left.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert left.labels.tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 10]]
    for batch in (left, right):
        tensors = (batch.input_ids, batch.attention_mask, batch.labels, batch.sample_index)
        assert all(t.dtype == torch.long for t in tensors)
    with pytest.raises(ValueError):
        collate([], pad_token_id=0, padding_side="right")


def test_iter_batches_in_order_with_dynamic_padding():
    lengths = [3, 5, 2, 4, 6]
    samples = [_sample(range(1, n + 1), [-100] + list(range(2, n + 1)), index=i) for i, n in enumerate(lengths)]
    batches = list(iter_batches(samples, batch_size=2, pad_token_id=0, padding_side="right"))
    assert [b.sample_index.tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert [b.input_ids.shape[1] for b in batches] == [5, 4, 6]
    assert [b.attention_mask.sum().item() for b in batches] == [8, 6, 6]
    assert [b.sample_index.tolist() for b in iter_batches(samples, 2, 0, "right")] == [[0, 1], [2, 3], [4]]


def _reference_loss(logits_rows, label_rows):
    out = []
    for logits, labels in zip(logits_rows, label_rows):
        total, count = 0.0, 0
        for t in range(1, len(labels)):
            if labels[t] == -100:
                continue
            row = logits[t - 1].double().tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            total += log_z - row[labels[t]]
            count += 1
        out.append(total / count)
    return out


def test_per_sample_loss_matches_hand_computed_cross_entropy():
    g = torch.Generator().manual_seed(0)
    vocab, lengths = 11, [7, 3, 5]
    label_rows = [
        [-100, -100, 4, 9, 1, 0, 10],
        [-100, 2, 3],
        [-100, -100, -100, 6, 6],
    ]
    logits_rows = [torch.randn(n, vocab, generator=g) * 3 for n in lengths]
    expected = _reference_loss(logits_rows, label_rows)
    width = max(lengths)
    for side in ("left", "right"):
        logits = torch.randn(3, width, vocab, generator=g)  # junk on padding positions
        labels = torch.full((3, width), -100)
        for i, (rows, labs) in enumerate(zip(logits_rows, label_rows)):
            cols = slice(0, len(labs)) if side == "right" else slice(width - len(labs), width)
            logits[i, cols] = rows
            labels[i, cols] = torch.tensor(labs)
        loss = per_sample_loss(logits, labels)
        assert loss.dtype == torch.float32 and loss.shape == (3,)
        assert torch.allclose(loss, torch.tensor(expected, dtype=torch.float32), atol=1e-5)
        assert response_token_counts(labels).tolist() == [5, 2, 2]
        half = per_sample_loss(logits.to(torch.bfloat16), labels)
        assert half.dtype == torch.float32
        assert torch.allclose(half, loss, atol=0.1)


def test_per_sample_loss_ignores_position_zero_and_gives_nan_without_labels():
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[1, -100, -100], [2, 3, -100]])
    loss = per_sample_loss(logits, labels)
    assert math.isnan(loss[0].item())
    assert loss[1].item() == pytest.approx(math.log(4))
    assert response_token_counts(labels).tolist() == [0, 1]


def test_per_sample_loss_head_and_dense_forms_agree():
    """The LM head applied inside (only at scored positions), and the dense form under vmap, give
    the same losses as plain logits (NaN for a sample without labels)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, 3, 4, -100, 5, 1], [-100] * 6, [-100, -100, 7, 7, 7, -100]])
    expected = per_sample_loss(head(hidden), labels)
    assert math.isnan(expected[1].item())
    torch.testing.assert_close(per_sample_loss(hidden, labels, head=head), expected, equal_nan=True)
    torch.testing.assert_close(per_sample_loss(head(hidden), labels, dense=True), expected, equal_nan=True)
    one = lambda logits, labs: per_sample_loss(logits[None], labs[None], dense=True)[0]  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(one)(head(hidden), labels), expected, equal_nan=True)


def test_end_to_end_batch_loss(tokenizers, examples):
    tok = tokenizers["chat"]
    samples, report = encode_examples(tok, list(examples.values()), DataConfig())
    assert report.kept == len(samples) == len(examples)
    batch = next(iter_batches(samples, 8, tok.pad_token_id, "left"))
    vocab = len(tok)
    logits = torch.zeros(*batch.input_ids.shape, vocab)
    loss = per_sample_loss(logits, batch.labels)  # uniform logits: every token costs log(V)
    assert torch.allclose(loss, torch.full((len(samples),), math.log(vocab)))
    assert response_token_counts(batch.labels).tolist() == [len(_labelled(s)) for s in samples]

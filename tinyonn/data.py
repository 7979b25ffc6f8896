"""Probe data → token batches.

JSONL probe files (plain, `.gz` or `.zst`) or `datasets` objects become `Example`s; each example
is rendered with the tokenizer's chat template (or a plain User/Assistant template), tokenized once
and labelled on exactly the last assistant response plus its end-of-turn token. Samples are padded
into `Batch`es in input order, and `per_sample_loss` gives each sample's mean response NLL.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from tinyonn.assets import builtin_eval_file, builtin_probe_dir
from tinyonn.config import DataConfig
from tinyonn.errors import DataFormatError, DataNotFoundError, DataSourceError

IGNORE_INDEX = -100
"""Label of tokens that are not trained on (PyTorch's cross-entropy default)."""

ROLES = ("system", "user", "assistant")

BUILTIN_PROBE_DIR = builtin_probe_dir()

_SPLIT_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl")
_ACCEPTED_SHAPES = (
    'accepted shapes: {"messages": [{"role", "content"}, ...]}, {"prompt", "response"}, '
    '{"instruction", "input" (optional), "output"}'
)


# --------------------------------------------------------------------------------------------
# Examples and reading


@dataclass(frozen=True)
class Example:
    """One probe conversation; the last message is the assistant response that is scored."""

    messages: tuple[dict[str, str], ...]
    category: str = "all"
    source: str = ""

    @property
    def prompt_messages(self) -> tuple[dict[str, str], ...]:
        """Every message before the response."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        """Content of the last (assistant) message."""
        return self.messages[-1]["content"]


def _json_type(value: Any) -> str:
    """JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _string_field(record: dict, key: str, origin: str, line: int | None, *, name: str | None = None) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(origin, line, f"field '{name or key}' must be a string, found {_json_type(value)}")
    return value


def _required_strings(record: dict, present: set[str], keys: tuple[str, ...], origin: str,
                      line: int | None) -> list[str]:
    """The string fields `keys` of a row shaped by them; `DataFormatError` naming the first missing one."""
    missing = [key for key in keys if key not in present]
    if missing:
        raise DataFormatError(origin, line, f"missing field '{missing[0]}'; {_ACCEPTED_SHAPES}")
    return [_string_field(record, key, origin, line) for key in keys]


def _parse_messages(value: Any, origin: str, line: int | None) -> tuple[dict[str, str], ...]:
    if not isinstance(value, (list, tuple)):
        raise DataFormatError(origin, line, f"field 'messages' must be an array, found {_json_type(value)}")
    if not value:
        raise DataFormatError(origin, line, "field 'messages' is empty; it needs at least the assistant response")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataFormatError(origin, line, f"field '{where}' must be an object, found {_json_type(message)}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise DataFormatError(origin, line, f"field '{where}' is missing '{key}'")
        role = _string_field(message, "role", origin, line, name=f"{where}.role")
        content = _string_field(message, "content", origin, line, name=f"{where}.content")
        if role not in ROLES:
            expected = ", ".join(ROLES)
            raise DataFormatError(origin, line, f"field '{where}.role' is {role!r}; expected one of {expected}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(
            origin, line, f"the last message must be from the assistant, found role {messages[-1]['role']!r}"
        )
    return tuple(messages)


def parse_record(record: Any, origin: str, line: int | None) -> Example:
    """One row (already JSON-decoded) → `Example`; `DataFormatError` naming `origin:line` if malformed.

    Fields whose value is null count as absent (a `datasets` table fills missing columns with None).
    """
    if not isinstance(record, dict):
        raise DataFormatError(origin, line, f"expected a JSON object, found {_json_type(record)}")
    present = {key for key, value in record.items() if value is not None}
    if "messages" in present:
        messages = _parse_messages(record["messages"], origin, line)
    elif "prompt" in present or "response" in present:
        prompt, response = _required_strings(record, present, ("prompt", "response"), origin, line)
        messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": response})
    elif "instruction" in present or "output" in present:
        instruction, output = _required_strings(record, present, ("instruction", "output"), origin, line)
        extra = _string_field(record, "input", origin, line) if "input" in present else ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": output})
    else:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise DataFormatError(origin, line, f"missing fields (found keys: {found}); {_ACCEPTED_SHAPES}")
    category = _string_field(record, "category", origin, line) if "category" in present else "all"
    source = _string_field(record, "source", origin, line) if "source" in present else ""
    return Example(messages=messages, category=category, source=source)


def examples_from_records(records: Iterable[dict], origin: str) -> list[Example]:
    """Rows of a `datasets.Dataset` (or any dicts) → examples; errors name `origin` and the row index."""
    examples = [parse_record(record, origin, index) for index, record in enumerate(records)]
    if not examples:
        raise DataFormatError(origin, None, "no examples (empty dataset)")
    return examples


def _is_hf_dataset(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.split(".")[0] == "datasets"


def _dataset_origin(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    split = getattr(dataset, "split", None)
    label = "/".join(str(part) for part in (name, split) if part)
    return f"<datasets.Dataset{' ' + label if label else ''}>"


class _Truncated(Exception):
    """A compressed stream ends before its end marker."""


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame of a file, one frame after the other.

    zstandard's `stream_reader` returns what it has when the file ends inside a frame, so a file
    cut short (at a block boundary or inside a block) would read as fewer rows without a word. Here
    each frame goes through its own `decompressobj`, whose `eof` is set only by the frame's end
    marker (zstd also checks the header's content size and the frame checksum there); data that
    ends before it raises `_Truncated`.
    """

    def __init__(self, path: Path):
        import zstandard  # imported here: only .zst inputs need it

        self._file = open(path, "rb")
        self._context = zstandard.ZstdDecompressor()
        self._frame = None
        self._pending = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset >= len(self._pending):
            data = self._file.read(1 << 16)
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise _Truncated()
                return 0
            out = []
            while data:
                if self._frame is None or self._frame.eof:
                    self._frame = self._context.decompressobj()
                out.append(self._frame.decompress(data))
                data = self._frame.unused_data if self._frame.eof else b""
            self._pending, self._offset = b"".join(out), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset : self._offset + n]
        self._offset += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: Path):
    """Binary stream of the decompressed file: gzip / zstd (every frame) by suffix, else raw."""
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder, not a data file (a folder needs {split}.jsonl files)", str(path))
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a plain, gzip or zstd file. A compressed file cut short
    raises `DataFormatError` "truncated" and a corrupt one "cannot decompress", naming the line
    being read: before that line is handed out, so a cut row never reads as malformed JSON."""
    origin, lineno = str(path), 0
    if not path.exists():
        raise DataNotFoundError(f"data file not found: {path}")
    try:
        with _open_binary(path) as stream:
            for lineno, raw in enumerate(stream, start=1):
                yield lineno, raw
    except (_Truncated, EOFError) as err:  # gzip: EOFError "Compressed file ended before the end-of-stream marker"
        kind = "zstd frame" if isinstance(err, _Truncated) else "gzip stream"
        raise DataFormatError(origin, lineno + 1, f"truncated: the file ends inside a {kind}, before its end marker "
                                                  f"(only {lineno} complete lines could be read)") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # corrupt gzip / zstd data (gzip.BadGzipFile, zlib.error, zstandard.ZstdError)
        if not isinstance(err, OSError) and type(err).__name__ not in ("ZstdError", "error"):
            raise
        raise DataFormatError(origin, lineno + 1, f"cannot decompress: {err}") from None


def _skip_or_raise(error: DataFormatError, on_bad: Callable[[DataFormatError], None] | None) -> None:
    if on_bad is None:
        raise error
    on_bad(error)


def read_examples(path: str | os.PathLike | Any,
                  on_bad: Callable[[DataFormatError], None] | None = None) -> list[Example]:
    """Read a JSONL probe file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) or a `datasets.Dataset`.

    Blank lines are skipped; a malformed line raises `DataFormatError` naming the file and the
    1-based line number, or, given `on_bad` (`--skip-bad`), is passed to it and skipped. A
    truncated or corrupt compressed file always raises.
    """
    if not isinstance(path, (str, os.PathLike)):
        if _is_hf_dataset(path):
            return examples_from_records(path, _dataset_origin(path))
        raise TypeError(f"read_examples expects a path or a datasets.Dataset, got {type(path).__name__}")
    path = Path(path)
    origin = str(path)
    examples: list[Example] = []
    bad = 0
    for lineno, raw in _lines(path):
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(origin, lineno, f"invalid UTF-8 at byte {err.start} of the line") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataFormatError(origin, lineno, f"malformed JSON: {err.msg} (column {err.colno})") from None
            examples.append(parse_record(record, origin, lineno))
        except DataFormatError as err:
            _skip_or_raise(err, on_bad)
            bad += 1
    if not examples:
        what = f"every one of its {bad} non-blank lines is bad" if bad else "the file is empty or only blank lines"
        raise DataFormatError(origin, None, f"no examples ({what})")
    return examples


def _split_file(directory: Path, split: str) -> Path:
    """`directory/{split}.jsonl(.gz|.zst)`; an error listing the splits present if there is none."""
    for suffix in _SPLIT_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    names = [p.name for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []
    available = sorted({n[: -len(s)] for n in names for s in _SPLIT_SUFFIXES if n.endswith(s)})
    if not available:
        raise DataNotFoundError(f"no probe splits (*.jsonl, *.jsonl.gz, *.jsonl.zst) found in {directory}")
    raise DataSourceError(f"unknown split {split!r} in {directory}; available splits: {', '.join(available)}")


def load_probe_set(source: str | os.PathLike | Any = "builtin", split: str = "train",
                   on_bad: Callable[[DataFormatError], None] | None = None) -> list[Example]:
    """Probe examples from the builtin set, a JSONL file, a directory of `{split}.jsonl*` files, or
    a `datasets` Dataset / DatasetDict (`split` picks the DatasetDict entry). `on_bad`: see
    `read_examples` (skip bad lines instead of raising)."""
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and source == "builtin":
            return read_examples(_split_file(BUILTIN_PROBE_DIR, split), on_bad)
        path = Path(source)
        if path.is_dir():
            return read_examples(_split_file(path, split), on_bad)
        return read_examples(path, on_bad)
    if _is_hf_dataset(source):
        import datasets

        if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if split not in source:
                raise DataSourceError(f"unknown split {split!r}; available splits: {', '.join(sorted(source))}")
            return read_examples(source[split])
    return read_examples(source)


def has_splits(source: str | os.PathLike | Any) -> bool:
    """Whether a data source comes as named splits ("builtin", a folder, a DatasetDict) rather than
    one set of examples (a file, a Dataset, a list) that `split_probe_set` holds a part out of."""
    if isinstance(source, (str, os.PathLike)):
        return str(source) == "builtin" or Path(source).is_dir()
    if _is_hf_dataset(source):
        import datasets

        return isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict))
    return False


def split_probe_set(source: str | os.PathLike | Any = "builtin", held_out_split: str = "validation",
                    holdout_every: int = 10, on_bad: Callable[[DataFormatError], None] | None = None,
                    ) -> tuple[list[Example], list[Example]]:
    """(examples to probe and train on, held-out examples) of a data source, disjoint.

    A source with splits gives its "train" split and `held_out_split`; one set of examples (a JSONL
    file, a Dataset, a list of `Example`) holds out every `holdout_every`-th example
    (i % holdout_every == holdout_every - 1), which is never probed nor trained on.
    """
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be ≥ 2, got {holdout_every}")
    if has_splits(source):
        return load_probe_set(source, "train", on_bad), load_probe_set(source, held_out_split, on_bad)
    every = list(source) if isinstance(source, list) else load_probe_set(source, "train", on_bad)
    last = holdout_every - 1
    return ([e for i, e in enumerate(every) if i % holdout_every != last],
            [e for i, e in enumerate(every) if i % holdout_every == last])


def spread(examples: Sequence[Example], count: int | None) -> list[Example]:
    """`count` examples spread over the list: every (len // count)-th from the first, so a data set
    sorted by category gives each category its share (all of them for None or count ≥ len)."""
    if count is None:
        return list(examples)
    return list(examples[:: max(1, len(examples) // count)][:count]) if count > 0 else []


def read_jsonl_records(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file (plain, `.gz`, `.zst`) as dicts; a malformed line raises
    `DataFormatError` naming the file and line (a cut compressed file: "truncated")."""
    origin = str(path)
    rows = []
    for lineno, raw in _lines(Path(path)):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataFormatError(origin, lineno, f"invalid UTF-8 at byte {err.start} of the line") from None
        if not text:
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as err:
            raise DataFormatError(origin, lineno, f"malformed JSON: {err.msg} (column {err.colno})") from None
    return rows


def load_eval_set(source: str | os.PathLike = "builtin") -> list[dict]:
    """The multiple-choice evaluation items: "builtin" (the embedded default's) or a JSONL path."""
    path = builtin_eval_file() if str(source) == "builtin" else Path(source)
    if not path.is_file():
        raise DataNotFoundError(f"evaluation set not found: {path}")
    return read_jsonl_records(path)

# --------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of one example; `labels` is -100 except on the response and its end-of-turn token."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    category: str
    index: int
    """Position of the example in the list that was encoded."""


@dataclass(frozen=True)
class SkipReport:
    """How many examples `encode_examples` saw and why some produced no sample."""

    total: int
    empty_response: int = 0
    truncated_away: int = 0

    @property
    def kept(self) -> int:
        return self.total - self.empty_response - self.truncated_away


def _with_system_prompt(example: Example, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [dict(message) for message in example.messages]
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _render_plain(messages: Sequence[dict[str, str]], eos: str) -> str:
    parts = []
    for message in messages:
        if message["role"] == "assistant":
            parts.append(f"Assistant: {message['content']}{eos}\n")
        elif message["role"] == "system":
            parts.append(f"System: {message['content']}\n")
        else:
            parts.append(f"User: {message['content']}\n")
    return "".join(parts)


def _uses_chat_template(tokenizer, config: DataConfig) -> bool:
    return bool(config.use_chat_template and getattr(tokenizer, "chat_template", None))


def _end_of_turn_length(tokenizer, text: str, position: int) -> int:
    """Length of the special/added token that starts at `position` (the end-of-turn marker), else 0."""
    markers = set(tokenizer.get_added_vocab())
    if tokenizer.eos_token:
        markers.add(tokenizer.eos_token)
    return max((len(m) for m in markers if m and text.startswith(m, position)), default=0)


def render_example(tokenizer, example: Example, config: DataConfig) -> tuple[str, int, int]:
    """Full text of the example and the character span `[start, end)` of the response plus its
    end-of-turn marker (`<|im_end|>` with a Qwen-style template, the eos with the plain one)."""
    messages = _with_system_prompt(example, config.system_prompt)
    response = messages[-1]["content"]
    if _uses_chat_template(tokenizer, config):
        prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prefix):
            raise ValueError(
                "the chat template's rendering of the prompt (with the generation prompt) is not a prefix "
                "of the rendered conversation; response labels cannot be located"
            )
        start = full.find(response, len(prefix))
        content = response
        if start < 0 and response.strip():  # templates that trim the content
            content = response.strip()
            start = full.find(content, len(prefix))
        if start < 0:
            raise ValueError("the response text does not appear in the chat template's rendering")
        content_end = start + len(content)
        end = content_end + _end_of_turn_length(tokenizer, full, content_end)
        return full, start, end
    eos = tokenizer.eos_token or ""
    prefix = _render_plain(messages[:-1], eos) + "Assistant: "
    full = _render_plain(messages, eos)
    start = len(prefix)
    return full, start, start + len(response) + len(eos)


def _encode(tokenizer, example: Example, config: DataConfig, index: int) -> EncodedSample | str:
    """The sample, or the reason it was skipped ("empty_response" / "truncated_away")."""
    if config.max_length < 2:
        raise ValueError(f"DataConfig.max_length must be at least 2, got {config.max_length}")
    if not example.response.strip():
        return "empty_response"
    text, start, end = render_example(tokenizer, example, config)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    # A token is labelled when its span overlaps the response: the first response token may carry
    # the separator before it (byte-level BPE merges "Assistant: Paris" into "Assistant", ":", " Paris").
    labels = [
        token if (s < end and e > start) else IGNORE_INDEX
        for token, (s, e) in zip(ids, encoding["offset_mapping"])
    ]
    if len(ids) > config.max_length:
        if config.truncation_side == "left":
            ids, labels = ids[-config.max_length :], labels[-config.max_length :]
        elif config.truncation_side == "right":
            ids, labels = ids[: config.max_length], labels[: config.max_length]
        else:
            raise ValueError(f"truncation_side must be 'left' or 'right', got {config.truncation_side!r}")
    labels[0] = IGNORE_INDEX  # nothing precedes the first token, so it is never predicted
    if all(label == IGNORE_INDEX for label in labels):
        return "truncated_away"
    return EncodedSample(input_ids=tuple(ids), labels=tuple(labels), category=example.category, index=index)


def encode_example(tokenizer, example: Example, config: DataConfig, index: int = 0) -> EncodedSample | None:
    """Tokenize one example with response-only labels; None if the response is empty (or only
    whitespace) or no label token survives truncation to `config.max_length`."""
    result = _encode(tokenizer, example, config, index)
    return result if isinstance(result, EncodedSample) else None


def encode_examples(
    tokenizer, examples: Sequence[Example], config: DataConfig
) -> tuple[list[EncodedSample], SkipReport]:
    """Encode examples in order (`index` = position in `examples`), dropping those with no label token."""
    samples: list[EncodedSample] = []
    skipped = {"empty_response": 0, "truncated_away": 0}
    for index, example in enumerate(examples):
        result = _encode(tokenizer, example, config, index)
        if isinstance(result, EncodedSample):
            samples.append(result)
        else:
            skipped[result] += 1
    return samples, SkipReport(total=len(examples), **skipped)


# --------------------------------------------------------------------------------------------
# Batching and loss


@dataclass(frozen=True)
class Batch:
    """Padded tensors of a few samples (`sample_index` = each sample's `EncodedSample.index`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    categories: tuple[str, ...]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device`."""
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            sample_index=self.sample_index.to(device),
            categories=self.categories,
        )


def collate(
    samples: Sequence[EncodedSample], pad_token_id: int, padding_side: Literal["left", "right"] = "right"
) -> Batch:
    """Pad samples to the longest one; padding has attention 0 and label -100."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(sample.labels, dtype=torch.long)
        attention_mask[row, cols] = 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        sample_index=torch.tensor([s.index for s in samples], dtype=torch.long),
        categories=tuple(s.category for s in samples),
    )


def iter_batches(
    samples: Sequence[EncodedSample],
    batch_size: int,
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
) -> Iterator[Batch]:
    """Consecutive batches of `batch_size` samples in input order (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(samples), batch_size):
        yield collate(samples[start : start + batch_size], pad_token_id, padding_side)


def response_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """[B] number of scored tokens per sample: labels != -100 after the causal shift (position 0 never counts)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor,
                    head: Callable[[torch.Tensor], torch.Tensor] | None = None, *, dense: bool = False) -> torch.Tensor:
    """[B] float32 mean next-token NLL over each sample's label tokens (logits at t predict labels at t+1).

    `logits` [B, T, V]; or, given `head` (the LM head), the last hidden states [B, T, d], and the head
    runs only at the scored positions (it is a large share of a small model's FLOPs). Only the scored
    positions are upcast to float32. A sample with no label token gets NaN.

    `dense=True` takes every position (the unlabelled ones add 0) instead of selecting the labelled
    ones: no data-dependent shapes, so `torch.func.vmap` can map it over samples (as the probe's
    `vmap(grad)` reference does), at the price of float32 logits for every position.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B,T,V] and labels [B,T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    batch, length = labels.shape
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if dense:
        rows = torch.arange(batch, device=labels.device).repeat_interleave(length - 1)
        cols = torch.arange(length - 1, device=labels.device).repeat(batch)
    else:
        rows, cols = mask.nonzero(as_tuple=True)
    scored = logits[rows, cols]
    if head is not None:
        scored = head(scored)
    nll = F.cross_entropy(scored.float(), shift_labels[rows, cols], ignore_index=IGNORE_INDEX, reduction="none")
    sums = torch.zeros(batch, dtype=torch.float32, device=logits.device).index_add(0, rows, nll)
    return sums / mask.sum(dim=1).to(torch.float32)

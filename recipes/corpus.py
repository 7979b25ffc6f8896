"""Pretraining corpus: raw text sources → compressed token shards → random training windows.

Shards are flat little-endian uint16 token streams compressed with zstd (numcodecs' Zstd, so the
GPU machine needs only the numcodecs wheel), each at most
`max_shard_bytes` compressed, listed in `index.json` with their source and token count. A source's
documents are separated by the end-of-text token.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from recipes.tokenizer import EOS_TOKEN, chunked

MAX_SHARD_BYTES = 40 * 1024 * 1024


def read_text(path: str | Path, max_chars: int | None = None) -> str:
    """Read a UTF-8 text file, zstd-compressed when its name ends in `.zst`."""
    path = Path(path)
    if path.suffix == ".zst":
        import zstandard  # streaming reader: corpus files are large

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            text = io.TextIOWrapper(reader, encoding="utf-8", errors="replace")
            return text.read(max_chars) if max_chars else text.read()
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[:max_chars] if max_chars else text


def source_name(path: str | Path) -> str:
    """`en_prose__brown.txt.zst` → `en_prose__brown`."""
    return Path(path).name.split(".")[0]


def tokenize_text(tokenizer, text: str, batch_chars: int = 1 << 16) -> np.ndarray:
    """Tokens of a long text, encoded in line-aligned pieces (fast tokenizers run them in parallel)."""
    pieces = list(chunked([text], batch_chars))
    ids: list[int] = []
    for start in range(0, len(pieces), 256):
        for encoding in tokenizer.encode_batch(pieces[start : start + 256], add_special_tokens=False):
            ids.extend(encoding.ids)
    return np.asarray(ids, dtype=np.uint16)


@dataclass(frozen=True)
class ShardInfo:
    file: str
    source: str
    n_tokens: int


def write_token_shards(
    streams: dict[str, np.ndarray],
    out_dir: str | Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    vocab_size: int | None = None,
    level: int = 19,
) -> list[ShardInfo]:
    """Write each source's token stream as zstd shards of at most `max_shard_bytes` each."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compressor = Zstd(level=level)
    infos: list[ShardInfo] = []
    for source, tokens in streams.items():
        tokens = np.ascontiguousarray(tokens, dtype="<u2")
        # Compression rarely beats 2:1 on uint16 tokens; size pieces so that even 1:1 fits.
        step = max(1, max_shard_bytes // 2 - 4096)
        for part, start in enumerate(range(0, max(len(tokens), 1), step)):
            piece = tokens[start : start + step]
            blob = compressor.encode(piece.tobytes())
            if len(blob) > max_shard_bytes:
                raise ValueError(f"shard of {source} compressed to {len(blob)} bytes > {max_shard_bytes}")
            name = f"{source}.{part:03d}.u16.zst"
            (out / name).write_bytes(blob)
            infos.append(ShardInfo(file=name, source=source, n_tokens=int(len(piece))))
    index = {"dtype": "uint16", "vocab_size": vocab_size, "shards": [info.__dict__ for info in infos]}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return infos


def read_token_shards(shard_dir: str | Path) -> dict[str, np.ndarray]:
    """Load every shard listed in `index.json`, joined per source."""
    shard_dir = Path(shard_dir)
    index_path = shard_dir / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"no token shard index at {index_path}")
    index = json.loads(index_path.read_text())
    decompressor = Zstd()
    parts: dict[str, list[np.ndarray]] = {}
    for shard in index["shards"]:
        blob = decompressor.decode((shard_dir / shard["file"]).read_bytes())
        tokens = np.frombuffer(blob, dtype="<u2")
        if len(tokens) != shard["n_tokens"]:
            raise ValueError(f"{shard_dir / shard['file']}: {len(tokens)} tokens, index says {shard['n_tokens']}")
        parts.setdefault(shard["source"], []).append(tokens)
    return {source: np.concatenate(chunks) for source, chunks in parts.items()}


def build_token_shards(
    tokenizer,
    corpus_files: Sequence[str | Path],
    out_dir: str | Path,
    max_chars_per_source: dict[str, int] | None = None,
    extra_streams: dict[str, np.ndarray] | None = None,
) -> list[ShardInfo]:
    """Tokenise corpus files (one source each) and write their shards plus `extra_streams`."""
    from tqdm.auto import tqdm

    limits = max_chars_per_source or {}
    eos = tokenizer.token_to_id(EOS_TOKEN)
    streams: dict[str, np.ndarray] = {}
    for path in tqdm(list(corpus_files), desc="tokenise", unit="source"):
        name = source_name(path)
        text = read_text(path, limits.get(name))
        tokens = tokenize_text(tokenizer, text)
        streams[name] = np.concatenate([tokens, np.asarray([eos], dtype=np.uint16)])
    streams.update(extra_streams or {})
    return write_token_shards(streams, out_dir, vocab_size=tokenizer.get_vocab_size())


def encode_chat_stream(hf_tokenizer, examples: Iterable) -> np.ndarray:
    """Chat-form token stream of probe examples, one conversation after another."""
    ids: list[int] = []
    for example in examples:
        ids.extend(hf_tokenizer.apply_chat_template(list(example.messages), tokenize=True, return_dict=False))
    return np.asarray(ids, dtype=np.uint16)


class WindowSampler:
    """Random training windows of `seq_len + 1` tokens from token streams.

    Each window comes from one stream, picked with probability proportional to its weight
    (default: its length). The sampler's whole state is its numpy generator, so a checkpoint of
    `state()` resumes the exact same window sequence.
    """

    def __init__(self, streams: dict[str, np.ndarray], seq_len: int, weights: dict[str, float], seed: int):
        self.names = sorted(streams)
        self.streams = [streams[name] for name in self.names]
        for name, stream in zip(self.names, self.streams):
            if len(stream) <= seq_len + 1:
                raise ValueError(f"token stream {name!r} has {len(stream)} tokens, needs > {seq_len + 1}")
        total = np.asarray([weights[name] for name in self.names], dtype=np.float64)
        self.probs = total / total.sum()
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> np.ndarray:
        """`[batch_size, seq_len + 1]` int64 token windows."""
        which = self.rng.choice(len(self.streams), size=batch_size, p=self.probs)
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for row, stream_index in enumerate(which):
            stream = self.streams[stream_index]
            start = int(self.rng.integers(0, len(stream) - self.seq_len - 1))
            out[row] = stream[start : start + self.seq_len + 1]
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

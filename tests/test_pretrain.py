"""Teacher recipe: token shards round trip, exact resume after a stop, export loads and generates."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from recipes.config import PretrainConfig, TeacherModelConfig
from recipes.corpus import MAX_SHARD_BYTES, WindowSampler, read_token_shards, write_token_shards
from recipes.pretrain import SFT_SOURCE, export_teacher, learning_rate, pretrain, stream_weights

TINY = TeacherModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          max_position_embeddings=64)


def _config(**changes) -> PretrainConfig:
    base = PretrainConfig(model=TINY, seq_len=16, batch_size=4, micro_batch_size=2, total_tokens=6 * 64,
                          warmup_steps=2, compile=False, dtype="float32", checkpoint_every_s=1e9)
    return dataclasses.replace(base, **changes)


def _shards(path, seed=0):
    rng = np.random.default_rng(seed)
    streams = {"prose": rng.integers(3, 300, 5000).astype(np.uint16),
               "code": rng.integers(3, 300, 3000).astype(np.uint16),
               SFT_SOURCE: rng.integers(3, 300, 800).astype(np.uint16)}
    write_token_shards(streams, path, max_shard_bytes=4096, vocab_size=300)
    return streams


def test_shards_round_trip_and_size_limit(tmp_path):
    streams = _shards(tmp_path)
    files = [p for p in tmp_path.iterdir() if p.name.endswith(".zst")]
    assert len(files) > 3 and all(p.stat().st_size <= 4096 for p in files)
    loaded = read_token_shards(tmp_path)
    assert set(loaded) == set(streams)
    for name in streams:
        assert np.array_equal(loaded[name], streams[name])
    assert MAX_SHARD_BYTES == 40 * 1024 * 1024


def test_sampler_state_resumes_same_windows(tmp_path):
    streams = _shards(tmp_path)
    weights = stream_weights(streams, 0.25)
    assert abs(weights[SFT_SOURCE] - 0.25) < 1e-12 and abs(sum(weights.values()) - 1) < 1e-12
    a = WindowSampler(streams, 16, weights, seed=3)
    a.sample(5)
    state = a.state()
    expected = a.sample(7)
    b = WindowSampler(streams, 16, weights, seed=99)
    b.load_state(state)
    assert np.array_equal(b.sample(7), expected)


def test_learning_rate_schedule():
    cfg = _config(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert learning_rate(0, 100, cfg) == 1e-4
    assert abs(learning_rate(9, 100, cfg) - 1e-3) < 1e-12
    assert abs(learning_rate(100, 100, cfg) - 1e-4) < 1e-12
    assert learning_rate(50, 100, cfg) < learning_rate(20, 100, cfg)


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    shards = tmp_path / "shards"
    _shards(shards)
    cfg = _config()
    straight = pretrain(cfg, shards, tmp_path / "straight", device="cpu", log_every=1)
    assert straight["done"] and straight["step"] == 6
    first = pretrain(cfg, shards, tmp_path / "resumed", device="cpu", log_every=1, max_steps=2)
    assert not first["done"] and first["step"] == 2
    second = pretrain(cfg, shards, tmp_path / "resumed", device="cpu", log_every=1)
    assert second["done"] and second["tokens"] == straight["tokens"] == 6 * 64
    a = torch.load(tmp_path / "straight" / "checkpoints" / "latest.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "latest.pt", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(second["last_logged_loss"])


def test_export_loads_with_from_pretrained_and_generates(tmp_path, tiny_tokenizer):
    from tinyonn import load_teacher
    from tinyonn.evaluation.metrics import sample_answers

    shards = tmp_path / "shards"
    _shards(shards)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    pretrain(_config(model=dataclasses.replace(TINY, vocab_size=len(tiny_tokenizer))), shards, tmp_path / "run",
             device="cpu")
    out = export_teacher(tmp_path / "run", tmp_path / "tokenizer", tmp_path / "teacher", max_shard_size="20KB")
    weight_files = list(out.glob("*.safetensors"))
    assert len(weight_files) > 1  # split into several files
    model, tokenizer = load_teacher(out)
    assert next(model.parameters()).dtype == torch.float32
    state = json.loads((out / "training_state.json").read_text())
    assert state["tokens"] == 6 * 64 and (out / "training" / "train_log.jsonl").is_file()
    answer = sample_answers(model, tokenizer, ["Calculate: 2 + 2"], max_new_tokens=5)[0]
    assert isinstance(answer, str)

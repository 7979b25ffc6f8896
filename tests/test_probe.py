"""The probe's fast path against torch.func references; resume; nf4 against bf16."""

from __future__ import annotations


import pytest
import torch

from tinyonn import DataConfig, Example, collate, encode_examples, load_teacher
from tinyonn.config import ProbeConfig
from tinyonn.probe.run import probe_batch, teacher_targets
from tinyonn.probe.reference import activation_stats, per_sample_grad_norms
from tinyonn.probe.unit_stats import (choose_method, direct_flops, gram_flops, head_direct_flops,
                                        head_gram_flops)

PROMPTS = [
    ("What does the word harbour mean?", "A sheltered port where ships can stay."),
    ("Calculate: 23 + 19", "42"),
    ("def add(a, b):", "    return a + b\n"),
    ("Translate into English: Vosotros también los de Etiopía.", "Ye Ethiopians also."),
    ("Who was Ada?", "Ada Lovelace: an English mathematician who wrote the first published algorithm."),
]


def _batch(tokenizer, padding_side: str, count: int = 5):
    examples = [Example(messages=({"role": "user", "content": p}, {"role": "assistant", "content": r}),
                        category=f"c{i % 2}") for i, (p, r) in enumerate(PROMPTS[:count])]
    samples, _ = encode_examples(tokenizer, examples, DataConfig(max_length=64))
    assert len({len(s.input_ids) for s in samples}) > 2  # ragged
    return collate(samples, tokenizer.pad_token_id, padding_side)


def _relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((fast - reference).abs() / reference.abs().clamp_min(1e-12)).max())


@pytest.fixture(scope="module")
def tiny_fp32(tiny_teacher_dir):
    model, tokenizer = load_teacher(tiny_teacher_dir, dtype=torch.float32)
    return model, tokenizer


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", ["gram", "direct"])
def test_fast_gradient_norms_equal_vmap_grad(tiny_fp32, padding_side, method):
    model, tokenizer = tiny_fp32
    batch = _batch(tokenizer, padding_side)
    config = ProbeConfig(grad_method=method)
    fast = probe_batch(model, batch, config)
    units, heads = per_sample_grad_norms(model, batch)
    assert fast.grad.shape == units.shape == (5, 2 * 128)
    assert fast.head_grad.shape == heads.shape == (5, 2 * 4)
    assert _relative_error(fast.grad, units) < 1e-4
    assert _relative_error(fast.head_grad, heads) < 1e-4
    assert float(units.min()) > 0


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", ["gram", "direct"])
def test_graph_engine_equals_vmap_grad_and_the_hooks(tiny_fp32, padding_side, method):
    """The tapped-graph probe (`tinyonn.probe.graph`): one backward to zero taps gives every
    layer's ∂l/∂h and ∂l/∂y; its gradient norms equal vmap(grad) within 1e-4, and every statistic
    equals the hook path's."""
    model, tokenizer = tiny_fp32
    batch = _batch(tokenizer, padding_side)
    graph = probe_batch(model, batch, ProbeConfig(grad_method=method, engine="graph"))
    hooks = probe_batch(model, batch, ProbeConfig(grad_method=method, engine="hooks"))
    units, heads = per_sample_grad_norms(model, batch)
    assert _relative_error(graph.grad, units) < 1e-4
    assert _relative_error(graph.head_grad, heads) < 1e-4
    for name in ("act", "freq", "taylor", "head_out", "loss"):
        assert torch.allclose(getattr(graph, name), getattr(hooks, name), rtol=1e-5, atol=1e-6), name
    assert torch.equal(graph.n_tokens, hooks.n_tokens)
    assert graph.grad.grad_fn is None and all(p.grad is None for p in model.parameters())


def test_graph_engine_bucket_padding_changes_nothing(tiny_fp32):
    """Right-padding a batch to a length bucket (as the compiled graph probe does) leaves every
    per-sample statistic unchanged."""
    from tinyonn.probe import graph

    model, tokenizer = tiny_fp32
    batch = _batch(tokenizer, "right")
    config = ProbeConfig(engine="graph")
    plain = graph.graph_probe_batch(model, batch.input_ids, batch.attention_mask, batch.labels, config)
    padded = graph.graph_probe_batch(model, *graph.pad_to_bucket(batch.input_ids, batch.attention_mask,
                                                                 batch.labels, 0, bucket=48), config)
    for name in plain:
        assert torch.allclose(plain[name], padded[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_teacher_target_gradients(tiny_fp32, padding_side):
    """grad_target="teacher": the gradients are the exact per-sample norms against targets drawn
    from the teacher's own next-token distribution (the same as probing a batch whose response
    labels are those draws; vmap(grad) agrees), drawn reproducibly, only at response positions."""
    model, tokenizer = tiny_fp32
    batch = _batch(tokenizer, padding_side)
    drawn = teacher_targets(model, batch, seed=3)
    response = batch.labels != -100
    assert torch.equal(drawn.labels != -100, response) and torch.equal(drawn.input_ids, batch.input_ids)
    assert not torch.equal(drawn.labels[response], batch.labels[response])
    assert torch.equal(teacher_targets(model, batch, seed=3).labels, drawn.labels)
    assert not torch.equal(teacher_targets(model, batch, seed=4).labels, drawn.labels)
    teacher = probe_batch(model, batch, ProbeConfig(grad_target="teacher", target_seed=3))
    explicit = probe_batch(model, drawn, ProbeConfig())
    assert torch.equal(teacher.grad, explicit.grad) and torch.equal(teacher.act, explicit.act)
    units, _ = per_sample_grad_norms(model, drawn)
    assert _relative_error(teacher.grad, units) < 1e-4
    label = probe_batch(model, batch, ProbeConfig())
    assert torch.equal(teacher.act, label.act) and not torch.allclose(teacher.grad, label.grad)
    with pytest.raises(ValueError, match="grad_target"):
        probe_batch(model, batch, ProbeConfig(grad_target="kl"))


def test_auto_method_picks_the_cheaper_route_for_units_and_heads():
    assert choose_method("direct", gram_cost=1, direct_cost=10**9) == "direct"  # an explicit method stays
    for t, want in ((8, "gram"), (4096, "direct")):  # the Grams grow with T², the direct route with T
        assert choose_method("auto", gram_flops(t, 1024, 3072), direct_flops(t, 1024, 3072)) == want
        assert choose_method("auto", head_gram_flops(t, 1024, 2048), head_direct_flops(t, 1024, 2048)) == want


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_activation_stats_equal_unpadded_single_samples(tiny_fp32, padding_side):
    model, tokenizer = tiny_fp32
    batch = _batch(tokenizer, padding_side)
    fast = probe_batch(model, batch, ProbeConfig(freq_threshold=1.0))
    reference = activation_stats(model, batch, freq_threshold=1.0)
    assert _relative_error(fast.act, reference["act"]) < 1e-4
    assert _relative_error(fast.taylor, reference["taylor"]) < 1e-3 or torch.allclose(
        fast.taylor, reference["taylor"], rtol=1e-4, atol=1e-7)
    assert _relative_error(fast.head_out, reference["head_out"]) < 1e-4
    # a frequency can only move by one token's worth where |h| sits exactly at the threshold
    assert (fast.freq - reference["freq"]).abs().max() < 1e-6
    assert 0 < float(fast.freq.mean()) < 1
    n = (batch.labels != -100).sum(1)
    assert torch.equal(fast.n_tokens, n.int())


def _write_examples(path, count: int):
    import json

    with open(path, "w") as f:
        for i in range(count):
            prompt, response = PROMPTS[i % len(PROMPTS)]
            f.write(json.dumps({"prompt": f"{prompt} ({i})", "response": response * (1 + i % 3),
                                "category": ["code", "math", "prose"][i % 3]}) + "\n")


def _assert_stores_equal(a_path, b_path):
    import numpy as np
    import zarr

    a, b = zarr.open_group(a_path, mode="r"), zarr.open_group(b_path, mode="r")
    names_a = sorted(name for name, _ in a.arrays()) + sorted(
        f"{g}/{n}" for g, group in a.groups() for n, _ in group.arrays())
    assert names_a  # something to compare
    for group_name, group in [("", a)] + list(a.groups()):
        for name, array in group.arrays():
            other = b[f"{group_name}/{name}" if group_name else name]
            assert np.array_equal(array[...], other[...], equal_nan=True), f"{group_name}/{name}"
    assert dict(a.attrs) == dict(b.attrs)


def test_kill_9_then_resume_equals_uninterrupted_run(tiny_teacher_dir, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data.jsonl"
    _write_examples(data, 240)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(out):
        return [sys.executable, "-m", "tinyonn.cli", "probe", "--teacher", str(tiny_teacher_dir), "--data", str(data),
                "--out", str(out), "--chunk-samples", "4", "--batch-size", "2", "--max-length", "48"]

    subprocess.run(command(tmp_path / "straight" / "scores.zarr"), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed" / "scores.zarr"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text() or "{}").get("complete_chunks", [])) >= 3:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the probe finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = set(json.loads(progress.read_text())["complete_chunks"])
    assert 3 <= len(done_before) < 60
    resumed = subprocess.run(command(killed), env=env, check=True, capture_output=True, text=True)
    assert "60/60 complete" in resumed.stdout
    _assert_stores_equal(tmp_path / "straight" / "scores.zarr", killed)


def test_nf4_probe_correlates_with_bf16(capsys):
    from scipy.stats import spearmanr

    from tinyonn import load_probe_set, probe

    examples = load_probe_set("builtin", "validation")[::40][:48]
    grads = {}
    for quant, dtype in (("none", "bfloat16"), ("nf4", "bfloat16")):
        config = ProbeConfig(quant=quant, dtype=dtype, per_sample=False, heads=False, chunk_samples=48,
                             data=DataConfig(max_length=256, batch_size=16))
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            store = probe("builtin", examples, config, f"{tmp}/scores.zarr", progress=False)
            grads[quant] = store.summary_of("grad")
    rho = spearmanr(grads["none"], grads["nf4"]).statistic
    with capsys.disabled():
        print(f"\nnf4 vs bf16 probe: Spearman of per-unit gradient norms = {rho:.4f} over {len(grads['nf4'])} units")
    assert rho >= 0.9

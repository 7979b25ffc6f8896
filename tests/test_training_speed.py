"""The fast training loop: packed and length-grouped micro-batches under a token budget, the
host-side loss positions, the all-layer bookkeeping (surprise, keep masks, balance loss) against the
per-layer reference functions, the sync-free masked AdamW, one device read per step, and a bounded
number of compiled graphs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinyonn import load_probe_set, load_teacher
from tinyonn.clustering.plan import full_plan
from tinyonn.config import DataConfig
from tinyonn.data import EncodedSample
from tinyonn.model.assemble import assemble
from tinyonn.model.moe_layer import MoELayer
from tinyonn.model.routing import RoutingConfig, topk_mask
from tinyonn.training import TIMING_FIELDS, Phase1Config, Phase2Config, TrainConfig, train
from tinyonn.training.batches import MicroBatch, SampleArrays, collate_micro_batch, padding_fraction, plan_steps
from tinyonn.training.loop import topk_grid
from tinyonn.training.losses import router_z_loss, stacked_balance_loss, switch_balance_loss
from tinyonn.training.optim import MaskedAdamW
from tinyonn.training.rules import keep_experts, keep_grid, mask_expert_gradients, zero_dropped_rows
from tinyonn.training.surprise import ExpertRows, expert_surprise, min_k_from_pi, min_k_tensor

TRAINING = str(Path(__file__).resolve().parents[1] / "tinyonn" / "training")


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)[0]


def tiny_model(teacher, routing: RoutingConfig = RoutingConfig(mode="all")):
    return assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), routing)


def synthetic_samples(count: int, seed: int = 0, longest: int = 60) -> list[EncodedSample]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        n = int(torch.randint(2, longest + 1, (1,), generator=generator))
        ids = torch.randint(3, 250, (n,), generator=generator).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        labels[0] = -100
        samples.append(EncodedSample(tuple(ids), tuple(labels), "c", i))
    return samples


# ---------------------------------------------------------------- the data plan


def test_packed_plan_fills_fixed_shape_micro_batches_from_the_stream():
    samples = synthetic_samples(300)
    lengths = [len(s.input_ids) for s in samples]
    settings = dict(step_tokens=1000, micro_batch_tokens=256, packing=True, pack_length=64, fixed_rows=True)
    plan = plan_steps(samples, 8, 1, seed=3, max_steps=None, max_tokens=6000, **settings)
    assert plan == plan_steps(samples, 8, 1, seed=3, max_steps=None, max_tokens=6000, **settings)
    assert plan != plan_steps(samples, 8, 1, seed=4, max_steps=None, max_tokens=6000, **settings)
    stream = []
    for step in plan:
        assert len(step.layout) == 4 and all(len(m.rows) <= m.num_rows == 4 for m in step.layout)  # ⌈1000/256⌉
        assert all(m.length == 64 and m.packed for m in step.layout)
        for micro in step.layout:
            assert all(sum(lengths[i] for i in row) <= 64 for row in micro.rows)
        chosen = [i for m in step.micro_batches for i in m]
        assert step.tokens == sum(lengths[i] for i in chosen) > 0.8 * step.padded_tokens
        assert step.pairs == sum(lengths[i] - 1 for i in chosen)
        stream.append(sorted(chosen))
    # each step holds the next stretch of the epoch's permutation (as a set): the stream is unchanged
    order = __import__("numpy").random.default_rng((3, 0)).permutation(300).tolist()
    at = 0
    for chosen in stream:
        assert chosen == sorted(order[at:at + len(chosen)])
        at += len(chosen)
    assert sum(s.tokens for s in plan[:-1]) < 6000 <= sum(s.tokens for s in plan)
    assert padding_fraction(plan) < 0.15


def test_padded_plan_groups_by_length_within_the_budget():
    samples = synthetic_samples(200, seed=1)
    lengths = [len(s.input_ids) for s in samples]
    plan = plan_steps(samples, 8, 1, seed=0, max_steps=None, max_tokens=None, step_tokens=2000,
                      micro_batch_tokens=300, pad_to_multiple=8)
    assert sorted(i for s in plan for m in s.micro_batches for i in m) == list(range(200))  # one epoch
    for step in plan:
        assert step.tokens >= 2000 or step is plan[-1]
        for micro in step.layout:
            longest = max(lengths[i] for i in micro.samples)
            assert micro.length == -(-longest // 8) * 8 and micro.num_rows == len(micro.rows)
            assert micro.positions <= 300 or micro.num_rows == 1
        # longest first: the micro-batches' lengths never increase
        assert [m.length for m in step.layout] == sorted((m.length for m in step.layout), reverse=True)
    old = plan_steps(samples, 16, 1, seed=0, max_steps=None, max_tokens=None, pad_to_multiple=8)
    assert padding_fraction(plan) < padding_fraction(old)


def test_builtin_train_split_padding_before_and_after(builtin_tokenizer):
    from tinyonn.data import encode_examples

    samples, _ = encode_examples(builtin_tokenizer, load_probe_set("builtin", "train")[::4],
                                 DataConfig(max_length=512))
    old = plan_steps(samples, 16, 1, seed=0, max_steps=None, max_tokens=None, pad_to_multiple=64)
    packed = plan_steps(samples, 16, 1, seed=0, max_steps=None, max_tokens=None, step_tokens=65536,
                        micro_batch_tokens=16384, packing=True, pack_length=512, fixed_rows=True)
    assert padding_fraction(old) > 0.65 and padding_fraction(packed) < 0.04
    assert len({(m.num_rows, m.length) for s in packed for m in s.layout}) == 1


@pytest.fixture(scope="module")
def builtin_tokenizer():
    return load_teacher("builtin")[1]


# ---------------------------------------------------------------- micro-batch tensors


def test_packed_and_padded_micro_batches_give_the_same_logits(teacher):
    samples = synthetic_samples(6, seed=2, longest=30)
    arrays = [SampleArrays.of(s) for s in samples]
    lengths = [len(s.input_ids) for s in samples]
    order = sorted(range(6), key=lambda i: -lengths[i])
    from tinyonn.training.batches import pack_rows
    rows = pack_rows(lengths, order, 40)
    packed = MicroBatch(rows=tuple(tuple(r) for r in rows), length=40, num_rows=len(rows) + 1, packed=True)
    padded = MicroBatch(rows=tuple((i,) for i in packed.samples), length=32, num_rows=6)
    model = tiny_model(teacher).eval()
    for net, routing in ((teacher, None), (model, RoutingConfig(mode="all")),
                         (model, RoutingConfig(mode="budget", unit_budget=0.5))):
        if routing is not None:
            model.set_routing(routing)
        got = []
        for micro in (packed, padded):
            batch = collate_micro_batch(arrays, micro, 0)
            inputs = {k: v for k, v in dict(attention_mask=batch.attention_mask,
                                              position_ids=batch.position_ids).items() if v is not None}
            with torch.no_grad():
                logits = net(input_ids=batch.input_ids, use_cache=False, **inputs).logits.reshape(-1, 300)
            got.append((logits[batch.response_index], batch.response_targets, logits[batch.pair_index],
                        batch.tokens))
        assert torch.allclose(got[0][0], got[1][0], atol=1e-5) and torch.equal(got[0][1], got[1][1])
        assert torch.allclose(got[0][2], got[1][2], atol=1e-5) and got[0][3] == got[1][3] == sum(lengths)
    batch = collate_micro_batch(arrays, packed, 0)
    assert batch.token_weight.sum() == sum(lengths) and batch.input_ids.shape == (len(rows) + 1, 40)
    assert (batch.position_ids[-1] == torch.arange(40)).all()  # a padding row: one sequence of its own


# ---------------------------------------------------------------- all-layer bookkeeping


def layers_of_different_sizes(seed: int = 0) -> list[MoELayer]:
    torch.manual_seed(seed)
    return [MoELayer(5, [2, 3, 1, 2], [0, 0, 1, 1], shared_size=2), MoELayer(5, [1, 1, 2, 2, 1, 3], [0, 1, 0, 1, 0, 1],
                                                                                shared_size=0),
            MoELayer(5, [4, 1], [0, 0], shared_size=1)]


def test_stacked_surprise_row_masks_and_keep_grid_match_the_per_layer_functions():
    layers = layers_of_different_sizes()
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        for param in layer.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
    layers[1].w_up.grad = None  # no gradient: read as zeros
    rows = ExpertRows(layers)
    stacked = rows.stacked_surprise()
    for index, layer in enumerate(layers):
        assert torch.allclose(stacked[index, :layer.num_experts], expert_surprise(layer), rtol=1e-5)
        assert (stacked[index, layer.num_experts:] == 0).all()
    for trial in range(30):
        surprise = torch.randint(0, 4, (3, 6), generator=generator).float() / 4  # many ties
        activated = torch.rand(3, 6, generator=generator) > 0.4
        min_k = torch.randint(0, 7, (3,), generator=generator)
        for rule in ("smk", "samk", "selective", "full"):
            keep = keep_grid(rule, surprise, activated, min_k, rows.valid)
            for index, layer in enumerate(layers):
                e = layer.num_experts
                want = keep_experts(rule, surprise[index, :e], activated[index, :e], int(min_k[index]))
                assert keep[index, :e].tolist() == want.tolist(), (rule, trial, index)
                assert not keep[index, e:].any()
    keep = keep_grid("smk", stacked, stacked > 0, torch.tensor([2, 3, 1]), rows.valid)
    grads = {id(p): p.grad.clone() for p in rows.params if p.grad is not None}
    masks = rows.row_masks(keep)
    zero_dropped_rows(rows.params, masks)
    zeroed = {id(p): p.grad.clone() for p in rows.params if p.grad is not None}
    position = {id(p): k for k, p in enumerate(rows.params)}
    for index, layer in enumerate(layers):
        for param in (layer.w_gate, layer.w_up, layer.w_down):
            if param.grad is not None:
                param.grad = grads[id(param)].clone()
        want = mask_expert_gradients(layer, keep[index, :layer.num_experts])
        for param in (layer.w_gate, layer.w_up, layer.w_down):
            assert torch.equal(masks[position[id(param)]], want[param])
            if param.grad is not None:
                assert torch.equal(param.grad, zeroed[id(param)])


def test_min_k_tensor_and_topk_grid_and_balance_match_the_reference():
    for pi in (0.0, 0.1, 0.25, 0.26, 0.5, 0.99, 1.0, float("nan"), float("inf")):
        act_k = torch.tensor([1, 4, 7])
        got = min_k_tensor(torch.tensor(pi, dtype=torch.float32), act_k).tolist()
        assert got == [min_k_from_pi(float(torch.tensor(pi, dtype=torch.float32)), int(k)) for k in act_k]
    layers = layers_of_different_sizes(1)
    rows = ExpertRows(layers)
    generator = torch.Generator().manual_seed(1)
    scores = [torch.randn(9, layer.num_experts, generator=generator).log_softmax(-1) for layer in layers]
    masks = [(torch.rand(9, layer.num_experts, generator=generator) > 0.5).float() for layer in layers]
    weights = torch.tensor([1.0, 1, 0, 1, 1, 0, 0, 1, 1])
    kept = weights.bool()
    grid = rows.pad(scores, -math.inf)
    ks = torch.tensor([2, 3, 1])
    top = topk_grid(grid, ks)
    balance = stacked_balance_loss(grid, rows.pad(masks, 0.0), weights, int(weights.sum()), rows.experts)
    for index in range(3):
        e = layers[index].num_experts
        assert torch.equal(top[index, :, :e], topk_mask(scores[index], int(ks[index])))
        want = switch_balance_loss(scores[index][kept], masks[index][kept])
        assert torch.allclose(balance[index], want, rtol=1e-6)
    x = torch.randn(9, 5, generator=generator)
    z = router_z_loss(layers[1].router, x, weights, int(weights.sum()))
    assert torch.allclose(z, router_z_loss(layers[1].router, x[kept]), rtol=1e-6)


def test_masked_adamw_matches_a_row_selection_reference_and_leaves_masked_rows_bitwise():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    reference = [p.detach().clone() for p in ours]
    state = [dict(step=torch.zeros(p.shape[0], dtype=torch.int64), m=torch.zeros_like(p), v=torch.zeros_like(p))
             for p in reference]
    optimizer = MaskedAdamW(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        mask = torch.rand(6, generator=generator) > 0.5 if step else torch.zeros(6, dtype=torch.bool)
        lr = torch.tensor(1e-2 * (step + 1) / 6) if step % 2 else 1e-2 * (step + 1) / 6
        for group in optimizer.param_groups:
            group["lr"] = lr
        before = [p.detach().clone() for p in ours]
        before_state = {k: v.clone() for k, v in optimizer.state[ours[0]].items()} if step else None
        for p, q in zip(ours, reference):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step({ours[0]: mask})
        for q, s, rows in zip(reference, state, (mask, torch.ones(5, dtype=torch.bool))):
            index = rows.nonzero().flatten()
            s["step"][index] += 1
            steps = s["step"][index].double().reshape(-1, *[1] * (q.dim() - 1))
            lr_value = float(lr)
            p, g, m, v = q[index], q.grad[index], s["m"][index], s["v"][index]
            p = p * (1 - lr_value * 0.1)
            m = m.lerp(g, 0.1)
            v = v * 0.95 + 0.05 * g * g
            denom = (v.sqrt() / (1 - 0.95 ** steps).sqrt().float()) + 1e-8
            p = p - (lr_value / (1 - 0.9 ** steps)).float() * m / denom
            q[index], s["m"][index], s["v"][index] = p, m, v
        for p, q in zip(ours, reference):
            assert torch.allclose(p.detach(), q, atol=1e-6, rtol=1e-5), step
        assert torch.equal(ours[0].detach()[~mask], before[0][~mask])
        if before_state is not None:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(optimizer.state[ours[0]][key][~mask], before_state[key][~mask])
    assert optimizer.state[ours[0]]["step"].tolist() == state[0]["step"].tolist()


# ---------------------------------------------------------------- the loop


def short_config(**overrides) -> TrainConfig:
    settings = dict(data=DataConfig(max_length=64, batch_size=8), max_steps=6, max_tokens=None, lr=3e-3,
                    router_lr=1e-2, warmup_steps=2, z_loss_weight=1e-3, progress=False, checkpoint_every=0,
                    phase1=Phase1Config(steps=3, min_k_fraction=0.25),
                    phase2=Phase2Config(routing="budget", active_fraction=0.5), validation_per_category=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def read_log(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in (path / "log.jsonl").read_text().splitlines()]


SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.is_nonzero.default", "aten.equal.default", "aten.unique.default", "aten._unique2.default"}


class SyncCounter(TorchDispatchMode):
    """Records every op that needs the host to read a device value, by the innermost caller in
    tinyonn/training (or "elsewhere")."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        syncs = name in SYNCING or (name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 and
                                                                            isinstance(args[1], (list, tuple)) else [])))
        if syncs:  # the innermost caller outside torch itself
            frame = next(f for f in reversed(traceback.extract_stack())
                         if "/torch/" not in f.filename and f.filename != __file__)
            where = f"{Path(frame.filename).name}:{frame.name}"
            self.calls.append((name, where if frame.filename.startswith(TRAINING) else f"elsewhere {where}"))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_reads(reads: list[str]):
    """Record every Tensor.item/tolist/__float__/__int__/__bool__ called from tinyonn/training."""
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            frame = traceback.extract_stack()[-2]
            if frame.filename.startswith(TRAINING):
                reads.append(f"{name} {Path(frame.filename).name}:{frame.name}")
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_a_step_reads_the_device_once_and_log_every_keeps_the_log(teacher, tiny_tokenizer, tmp_path):
    from tinyonn.training.loop import Trainer

    examples = load_probe_set("builtin", "train")[::300]
    config = short_config(max_steps=4, phase1=Phase1Config(steps=2, min_k_fraction=0.25), rule="samk",
                          pi_modulated_lr=True, kd_tokens="all")
    trainer = Trainer(tiny_model(teacher), teacher, tiny_tokenizer, examples, config, tmp_path / "counted")
    trainer._prepare(resume=False)
    trainer._log_file = open(tmp_path / "counted.jsonl", "w")
    from tqdm.auto import tqdm
    trainer._progress = tqdm(disable=True)
    for phase in (1, 2):
        trainer.state.phase = phase
        trainer._set_phase_routing()
        counter, reads = SyncCounter(), []
        with counter, counting_reads(reads):
            trainer.pending.append(trainer._step(trainer.plan[trainer.state.step]))
            trainer._flush()
        # no op of the training code waits for a device value; one read, by the log, ends the step
        assert [call for call in counter.calls if not call[1].startswith("elsewhere")] == []
        assert reads == ["tolist loop.py:_flush"], reads
        # what other code reads: transformers' packed-sequence check, once per forward (student, teacher)
        assert {where for _, where in counter.calls} <= {"elsewhere masking_utils.py:find_packed_sequence_indices"}
    trainer._log_file.close()

    logs = []
    for every in (1, 3):
        train(tiny_model(teacher), teacher, tiny_tokenizer, examples, dataclasses.replace(config, log_every=every),
              tmp_path / str(every))
        logs.append(read_log(tmp_path / str(every)))
    assert len(logs[0]) == 4 and logs[0] == logs[1]


def test_packed_and_padded_layouts_train_the_same_first_step(teacher, tiny_tokenizer, tmp_path):
    examples = load_probe_set("builtin", "train")[::300]
    records = []
    for name, layout in (("packed", {}), ("original", dict(micro_batch_tokens=None)),
                         ("grouped", dict(packing=False, pad_to_multiple=8))):
        train(tiny_model(teacher), teacher, tiny_tokenizer, examples, short_config(max_steps=1, **layout),
              tmp_path / name)
        records.append(read_log(tmp_path / name)[0])
    for record in records[1:]:
        for key in ("loss", "ce", "kd", "balance", "router_distill", "z_loss", "tau", "surprise", "grad_norm"):
            assert record[key] == pytest.approx(records[0][key], rel=1e-5, abs=1e-7), key
        assert record["experts_updated"] == records[0]["experts_updated"]


def test_compiled_training_compiles_once_per_routing_mode(teacher, tiny_tokenizer, tmp_path):
    from torch._dynamo.utils import counters

    examples = load_probe_set("builtin", "train")[::300]
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    config = short_config(max_steps=5, compile=True, step_tokens=600, micro_batch_tokens=256,
                          phase1=Phase1Config(steps=2, min_k_fraction=0.25), z_loss_weight=0.0)
    summary = train(tiny_model(teacher), teacher, tiny_tokenizer, examples, config, tmp_path,
                    on_step=lambda step, record: graphs.append(counters["stats"]["unique_graphs"]))
    assert summary["steps"] == 5 and summary["phase2_start_step"] == 2
    # step 1 compiles the student (phase 1) and the teacher; step 3 recompiles the student for phase 2
    assert graphs[0] == graphs[1] and graphs[2] == graphs[3] == graphs[4], graphs
    assert graphs[2] - graphs[1] <= 2 and graphs[-1] <= 8, graphs
    torch._dynamo.reset()

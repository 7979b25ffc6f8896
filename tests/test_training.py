"""SMK training: surprise, PI (against sigma-pi), update rules, the masked AdamW, losses, the data plan,
checkpoints, a short real run on the tiny model (phase switch, log fields, lower validation loss), the
dense baseline, and kill -9 / SIGTERM + resume ending bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tinyonn import load_probe_set, load_teacher
from tinyonn.clustering.plan import full_plan
from tinyonn.config import DataConfig
from tinyonn.data import EncodedSample, collate, per_sample_loss, response_token_counts
from tinyonn.model.assemble import assemble
from tinyonn.model.moe_layer import MoELayer
from tinyonn.model.routing import RoutingConfig
from tinyonn.training import TIMING_FIELDS, Phase1Config, Phase2Config, TrainConfig, train
from tinyonn.training.batches import pad_to_multiple, plan_steps
from tinyonn.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from tinyonn.training.losses import (cross_entropy_sum, kd_positions, kl_to_teacher_sum, router_distillation_loss,
                                     router_z_loss, switch_balance_loss)
from tinyonn.training.optim import MaskedAdamW, scheduled_lr
from tinyonn.training.parameters import parameter_roles, select_trained
from tinyonn.training.phases import phase1_done, phase2_routing
from tinyonn.training.rules import keep_experts, mask_expert_gradients
from tinyonn.training.surprise import (expert_surprise, global_surprise, mean_entropy, min_k_from_pi, pi_score)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "train_tiny_run.py"


def small_layer(seed: int = 0) -> MoELayer:
    """A MoE layer of 4 experts (sizes 2, 3, 1, 2) over d=5, with a 2-unit shared expert."""
    torch.manual_seed(seed)
    return MoELayer(5, [2, 3, 1, 2], [0, 0, 1, 1], shared_size=2)


def set_grads(layer: MoELayer, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in layer.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)[0]


@pytest.fixture(scope="module")
def examples():
    return load_probe_set("builtin", "train")[::300], load_probe_set("builtin", "validation")[::60]


def tiny_model(teacher, routing: RoutingConfig = RoutingConfig(mode="all")):
    return assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), routing)


# ---------------------------------------------------------------- surprise and PI


def test_expert_surprise_is_each_experts_gradient_norm():
    layer = small_layer()
    set_grads(layer)
    expected = []
    for e in range(4):
        rows = slice(int(layer.expert_offsets[e]), int(layer.expert_offsets[e + 1]))
        squares = sum(float(p.grad[rows].double().square().sum()) for p in (layer.w_gate, layer.w_up, layer.w_down))
        expected.append(math.sqrt(squares))
    assert torch.allclose(expert_surprise(layer).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_expert_surprise_after_a_real_backward():
    layer = small_layer(3)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0, 1, 0]]).repeat(7, 1)  # experts 1 and 3 unused: no gradient
    layer(x, mask).square().sum().backward()
    surprise = expert_surprise(layer)
    assert surprise[1] == 0 and surprise[3] == 0 and surprise[0] > 0 and surprise[2] > 0
    grads = torch.cat([layer.w_gate.grad[:2], layer.w_up.grad[:2], layer.w_down.grad[:2]])
    assert torch.allclose(surprise[0], grads.norm(), rtol=1e-6)


def test_pi_equals_sigma_pi():
    from sigma_pi import SigmaPI, calculate_pi_torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        epsilon, tau, surprise = torch.rand(3, generator=generator) * torch.tensor([8.0, 6.0, 3.0])
        alpha, gamma = float(torch.rand(1, generator=generator) * 2), float(torch.rand(1, generator=generator))
        want = calculate_pi_torch(epsilon, tau, surprise, torch.tensor(alpha), torch.tensor(gamma))["pi_score"]
        assert abs(float(pi_score(epsilon, tau, surprise, alpha, gamma)) - float(want)) <= 1e-6

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 11))
    x, y = torch.randn(9, 6, generator=generator), torch.randint(0, 11, (9,), generator=generator)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    want = SigmaPI(alpha=0.7, gamma=0.3).calculate(model, loss.detach(), logits.detach())
    tau = mean_entropy(logits)
    surprise = global_surprise(p.grad for p in model.parameters())
    assert abs(float(tau) - want["tau"]) <= 1e-6 and abs(float(surprise) - want["surprise"]) <= 1e-6
    assert abs(float(pi_score(loss.detach(), tau, surprise, 0.7, 0.3)) - want["pi_score"]) <= 1e-6


def test_min_k_from_pi():
    assert [min_k_from_pi(pi, 4) for pi in (0.0, 0.1, 0.25, 0.26, 0.5, 0.99, 1.0)] == [1, 1, 1, 2, 2, 4, 4]
    assert min_k_from_pi(float("nan"), 5) == 1 and min_k_from_pi(0.9, 0) == 1


# ---------------------------------------------------------------- update rules and the optimiser


def test_keep_experts_per_rule():
    surprise = torch.tensor([0.5, 0.1, 0.0, 0.3, 0.1, 0.9])
    activated = torch.tensor([True, True, False, True, False, True])
    as_list = lambda mask: mask.nonzero().flatten().tolist()  # noqa: E731
    assert as_list(keep_experts("smk", surprise, activated, 3)) == [1, 2, 4]  # tie 0.1: lower index first
    assert as_list(keep_experts("samk", surprise, activated, 2)) == [1, 3]
    assert as_list(keep_experts("samk", surprise, activated, 9)) == [0, 1, 3, 5]
    assert as_list(keep_experts("selective", surprise, activated, 1)) == [0, 1, 3, 5]
    assert as_list(keep_experts("full", surprise, activated, 1)) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        keep_experts("pilf", surprise, activated, 1)


@pytest.mark.parametrize("rule", ["smk", "samk", "selective", "full"])
def test_rules_zero_exactly_their_gradients_and_masked_experts_stay_bitwise(rule):
    layer = small_layer()
    # surprises (hand-set through the gradients): expert e's rows hold e-dependent scales
    scale = torch.tensor([3.0, 1.0, 2.0, 0.5])
    set_grads(layer)
    optimizer = MaskedAdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.step()  # a first full step: every row has momentum, a step count and decayed weights
    generator = torch.Generator().manual_seed(5)
    for param in (layer.w_gate, layer.w_up, layer.w_down):
        param.grad = torch.nn.functional.normalize(torch.randn(param.shape, generator=generator), dim=1) \
            * (scale[layer.unit_expert] / (3.0 * layer.expert_sizes[layer.unit_expert]).sqrt()).unsqueeze(1)
    surprise = expert_surprise(layer)
    assert torch.allclose(surprise, scale, rtol=1e-5)
    activated = torch.tensor([True, True, False, True])
    keep = keep_experts(rule, surprise, activated, 2)
    expected = {"smk": [False, True, False, True], "samk": [False, True, False, True],
                "selective": [True, True, False, True], "full": [True, True, True, True]}[rule]
    assert keep.tolist() == expected
    before_grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    row_masks = mask_expert_gradients(layer, keep) if rule != "full" else {}
    rows = keep[layer.unit_expert]
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(layer, name).grad
        assert (grad[~rows] == 0).all() and torch.equal(grad[rows], before_grads[name][rows])
    for name in ("shared_gate", "shared_up", "shared_down", "router.main", "router.sub"):
        assert torch.equal(layer.get_parameter(name).grad, before_grads[name])

    weights = {name: p.detach().clone() for name, p in layer.named_parameters()}
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in layer.named_parameters()}
    optimizer.step(row_masks)
    for name in ("w_gate", "w_up", "w_down"):
        param = getattr(layer, name)
        assert torch.equal(param[~rows], weights[name][~rows])  # bitwise: no decay, no momentum
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[param][key][~rows], state[name][key][~rows]), key
        assert (param[rows] != weights[name][rows]).all(dim=1).all()
        assert (optimizer.state[param]["step"][rows] == 2).all()
    for name in ("shared_gate", "router.sub"):
        assert not torch.equal(layer.get_parameter(name), weights[name])


def test_masked_adamw_is_adamw_without_masks_and_counts_steps_per_row():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(()))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer = MaskedAdamW(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(5):
        for p, q in zip(ours, reference):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        optimizer.step()
        torch_adamw.step()
    for p, q in zip(ours, reference):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)

    # a row skipped in the first step takes its first Adam step later: |update| = lr (bias-corrected)
    param = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = MaskedAdamW([param], lr=0.1, weight_decay=0.0)
    param.grad = torch.ones(3, 2)
    optimizer.step({param: torch.tensor([True, False, True])})
    assert optimizer.state[param]["step"].tolist() == [1, 0, 1] and (param[1] == 0).all()
    param.grad = torch.ones(3, 2)
    optimizer.step()
    assert optimizer.state[param]["step"].tolist() == [2, 1, 2]
    assert torch.allclose(param[1], torch.full((2,), -0.1), atol=1e-6)


def test_learning_rate_schedule():
    lrs = [scheduled_lr(step, 20, 1.0, 5, 0.1) for step in range(20)]
    assert lrs[:5] == [0.2, 0.4, 0.6, 0.8, 1.0] and abs(lrs[-1] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ---------------------------------------------------------------- losses


def test_losses():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = torch.tensor([1, 2, 3])
    labels[1, 1:3] = torch.tensor([4, 5])
    ce, scored = cross_entropy_sum(logits, labels)
    counts = response_token_counts(labels)
    assert torch.allclose(ce, (per_sample_loss(logits, labels) * counts).sum()) and scored.shape == (5, 11)
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[1, 4:] = 0
    assert kd_positions(labels, attention, "response").sum() == 5 and kd_positions(labels, attention, "all").sum() == 8
    positions = kd_positions(labels, attention, "all")
    assert kl_to_teacher_sum(logits, logits.clone(), positions, 2.0).abs() < 1e-5
    other = torch.randn(2, 6, 11, generator=generator)
    kl = kl_to_teacher_sum(logits, other, positions, 1.0)
    rows, cols = positions.nonzero(as_tuple=True)
    p = other[rows, cols].softmax(-1)
    assert torch.allclose(kl, (p * (p.log() - logits[rows, cols].log_softmax(-1))).sum(), rtol=1e-5)

    uniform = torch.full((10, 4), math.log(0.25))
    mask = torch.eye(4).repeat(3, 1)[:10]
    mask[8:] = torch.tensor([1.0, 0, 0, 0])
    assert abs(float(switch_balance_loss(uniform, torch.eye(4).repeat(2, 1)[:8])) - 1.0) < 1e-6
    assert float(switch_balance_loss(uniform, mask)) == pytest.approx(1.0, abs=1e-6)  # P uniform: 1 whatever f
    skewed = torch.log_softmax(torch.tensor([[3.0, 0, 0, 0]]).repeat(10, 1), -1)
    assert float(switch_balance_loss(skewed, mask)) > 1.0

    scores = torch.log_softmax(torch.randn(5, 4, generator=generator), -1)
    mass = torch.rand(5, 4, generator=generator)
    want = -(mass / mass.sum(1, keepdim=True) * scores).sum(1).mean()
    assert torch.allclose(router_distillation_loss(scores, mass), want)

    layer = MoELayer(8, [2, 2, 2], [0, 0, 2], shared_size=0)  # group 1 empty
    z = router_z_loss(layer.router, torch.randn(6, 8, generator=generator))
    assert torch.isfinite(z) and z > 0


# ---------------------------------------------------------------- config, data plan, phases, checkpoints


def test_config_validates_and_round_trips():
    config = TrainConfig(rule="samk", phase1=Phase1Config(steps=3), phase2=Phase2Config(routing="budget"),
                         data=DataConfig(max_length=32, batch_size=2))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (dict(rule="pilf"), dict(kd_tokens="prompt"), dict(grad_accum=0), dict(max_steps=0),
                dict(pi_gamma=2.0), dict(betas=(0.9, 1.0)), dict(ce_weight=0, kd_weight=0), dict(pad_to_multiple=0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    for bad in (dict(switch="loss"), dict(min_k_fraction=0), dict(switch="converged", router_distill_weight=0)):
        with pytest.raises(ValueError):
            Phase1Config(**bad)
    with pytest.raises(ValueError):
        Phase2Config(k_min_fraction=0.5, k_max_fraction=0.2)


def test_data_plan_is_deterministic_with_epochs_and_budgets():
    samples = [EncodedSample(input_ids=(1,) * (3 + i % 4), labels=(-100,) + (1,) * (2 + i % 4), category="c", index=i)
               for i in range(10)]
    plan = plan_steps(samples, 2, 2, seed=7, max_steps=6, max_tokens=None)
    assert plan == plan_steps(samples, 2, 2, seed=7, max_steps=6, max_tokens=None)
    assert plan != plan_steps(samples, 2, 2, seed=8, max_steps=6, max_tokens=None)
    stream = [i for step in plan for micro in step.micro_batches for i in micro]
    assert len(stream) == 24 and sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert [step.epoch for step in plan] == [0, 0, 0, 1, 1, 2] and (plan[2].offset, plan[3].offset) == (8, 2)
    assert all(step.tokens == sum(len(samples[i].input_ids) for m in step.micro_batches for i in m) for step in plan)
    by_tokens = plan_steps(samples, 2, 1, seed=0, max_steps=None, max_tokens=40)
    assert sum(s.tokens for s in by_tokens[:-1]) < 40 <= sum(s.tokens for s in by_tokens)
    one_epoch = plan_steps(samples, 4, 1, seed=0, max_steps=None, max_tokens=None)
    assert [len(s.micro_batches[0]) for s in one_epoch] == [4, 4, 2]
    batch = collate(samples[:3], 0)
    padded = pad_to_multiple(batch, 4, 0)
    assert batch.input_ids.shape == (3, 5) and padded.input_ids.shape == (3, 8)
    assert torch.equal(padded.labels[:, :5], batch.labels) and (padded.labels[:, 5:] == -100).all()
    assert padded.attention_mask.sum() == batch.attention_mask.sum() and pad_to_multiple(padded, 4, 0) is padded


def test_phase_switch_rules():
    steps = Phase1Config(steps=5)
    assert not phase1_done(steps, 4, [1.0] * 4) and phase1_done(steps, 5, [])
    converged = Phase1Config(steps=100, switch="converged", min_steps=4, converge_window=2, converge_tol=0.05)
    assert not phase1_done(converged, 3, [1.0, 1.0, 1.0])  # before min_steps
    assert not phase1_done(converged, 4, [2.0, 1.8, 1.2, 1.0])  # still improving
    assert phase1_done(converged, 4, [1.0, 1.0, 0.99, 0.99])
    assert phase1_done(converged, 100, [3.0, 2.0, 1.0, 0.5])  # the bound
    capped = Phase1Config(steps=60)  # a 20-step run: phase 1 ends at half of it, so phase 2 runs
    assert not phase1_done(capped, 9, [], total_steps=20) and phase1_done(capped, 10, [], total_steps=20)
    assert not phase1_done(Phase1Config(steps=60, max_run_fraction=1.0), 19, [], total_steps=20)


def test_phase2_routing_and_budget(teacher):
    model = tiny_model(teacher)
    layers, base = model.moe_layers(), model.routing
    dynamic = phase2_routing(layers, base, Phase2Config(k_min_fraction=0.25, k_max_fraction=0.5), 128)
    assert (dynamic[0].mode, dynamic[0].k_min, dynamic[0].k_max) == ("dynamic", 2, 4)
    budget = phase2_routing(layers, base, Phase2Config(routing="budget", active_fraction=0.25), 128)
    model.set_routing(budget)
    with torch.no_grad():
        routed = model(torch.randint(3, 200, (2, 9)), output_router_logits=True).router_outputs
    assert all(float((r.mask * layer.expert_sizes).sum(1).max()) <= 32 for r, layer in zip(routed, layers))


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    model = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    optimizer = {"a/step": torch.zeros(3, dtype=torch.int64)}
    first = save_checkpoint(tmp_path, 4, model, optimizer, {"phase": 1}, keep=2)
    (tmp_path / ".tmp-step-00000009-1").mkdir()  # what a killed writer leaves
    save_checkpoint(tmp_path, 8, model, optimizer, {"phase": 2}, keep=2)
    save_checkpoint(tmp_path, 12, model, optimizer, {"phase": 2}, keep=2)
    assert not first.exists() and latest_checkpoint(tmp_path).name == "step-00000012"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008", "step-00000012"]
    loaded = load_checkpoint(tmp_path / "step-00000012")
    assert torch.equal(loaded.model["a"], model["a"]) and torch.equal(loaded.model["b"], model["b"])
    assert torch.equal(loaded.optimizer["a/step"], optimizer["a/step"])
    assert loaded.state["phase"] == 2 and loaded.state["step"] == 12
    save_checkpoint(tmp_path, 12, {"a": model["a"] + 1}, optimizer, {"phase": 3}, keep=2)  # the same step again
    assert load_checkpoint(tmp_path / "step-00000012").state["phase"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008", "step-00000012"]
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    with pytest.raises(ValueError):
        truncate_log(log, 3)


def test_rng_state_round_trips(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save_checkpoint(tmp_path, 1, {}, {}, {})
    want = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    from tinyonn.training.checkpoint import restore_rng_state
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path))
    restore_rng_state(checkpoint.state["rng"], checkpoint.rng)
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_parameter_roles(teacher):
    roles = parameter_roles(tiny_model(teacher))
    assert roles["backbone.model.layers.0.mlp.w_gate"] == "expert"
    assert roles["backbone.model.layers.0.mlp.shared_down"] == "shared"
    assert roles["backbone.model.layers.1.mlp.router.sub"] == "router"
    assert roles["backbone.model.layers.0.self_attn.q_proj.weight"] == "attention"
    assert roles["backbone.model.layers.0.self_attn.q_norm.weight"] == "norm"
    assert roles["backbone.model.norm.weight"] == "norm"
    assert roles["backbone.model.embed_tokens.weight"] == "embedding"
    dense = parameter_roles(teacher)
    assert dense["model.layers.0.mlp.up_proj.weight"] == "mlp" and "lm_head.weight" not in dense  # tied
    trained = select_trained(tiny_model(teacher), TrainConfig(train_routers=False, train_norms=True))
    assert set(trained.roles.values()) == {"expert", "shared", "norm"}


# ---------------------------------------------------------------- real runs


LOG_FIELDS = {"step", "phase", "epoch", "lr", "loss", "ce", "kd", "balance", "router_distill", "z_loss", "pi", "tau",
              "surprise", "grad_norm", "tokens", "response_tokens", "tokens_seen", "surprise_mean", "surprise_max",
              "min_k", "act_k", "experts_updated", "active_experts", "active_units", "active_experts_mean",
              "active_units_mean", "active_unit_fraction", "val_loss", "skipped", "skipped_steps", *TIMING_FIELDS}


def short_config(**overrides) -> TrainConfig:
    settings = dict(data=DataConfig(max_length=64, batch_size=8), max_steps=24, max_tokens=None, lr=3e-3,
                    router_lr=1e-2, warmup_steps=2, weight_decay=0.01, z_loss_weight=1e-3, progress=False,
                    phase1=Phase1Config(steps=8, min_k_fraction=0.25),
                    phase2=Phase2Config(routing="budget", active_fraction=0.5), checkpoint_every=10)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_short_run_lowers_validation_loss_switches_phase_and_logs_every_field(teacher, examples, tmp_path,
                                                                              tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    train_examples, validation = examples
    model = tiny_model(teacher)
    changed_experts = []
    previous = {id(layer): layer.w_gate.detach().clone() for layer in model.moe_layers()}

    def count_changed(step, record):
        counts = []
        for layer in model.moe_layers():
            moved = (layer.w_gate.detach() != previous[id(layer)]).any(1)
            counts.append(int(torch.zeros(layer.num_experts, dtype=torch.bool).index_put_(
                (layer.unit_expert[moved],), torch.tensor(True)).sum()))
            previous[id(layer)] = layer.w_gate.detach().clone()
        changed_experts.append((counts, record["experts_updated"]))

    summary = train(model, teacher, tiny_tokenizer, train_examples, short_config(eval_every=12), tmp_path,
                    validation=validation, on_step=count_changed)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 24 and all(set(record) == LOG_FIELDS for record in log)
    assert [r["phase"] for r in log] == [1] * 8 + [2] * 16 and summary["phase2_start_step"] == 8
    assert all(r["min_k"] == [2, 2] and r["experts_updated"] == [2, 2] for r in log[:8])  # 0.25 of 8 experts
    assert all(r["active_unit_fraction"] == 1.0 for r in log[:8])
    assert all(r["active_unit_fraction"] <= 0.5 and 1 <= min(r["min_k"]) <= max(r["act_k"]) for r in log[8:])
    assert all(counts == updated for counts, updated in changed_experts)  # exactly the kept experts moved
    assert log[0]["kd"] < 1e-6 and log[0]["router_distill"] > 0 and log[-1]["router_distill"] == 0
    assert log[11]["val_loss"] is not None and log[10]["val_loss"] is None
    before, after = summary["validation"]["before"]["all"]["nll"], summary["validation"]["after"]["all"]["nll"]
    assert after < before - 0.05, (before, after)
    assert summary["validation"]["teacher"]["all"]["nll"] == pytest.approx(before, abs=1e-4)  # all experts: the teacher
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert saved.routing[0].mode == "budget" and summary["routing"][0]["mode"] == "budget"
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000024"
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 24


def test_dynamic_phase2_and_converged_switch(teacher, examples, tmp_path, tiny_tokenizer):
    config = short_config(max_steps=10, rule="samk", grad_accum=2, data=DataConfig(max_length=48, batch_size=4),
                          phase1=Phase1Config(steps=8, switch="converged", min_steps=2, converge_window=1,
                                              converge_tol=10.0),
                          phase2=Phase2Config(routing="dynamic", top_p=0.3, k_min_fraction=0.125, k_max_fraction=0.5),
                          pi_modulated_lr=True, kd_tokens="all")
    summary = train(tiny_model(teacher), teacher, tiny_tokenizer, examples[0], config, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert summary["phase2_start_step"] == 2 and [r["phase"] for r in log[:3]] == [1, 1, 2]
    assert all(1 <= r["active_experts_mean"] <= 4 for r in log[2:])
    assert all(r["experts_updated"][i] <= r["min_k"][i] for r in log[2:] for i in range(2))


def test_dense_baseline_trains_the_teacher_copy(tiny_teacher_dir, teacher, examples, tmp_path, tiny_tokenizer):
    student, _ = load_teacher(tiny_teacher_dir)
    with pytest.raises(ValueError, match="rule 'full'"):
        train(student, teacher, tiny_tokenizer, examples[0], short_config(), tmp_path)
    mlp_before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    attention_before = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    summary = train(student, teacher, tiny_tokenizer, examples[0], short_config(rule="full", max_steps=6), tmp_path,
                    validation=examples[1])
    assert summary["dense"] and summary["steps"] == 6
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, mlp_before)
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, attention_before)
    assert summary["validation"]["after"]["all"]["nll"] < summary["validation"]["before"]["all"]["nll"]


def _run_script(run_dir: Path, teacher_dir: Path, config: TrainConfig, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), str(teacher_dir),
                             json.dumps(config.to_dict()), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _log_lines(run_dir: Path) -> int:
    path = run_dir / "train" / "log.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _deterministic(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMING_FIELDS}


def test_kill_and_sigterm_then_resume_equal_an_uninterrupted_run_bitwise(teacher, tiny_teacher_dir, tiny_tokenizer,
                                                                          tmp_path):
    config = short_config(max_steps=12, checkpoint_every=3, max_examples=48, validation_per_category=0,
                          phase1=Phase1Config(steps=5, min_k_fraction=0.25))
    for name in ("straight", "broken"):
        (tmp_path / name).mkdir()
        tiny_model(teacher).save_pretrained(tmp_path / name / "model")
        tiny_tokenizer.save_pretrained(tmp_path / name / "model")
    straight = _run_script(tmp_path / "straight", tiny_teacher_dir, config)

    broken = tmp_path / "broken"
    run = _run_script(broken, tiny_teacher_dir, config, "--pause", "0.3")
    _wait_for(lambda: (broken / "train" / "checkpoints" / "step-00000003").exists() and _log_lines(broken) >= 4, run)
    run.send_signal(signal.SIGKILL)  # kill -9: no handler runs
    run.wait()
    assert latest_checkpoint(broken / "train" / "checkpoints").name == "step-00000003"

    run = _run_script(broken, tiny_teacher_dir, config, "--resume", "--pause", "0.3")
    _wait_for(lambda: _log_lines(broken) >= 5, run)
    run.send_signal(signal.SIGTERM)  # a checkpoint at the end of the current step, then the process ends
    assert run.wait(timeout=60) == -signal.SIGTERM
    interrupted_at = int(latest_checkpoint(broken / "train" / "checkpoints").name.split("-")[1])
    assert 5 <= interrupted_at < 12 and _log_lines(broken) == interrupted_at

    run = _run_script(broken, tiny_teacher_dir, config, "--resume")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"steps": 12, "resumed_from_step": interrupted_at}
    out, err = straight.communicate(timeout=120)
    assert straight.returncode == 0, err

    logs = [[json.loads(line) for line in (tmp_path / name / "train" / "log.jsonl").read_text().splitlines()]
            for name in ("straight", "broken")]
    assert len(logs[0]) == 12 and [_deterministic(r) for r in logs[0]] == [_deterministic(r) for r in logs[1]]
    weights = [load_file(str(tmp_path / name / "train" / "model" / "model.safetensors")) for name in ("straight", "broken")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    states = [load_checkpoint(latest_checkpoint(tmp_path / name / "train" / "checkpoints")) for name in ("straight", "broken")]
    assert all(torch.equal(states[0].optimizer[key], states[1].optimizer[key]) for key in states[0].optimizer)
    assert not torch.equal(weights[0]["backbone.model.layers.0.mlp.w_up"],
                           tiny_model(teacher).moe_layers()[0].w_up.detach())

"""SMK training on a GPU: bf16 autocast with the model compiled by the `tinyonn` backend follows the
eager run, and the compiled graphs hold the MoE kernels (skipped without CUDA)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_compiled_bf16_training_follows_eager(tiny_teacher_dir, tiny_tokenizer, tmp_path):
    from tinyonn import compile as tinyonn_compile
    from tinyonn import load_probe_set, load_teacher
    from tinyonn.clustering.plan import full_plan
    from tinyonn.config import DataConfig
    from tinyonn.model.assemble import assemble
    from tinyonn.model.routing import RoutingConfig
    from tinyonn.training import Phase1Config, Phase2Config, TrainConfig, train

    teacher = load_teacher(tiny_teacher_dir)[0]
    examples = load_probe_set("builtin", "train")[::300]
    config = TrainConfig(device="cuda", data=DataConfig(max_length=64, batch_size=8), max_steps=8, max_tokens=None,
                         lr=3e-3, router_lr=1e-2, warmup_steps=2, z_loss_weight=1e-3, progress=False,
                         phase1=Phase1Config(steps=4, min_k_fraction=0.25),
                         phase2=Phase2Config(routing="budget", active_fraction=0.5), checkpoint_every=4)
    for graphs in tinyonn_compile.compiled_graphs.values():
        graphs.clear()
    logs = {}
    for compiled in (False, True):
        model = assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), RoutingConfig(mode="all"))
        summary = train(model, teacher, tiny_tokenizer, examples,
                        dataclasses.replace(config, compile=compiled, compile_backend="tinyonn"), tmp_path / str(compiled))
        assert summary["steps"] == 8 and summary["phase2_start_step"] == 4
        logs[compiled] = [json.loads(line) for line in (tmp_path / str(compiled) / "log.jsonl").read_text().splitlines()]
    for eager, compiled in zip(logs[False], logs[True]):
        assert eager["phase"] == compiled["phase"] and eager["active_unit_fraction"] == compiled["active_unit_fraction"]
        assert abs(eager["loss"] - compiled["loss"]) <= 0.03 * abs(eager["loss"]), (eager["loss"], compiled["loss"])
    forward = {str(n.target) for g in tinyonn_compile.compiled_graphs["forward"] for n in g.graph.nodes}
    assert "tinyonn.moe_experts.default" in forward

"""`tinyonn.release`: bf16 safetensors and a weights-only `.pth` that give the saved model's logits,
the plan's provenance, a model card with the evaluation table."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tinyonn import load_eval_set, load_probe_set, load_teacher
from tinyonn.clustering.plan import ExpertPlan, full_plan
from tinyonn.evaluation.evaluate import EvaluateConfig, evaluate
from tinyonn.evaluation.extract import budget_routing, routed_budgets
from tinyonn.model.assemble import assemble
from tinyonn.model.modeling import TinyONNForCausalLM
from tinyonn.release import PTH_NAME, ReleaseConfig, load_state_dict, release, teacher_dtype


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder's worth: a float32 TinyONN model of the builtin teacher (as `tinyonn run` saves
    it), its plan, and an evaluation report."""
    root = tmp_path_factory.mktemp("release")
    teacher, tokenizer = load_teacher("builtin")  # float32, as the pipeline loads it
    plan = full_plan(8, 1536, 16, groups=4, seed=1)
    plan.save(root / "plan")
    model = assemble(teacher, plan)
    model.set_routing(budget_routing(model, routed_budgets(model, 0.5, 1536), "oracle"))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    config = EvaluateConfig(sweep=(0.5,), items_per_category=1, nf4=False, bench_prompt_length=8, bench_new_tokens=2)
    evaluate(root / "model", "builtin", load_probe_set("builtin", "validation")[::500], load_eval_set("builtin"),
             config, out_dir=root / "report", log=lambda *_: None)
    return root


def test_release_round_trips_in_the_teachers_dtype(run):
    out = release(run / "model", run / "release", run / "plan", "builtin", report=run / "report" / "evaluate.json")
    assert teacher_dtype("builtin") == torch.bfloat16
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16", "I64"}  # weights; expert offsets
    full = (run / "model" / "model.safetensors").stat().st_size
    assert 0.45 < (out / "model.safetensors").stat().st_size / full < 0.55  # half the float32 model

    saved = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(loaded.parameters()).dtype == torch.bfloat16 and loaded.routing == saved.routing
    released = loaded.state_dict()
    for name, tensor in saved.state_dict().items():  # every weight is the saved one rounded to bf16
        assert torch.equal(released[name], tensor.to(released[name].dtype)), name
    ids = load_teacher("builtin")[1]("The harbour is a place where ships", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = loaded(input_ids=ids).logits.float()
        exact = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.bfloat16)(input_ids=ids).logits.float()
        assert torch.equal(got, exact)  # the release is the saved model in bf16, nothing else
        # bf16 tolerance against the float32 model, with every expert on (the 50% oracle routing can
        # pick another expert on a near tie in bf16, which no tolerance describes)
        every = [dataclasses.replace(r, mode="all") for r in saved.routing]
        with saved.routing_scope(every), loaded.routing_scope(every):
            reference, rounded = saved(input_ids=ids).logits, loaded(input_ids=ids).logits.float()
    assert (rounded - reference).abs().max() < 0.25  # the teacher's own bf16-vs-fp32 gap here is ~0.1
    assert torch.equal(rounded.argmax(-1), reference.argmax(-1))

    state = load_state_dict(out / PTH_NAME)  # torch.load(..., weights_only=True)
    assert set(state) == set(loaded.state_dict()) and state["backbone.lm_head.weight"].dtype == torch.bfloat16
    fresh = TinyONNForCausalLM._from_config(loaded.config, dtype=torch.bfloat16).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits.float(), got)

    origin = json.loads((out / "provenance.json").read_text())
    plan = ExpertPlan.load(run / "plan")
    assert origin["teacher"] == "builtin" and len(origin["layers"]) == 8
    assert origin["layers"][3]["experts"][5]["units"] == plan.layers[3].expert_units(5).tolist()
    teacher_bf16, _ = load_teacher("builtin", dtype=torch.bfloat16)
    units = torch.tensor(origin["layers"][3]["experts"][5]["units"])
    start = int(loaded.moe_layers()[3].expert_offsets[5])
    gate = teacher_bf16.model.layers[3].mlp.gate_proj.weight[units]
    assert torch.equal(loaded.moe_layers()[3].w_gate[start:start + len(units)], gate)  # provenance is true

    card = (out / "README.md").read_text()
    report = json.loads((run / "report" / "evaluate.json").read_text())
    assert "| TinyONN (as saved) |" in card and f"{report['teacher_ppl']['all']:.2f}" in card
    assert f"{report['model_ppl']['all']:.2f}" in card and "weights_only=True" in card
    assert (out / "tokenizer.json").is_file() and all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir())


def test_release_of_a_model_that_is_not_the_plans_is_an_error(run, tmp_path):
    other = ExpertPlan.load(run / "plan")
    full_plan(8, 1536, 8).save(tmp_path / "plan")
    with pytest.raises(ValueError, match="not the plan's"):
        release(run / "model", tmp_path / "release", tmp_path / "plan", "builtin")
    assert other.layers[0].num_experts == 16
    with pytest.raises(ValueError, match="dtype"):
        ReleaseConfig(dtype="int4")

"""`release`: a TinyONN model as a folder a person can publish.

    <out>/model.safetensors   the weights in the teacher's dtype (bf16 for the builtin teacher)
    <out>/tinyonn.pth         the same state dict for `torch.load(path, weights_only=True)`
    <out>/config.json, generation_config.json, tokenizer files   (`from_pretrained(<out>)` loads it)
    <out>/provenance.json     per layer and expert, the teacher units it holds (from the plan)
    <out>/README.md           model card: what it is, how to load it, the evaluation table

The provenance is checked against the model: each expert's size must be the plan's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyonn.clustering.plan import ExpertPlan
from tinyonn.files import write_text_atomic

PTH_NAME = "tinyonn.pth"


@dataclass(frozen=True)
class ReleaseConfig:
    """How a release is written."""

    dtype: str | None = None
    """Weights' dtype; None: the teacher's (its config's `dtype`, bf16 when it names none)."""
    name: str = "TinyONN"
    """The model's name in the card."""

    def __post_init__(self):
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"ReleaseConfig.dtype must be None, float32, bfloat16 or float16, got {self.dtype!r}")


def teacher_dtype(teacher: str | Path) -> torch.dtype:
    """The dtype a teacher's checkpoint is stored in (its config's `dtype`; bf16 when absent or quantised)."""
    from tinyonn.teacher import read_config_json, resolve_teacher_source

    where = resolve_teacher_source(teacher)
    if not Path(where).is_dir():  # a hub id
        from transformers import AutoConfig

        raw = AutoConfig.from_pretrained(where).to_dict()
    else:
        raw = read_config_json(where)
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    if "quantization_config" in raw or name not in ("float32", "bfloat16", "float16"):
        name = "bfloat16"
    return getattr(torch, name)


def provenance(model, plan: ExpertPlan, teacher: str) -> dict:
    """Per layer: the shared expert's teacher units and, per routed expert, its group, concept cell
    and teacher units (in the model's packing order). Raises if the model's experts are not the
    plan's."""
    layers = []
    for index, (layer, layer_plan) in enumerate(zip(model.moe_layers(), plan.layers, strict=True)):
        sizes = [int(n) for n in layer.expert_sizes.tolist()]
        if sizes != [int(n) for n in layer_plan.expert_sizes] or layer.shared_gate.shape[0] != len(layer_plan.shared_units):
            raise ValueError(f"layer {index}: the model's experts ({len(sizes)}, shared "
                             f"{layer.shared_gate.shape[0]}) are not the plan's ({layer_plan.num_experts}, shared "
                             f"{len(layer_plan.shared_units)}): release the model with the plan it was assembled from")
        layers.append({
            "layer": int(layer_plan.layer),
            "shared_units": [int(u) for u in layer_plan.shared_units],
            "experts": [{"expert": e, "group": int(layer_plan.expert_group[e]), "cell": int(layer_plan.expert_cell[e]),
                         "units": [int(u) for u in layer_plan.expert_units(e)]}
                        for e in range(layer_plan.num_experts)],
        })
    return {"teacher": teacher, "method": plan.method, "intermediate_size": plan.intermediate_size,
            "kept_fraction": plan.kept_fraction(), "summary": plan.summary(), "cells": list(plan.cells),
            "layers": layers,
            "note": "units are the teacher's FFN neuron indices within each layer: row j of gate_proj and "
                    "up_proj, column j of down_proj; expert e's units are packed in this order in the weights"}


def release(model, out_dir: str | Path, plan: ExpertPlan | str | Path, teacher: str | Path = "builtin",
            tokenizer=None, report: dict | str | Path | None = None,
            config: ReleaseConfig = ReleaseConfig()) -> Path:
    """Write the release folder of `model` (a TinyONN model or a saved folder) at `out_dir`
    (replaced whole): safetensors and a `.pth` state dict in the teacher's dtype, config, tokenizer
    (`tokenizer`, else the model folder's, else the teacher's), `provenance.json` from `plan` (an
    `ExpertPlan` or its folder) and a model card with the evaluation table of `report` (the dict or
    `evaluate.json` that `tinyonn.evaluate` wrote)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyonn.teacher import resolve_teacher_source

    source = Path(model) if isinstance(model, (str, Path)) else None
    dtype = getattr(torch, config.dtype) if config.dtype else teacher_dtype(teacher)
    if source is not None:
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"no TinyONN model in {source} (config.json missing)")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        model = _cast_copy(model, dtype)
    plan = plan if isinstance(plan, ExpertPlan) else ExpertPlan.load(plan)
    if tokenizer is None:
        found = source is not None and (source / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(source if found else resolve_teacher_source(teacher))
    if isinstance(report, (str, Path)):
        report = json.loads(Path(report).read_text()) if Path(report).is_file() else None

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # model.safetensors (tied weights once) + config
    tokenizer.save_pretrained(tmp)
    torch.save(model.state_dict(), tmp / PTH_NAME)  # tied tensors share one storage
    origin = provenance(model, plan, str(teacher))
    write_text_atomic(tmp / "provenance.json", json.dumps(origin, indent=1))
    write_text_atomic(tmp / "README.md", model_card(model, origin, report, config, dtype))
    for path in tmp.iterdir():
        path.chmod(0o644)  # a folder to publish (safetensors writes its file owner-only)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _cast_copy(model, dtype: torch.dtype):
    """The model in `dtype`, leaving the caller's model as it was."""
    import copy

    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A release's `.pth` state dict, loaded with `weights_only=True` (plain tensors, no code)."""
    return torch.load(Path(path), weights_only=True, map_location="cpu")


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"


def model_card(model, origin: dict, report: dict | None, config: ReleaseConfig, dtype: torch.dtype) -> str:
    """The release's README.md: what the model is, how to load it, where it came from, its evaluation."""
    from tinyonn.evaluation.evaluate import format_table

    text = model.config.text_config
    layers = origin["layers"]
    experts = [len(layer["experts"]) for layer in layers]
    shared = [len(layer["shared_units"]) for layer in layers]
    routing = sorted({(r.mode, round(r.unit_budget, 4)) for r in model.routing})
    lines = [
        f"# {config.name}",
        "",
        f"A sparse mixture of experts built from the FFN neurons of `{origin['teacher']}` "
        f"({model.config.teacher_model_type}, {text.num_hidden_layers} layers, {text.intermediate_size} FFN units "
        f"per layer) by Tiny-ONN: experts are groups of the teacher's own units "
        f"(partition `{origin['method']}`, {origin['kept_fraction']:.0%} of the units kept).",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {sum(p.numel() for p in model.parameters()):,} ({str(dtype).removeprefix('torch.')}) |",
        f"| experts per layer | {_span(experts)} routed + a shared expert of {_span(shared)} units |",
        f"| routing | {', '.join(f'{mode} (unit budget {budget:.1%} of routed units)' for mode, budget in routing)} |",
        "",
        "## Loading",
        "",
        "```python",
        "import tinyonn  # registers the `tinyonn` model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")",
        "",
        "import torch  # or the plain state dict, no code executed on load:",
        f"state = torch.load(\"<this folder>/{PTH_NAME}\", weights_only=True)",
        "```",
        "",
        "`provenance.json` lists, per layer and expert, the teacher units it holds (row j of `gate_proj` "
        "and `up_proj`, column j of `down_proj`).",
        "",
        "## Evaluation",
        "",
    ]
    if report is None:
        lines.append("Not evaluated (no `report/evaluate.json`).")
    else:
        lines += [
            f"Held-out perplexity over {report['examples']} examples ({report['heldout_tokens']:,} response tokens) "
            f"and accuracy on {report['items']} multiple-choice items (length-normalised log-likelihood, "
            f"beside chance), measured by `tinyonn.evaluate` on {report.get('device', '?')}; FFN units active "
            "per token and the cost per token are measured from the routing on the held-out examples.",
            "",
            format_table(report),
            "",
            "Per category (held-out perplexity, teacher → TinyONN as saved):",
            "",
            "| category | teacher | TinyONN |",
            "|---|---:|---:|",
            *(f"| {c} | {report['teacher_ppl'][c]:.2f} | {report['model_ppl'][c]:.2f} |"
              for c in report["teacher_ppl"]),
        ]
        speed = report.get("efficiency")
        if speed:
            lines += ["", f"Speed on {speed['teacher']['device']} (batch {speed['teacher']['batch']}, "
                          f"{speed['teacher']['prompt_length']}-token prompts, {speed['teacher']['new_tokens']} new tokens):",
                      "", "| model | prefill tok/s | decode tok/s | peak memory MiB |", "|---|---:|---:|---:|"]
            for name in ("teacher", "tinyonn"):
                row = speed[name]
                memory = f"{row['peak_memory_mib']:.0f}" if row["peak_memory_mib"] is not None else "–"
                lines.append(f"| {name} | {row['prefill_tok_s']:,.0f} | {row['decode_tok_s']:,.1f} | {memory} |")
    return "\n".join(lines) + "\n"

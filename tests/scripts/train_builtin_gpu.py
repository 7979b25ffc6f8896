"""SMK training of a TinyONN built from the builtin teacher on one GPU: tok/s per layout and compile mode.

    python tests/scripts/train_builtin_gpu.py OUT_DIR [STEPS] [RUNS]

Assembles every unit of the builtin teacher into 28 experts per layer, trains phase 1 for a quarter
of the steps and phase 2 at a 50% unit budget, and writes `OUT_DIR/train_builtin_gpu.json`
(steady-state tok/s per phase, first-step seconds (the compile), peak memory, losses, validation
before/after) for each of RUNS (comma-separated, default all):

    old        16 samples a step, padded to the longest (×64), eager: the layout first measured
    eager      packed: 64k tokens a step in micro-batches of 16k positions (rows of 512), eager
    inductor   the same, compiled with Inductor (one shape: compiles once per phase)
    tinyonn    the same, compiled with the tinyonn backend (ragged Triton expert kernels)
"""

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from tinyonn import load_teacher
from tinyonn.clustering.plan import full_plan
from tinyonn.config import DataConfig
from tinyonn.data import load_probe_set
from tinyonn.model.assemble import assemble
from tinyonn.model.routing import RoutingConfig
from tinyonn.training import Phase1Config, Phase2Config, TrainConfig, train
from tinyonn.training.run import per_category

out = Path(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
runs = sys.argv[3].split(",") if len(sys.argv) > 3 else ["old", "eager", "inductor", "tinyonn"]
teacher, tokenizer = load_teacher("builtin", dtype=torch.bfloat16, device="cuda")
examples = load_probe_set("builtin", "train")
validation = per_category(load_probe_set("builtin", "validation"), 20)
base = TrainConfig(data=DataConfig(max_length=512), step_tokens=65536, micro_batch_tokens=16384, max_steps=steps,
                   max_tokens=None, lr=1e-4, router_lr=1e-3, warmup_steps=5, phase1=Phase1Config(steps=steps // 4),
                   phase2=Phase2Config(routing="budget", active_fraction=0.5), checkpoint_every=0, progress=False,
                   kd_tokens="all")
configs = {
    "old": dataclasses.replace(base, data=DataConfig(max_length=512, batch_size=16), step_tokens=None,
                               micro_batch_tokens=None),
    "eager": base,
    "inductor": dataclasses.replace(base, compile=True, compile_backend="inductor"),
    "tinyonn": dataclasses.replace(base, compile=True, compile_backend="tinyonn"),
}
results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": steps, "runs": {}}
for name in runs:
    model = assemble(teacher, full_plan(8, 1536, 28, groups=4, seed=0), RoutingConfig(mode="all"))
    torch.cuda.reset_peak_memory_stats()
    summary = train(model, teacher, tokenizer, examples, configs[name], out / f"run-{name}", validation=validation)
    log = [json.loads(line) for line in (out / f"run-{name}" / "log.jsonl").read_text().splitlines()]
    phase2 = [r["tok_per_s"] for r in log if r["phase"] == 2][3:]
    phase1 = [r["tok_per_s"] for r in log if r["phase"] == 1][3:]
    results["runs"][name] = {
        "tok_per_s_phase1": statistics.median(phase1) if phase1 else None,
        "tok_per_s_phase2": statistics.median(phase2) if phase2 else None,
        "first_step_s": log[0]["step_seconds"],
        "phase2_first_step_s": next((r["step_seconds"] for r in log if r["phase"] == 2), None),
        "tokens_per_step": statistics.mean(r["tokens"] for r in log), "memory_gib": log[-1]["memory_gib"],
        "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "ce_last": log[-1]["ce"],
        "active_unit_fraction": log[-1]["active_unit_fraction"],
        "val_nll_teacher": summary["validation"]["teacher"]["all"]["nll"],
        "val_nll_before": summary["validation"]["before"]["all"]["nll"],
        "val_nll_after": summary["validation"]["after"]["all"]["nll"],
        "elapsed_s": summary["elapsed_s"],
    }
    print(json.dumps({name: results["runs"][name]}), flush=True)
    del model
    torch.cuda.empty_cache()
(out / "train_builtin_gpu.json").write_text(json.dumps(results, indent=1))

"""The SMK quality table: partitions × training rules at a fraction of FFN units active per token,
beside the teacher and the dense fine-tuned teacher, on the builtin teacher → quality JSON.

Every row trains on the same tokens in the same order (the builtin probe train split, repeated in
epochs up to `--tokens`) and is measured on the same held-out examples (the first 100 of each
category of the validation split: per-category perplexity; the builtin evaluation set:
multiple-choice accuracy by length-normalised log-likelihood). The teacher's row is measured in the
same process. Rows:

    PARTITION:TRAINING:ACTIVE   e.g. pidiff-hdbscan:smk:0.5, random:none:0.5, dense:full:1.0

TRAINING is `none` (router warm-up only: the training-free model), `selective`, `smk`, `samk`
(phase 1 → phase 2 for each) or, with PARTITION `dense`, `full` (the teacher fine-tuned). Plans come
from `--plans DIR/<partition>/` (bench/extract_builtin.py writes them to stores/runs/builtin/plans).

    python bench/quality.py --plans stores/runs/builtin/plans --rows pidiff-hdbscan:smk:0.5 --tokens 2e6
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from tinyonn import DataConfig, load_eval_set, load_probe_set, load_teacher
from tinyonn.clustering import ExpertPlan
from tinyonn.evaluation.extract import (WarmupConfig, budget_routing, collect_router_data, routed_budgets,
                                        warm_up_routers)
from tinyonn.evaluation.metrics import heldout_perplexity, multiple_choice_eval
from tinyonn.model.assemble import assemble
from tinyonn.teacher import ffn_layout
from tinyonn.training import Phase1Config, Phase2Config, TrainConfig, train

EVAL_PER_CATEGORY = 100


def first_per_category(examples, count: int):
    by_category = defaultdict(list)
    for example in examples:
        by_category[example.category].append(example)
    return [e for category in sorted(by_category) for e in by_category[category][:count]]


def measure(model, tokenizer, validation, items) -> tuple[dict, dict]:
    """(perplexity per category and "all", multiple-choice accuracy per category)."""
    model.eval()
    data = DataConfig(max_length=512, batch_size=32)
    ppl = {c: v["ppl"] for c, v in heldout_perplexity(model, tokenizer, validation, data, 32).items()}
    mc = {c: v["accuracy"] for c, v in multiple_choice_eval(model, tokenizer, items).items() if v["accuracy"] is not None}
    return ppl, mc


def train_config(rule: str, active: float, tokens: int, args) -> TrainConfig:
    return TrainConfig(
        rule=rule, max_tokens=tokens, seed=0, lr=args.lr, router_lr=args.router_lr,
        data=DataConfig(max_length=512, batch_size=args.batch_size), grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, kd_tokens="all", validation_per_category=0,
        phase1=Phase1Config(steps=args.phase1_steps),
        phase2=Phase2Config(routing="budget", active_fraction=active),
        checkpoint_every=0, compile=not args.no_compile, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", required=True)
    parser.add_argument("--rows", required=True, help="comma-separated PARTITION:TRAINING:ACTIVE")
    parser.add_argument("--tokens", type=float, default=20e6, help="training tokens per row")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--router-lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--phase1-steps", type=int, default=150)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--mc-items", type=int, default=0, help="evaluation items to score (0: all; fewer for a smoke run)")
    parser.add_argument("--work", default="/tmp/quality", help="training outputs (checkpoints, logs)")
    parser.add_argument("--out", required=True, help="JSON file the rows are written to (rewritten after each row)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = load_teacher("builtin", device=device)
    teacher.eval()
    width = ffn_layout(teacher)[0].intermediate_size
    validation = first_per_category(load_probe_set("builtin", "validation"), EVAL_PER_CATEGORY)
    examples = load_probe_set("builtin", "train")
    items = load_eval_set("builtin")
    items = items[:: max(1, len(items) // args.mc_items)][: args.mc_items] if args.mc_items else items
    tokens = int(args.tokens)
    started = time.time()
    teacher_ppl, teacher_mc = measure(teacher, tokenizer, validation, items)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "validation_examples": len(validation), "eval_items": len(items),
        "train_examples": len(examples), "teacher_ppl_by_category": teacher_ppl,
        "teacher_mc_acc_by_category": teacher_mc, "settings": vars(args), "rows": [],
    }
    print(f"teacher: ppl {teacher_ppl['all']:.2f} ({time.time() - started:.0f} s)", flush=True)
    for spec in args.rows.split(","):
        partition, training, active = spec.split(":")
        active = float(active)
        row_started = time.time()
        summary = None
        if partition == "dense":
            student, _ = load_teacher("builtin", device=device)
            summary = train(student, teacher, tokenizer, examples, train_config("full", 1.0, tokens, args),
                            Path(args.work) / spec.replace(":", "_"))
            model = student
        else:
            model = assemble(teacher, ExpertPlan.load(Path(args.plans) / partition))
            budgets = routed_budgets(model, active, width)
            if training == "none":  # training-free: routers warmed on the teacher's expert mass
                warmup = WarmupConfig()
                warm_up_routers(model, collect_router_data(model, examples[:: max(1, len(examples) // 3000)],
                                                           tokenizer, warmup), warmup)
                model.set_routing(budget_routing(model, budgets, "budget"))
            else:
                summary = train(model, teacher, tokenizer, examples, train_config(training, active, tokens, args),
                                Path(args.work) / spec.replace(":", "_"))
        ppl, mc = measure(model, tokenizer, validation, items)
        row = {
            "partition": partition, "training": training, "active_frac": active,
            "tokens": summary["tokens"] if summary else 0,
            "ppl_by_category": ppl, "teacher_ppl_by_category": teacher_ppl,
            "ppl_ratio_max": max(ppl[c] / teacher_ppl[c] for c in teacher_ppl if c != "all"),
            "mc_acc_by_category": mc, "teacher_mc_acc_by_category": teacher_mc,
            "train_tok_s": summary["tok_per_s"] if summary else None,
            "active_unit_fraction": summary["final"]["active_unit_fraction"] if summary and partition != "dense" else None,
            "phase2_start_step": summary["phase2_start_step"] if summary else None,
            "steps": summary["steps"] if summary else 0,
            "seconds": round(time.time() - row_started, 1),
        }
        result["rows"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"{spec}: ppl {ppl['all']:.2f} (ratio max {row['ppl_ratio_max']:.3f}), "
              f"{row['tokens']:,} tokens at {row['train_tok_s'] or 0:,.0f} tok/s, {row['seconds']:.0f} s", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

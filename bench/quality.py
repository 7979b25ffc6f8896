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
    """One row's training: packed steps of `--step-tokens` (fixed-shape micro-batches), phase 1 for
    `--phase1-steps`, then phase 2 at the row's unit budget; the same for every row but the rule."""
    return TrainConfig(
        rule=rule, max_tokens=tokens, seed=0, lr=args.lr, router_lr=args.router_lr,
        data=DataConfig(max_length=512), step_tokens=args.step_tokens, micro_batch_tokens=args.micro_batch_tokens,
        warmup_steps=args.warmup_steps, kd_tokens="all", validation_per_category=0,
        phase1=Phase1Config(steps=args.phase1_steps),
        phase2=Phase2Config(routing="budget", active_fraction=active),
        checkpoint_every=0, compile=args.compile, progress=False, log_every=25)


def loss_curve(log_path: Path, points: int = 200) -> dict:
    """The run's per-step log thinned to about `points` steps: tokens seen, loss, CE, KD, phase."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    records = records[:: max(1, len(records) // points)] + records[-1:] if records else []
    return {key: [r[key] for r in records] for key in ("tokens_seen", "loss", "ce", "kd", "phase")}


def merge(paths: list[str], out: str) -> None:
    """One quality JSON from several runs' (rows run in parallel processes): settings and teacher
    figures must agree; rows are concatenated in the order given."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        for key in ("validation_examples", "eval_items", "train_examples"):
            if part[key] != first[key]:
                raise SystemExit(f"{path}: {key} {part[key]!r} differs from {paths[0]}'s {first[key]!r}")
        teacher, reference = part["teacher_ppl_by_category"], first["teacher_ppl_by_category"]
        if any(abs(teacher[c] / reference[c] - 1) > 0.01 for c in reference):  # bf16 GPU vs fp32 CPU: < 1%
            raise SystemExit(f"{path}: the teacher's perplexity differs from {paths[0]}'s by > 1%: not the same data")
        free = ("rows", "out", "work", "compile")  # compile changes speed, not the trained weights' recipe
        same = {k: v for k, v in part["settings"].items() if k not in free}
        if same != {k: v for k, v in first["settings"].items() if k not in free}:
            raise SystemExit(f"{path}: settings differ from {paths[0]}'s: not the same budget")
    rows = [{"device": part["device"], **row} for part in parts for row in part["rows"]]
    merged = {**first, "device": " + ".join(dict.fromkeys(row["device"] for row in rows)),
              "command": [p["command"] for p in parts], "dates": [p["date"] for p in parts],
              "parts": [Path(p).name for p in paths], "rows": rows}
    Path(out).write_text(json.dumps(merged, indent=1))
    print(f"{len(merged['rows'])} rows → {out}")


def table(path: str) -> str:
    """The quality JSON as a Markdown table: held-out perplexity per category (ratio to the teacher's
    in the last column), sorted by active fraction then overall perplexity."""
    result = json.loads(Path(path).read_text())
    teacher = result["teacher_ppl_by_category"]
    categories = [c for c in teacher if c != "all"]
    lines = ["| partition | training | active | " + " | ".join(categories) + " | all | max ratio | tok/s a row |",
             "|---|---|---|" + "---|" * (len(categories) + 3),
             "| teacher | – | 1.0 | " + " | ".join(f"{teacher[c]:.2f}" for c in categories) + f" | {teacher['all']:.2f} | 1.000 | – |"]
    for row in sorted(result["rows"], key=lambda r: (-r["active_frac"], r["ppl_by_category"]["all"])):
        ppl = row["ppl_by_category"]
        speed = f"{row['train_tok_s']:,.0f}" if row.get("train_tok_s") else "–"
        lines.append(f"| {row['partition']} | {row['training']} | {row['active_frac']:g} | "
                     + " | ".join(f"{ppl[c]:.2f}" for c in categories)
                     + f" | {ppl['all']:.2f} | {row['ppl_ratio_max']:.3f} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", help="DIR with one saved plan per partition")
    parser.add_argument("--rows", help="comma-separated PARTITION:TRAINING:ACTIVE")
    parser.add_argument("--tokens", type=float, default=20e6, help="training tokens per row")
    parser.add_argument("--step-tokens", type=int, default=65536, help="tokens per optimiser step (packed)")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384, help="positions per forward/backward")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--router-lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--phase1-steps", type=int, default=60)
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher (Inductor)")
    parser.add_argument("--mc-items", type=int, default=0, help="evaluation items to score (0: all; fewer for a smoke run)")
    parser.add_argument("--work", default="/tmp/quality", help="training outputs (checkpoints, logs)")
    parser.add_argument("--out", required=True, help="JSON file the rows are written to (rewritten after each row)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge these quality JSONs into --out and stop")
    parser.add_argument("--table", action="store_true", help="print --out as a Markdown table and stop")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if args.table:
        return print(table(args.out))
    if not args.plans or not args.rows:
        parser.error("--plans and --rows are required (or --merge)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile:  # each row compiles its student (two routings) and the teacher: room for a few rows
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.accumulated_recompile_limit = 1024
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
            "device": result["device"], "partition": partition, "training": training, "active_frac": active,
            "tokens": summary["tokens"] if summary else 0,
            "ppl_by_category": ppl, "teacher_ppl_by_category": teacher_ppl,
            "ppl_ratio_max": max(ppl[c] / teacher_ppl[c] for c in teacher_ppl if c != "all"),
            "mc_acc_by_category": mc, "teacher_mc_acc_by_category": teacher_mc,
            "train_tok_s": summary["tok_per_s"] if summary else None,
            "active_unit_fraction": summary["final"]["active_unit_fraction"] if summary and partition != "dense" else None,
            "phase2_start_step": summary["phase2_start_step"] if summary else None,
            "steps": summary["steps"] if summary else 0,
            "curve": loss_curve(Path(args.work) / spec.replace(":", "_") / "log.jsonl") if summary else None,
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

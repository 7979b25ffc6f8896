"""`evaluate`: a TinyONN model against its teacher, one protocol for every row.

Rows: the teacher in `dtype` (bf16 by default) and in nf4 (bitsandbytes; a row with an `error` when
it cannot run here), TinyONN as saved, and TinyONN at a sweep of unit budgets (fractions of the
teacher's FFN units per token, the saved routing's selection). Every row is measured on the same
held-out examples (`metrics.heldout_perplexity`) and evaluation items (`metrics.multiple_choice_eval`:
accuracy by length-normalised log-likelihood, chance, reference NLL), with its active parameters and
FLOPs per token from the routing counts measured on those examples (`efficiency.cost_per_token`).
Then prefill/decode speed and peak memory of TinyONN and the teacher at one batch and length.
Writes `evaluate.json` and `sparsity_quality.png` (quality against the measured active fraction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples
from tinyonn.evaluation.efficiency import cost_per_token, throughput
from tinyonn.evaluation.metrics import heldout_perplexity, multiple_choice_eval
from tinyonn.evaluation.sparsity import count_active_units
from tinyonn.files import write_text_atomic
from tinyonn.model.routing import RoutingConfig

PLOT_NAME = "sparsity_quality.png"


@dataclass(frozen=True)
class EvaluateConfig:
    """What `evaluate` measures. The defaults keep the builtin teacher's evaluation near a minute
    on two CPU cores; raise the counts and sizes on a GPU."""

    dtype: str | None = None
    """Compute dtype of the teacher row and of a TinyONN model loaded from a folder; None: the
    saved model's own (the model a run saves is the model it measures), the teacher in the same."""
    device: str | None = None
    """Where a model loaded from a folder runs (and the teachers beside it): None, CUDA when
    available, else the CPU. A model given as a module runs where it is."""
    nf4: bool = True
    """Add the teacher in nf4 (bitsandbytes) as a row."""
    sweep: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Fractions of the teacher's FFN units per token (shared + routed) for the sparsity–quality
    curve; a point routed like the saved model is measured once."""
    items_per_category: int | None = 1
    """Multiple-choice items per category, spread over the given items (None: every item)."""
    max_length: int = 512
    batch_size: int = 16
    flops_context: int = 512
    """Sequence length at which attention-score FLOPs per token are averaged."""
    benchmark: bool = True
    bench_batch: int = 1
    bench_prompt_length: int = 64
    bench_new_tokens: int = 16
    bench_repeats: int = 1

    def __post_init__(self):
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"EvaluateConfig.dtype must be None, float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.sweep or any(not 0 < f <= 1 for f in self.sweep):
            raise ValueError(f"EvaluateConfig.sweep must hold fractions in (0, 1], got {self.sweep!r}")
        for name in ("max_length", "batch_size", "flops_context", "bench_batch", "bench_prompt_length",
                     "bench_new_tokens", "bench_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EvaluateConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.bench_new_tokens < 2:
            raise ValueError("EvaluateConfig.bench_new_tokens must be ≥ 2 (one decode step after the prefill)")
        if self.items_per_category is not None and self.items_per_category < 1:
            raise ValueError(f"EvaluateConfig.items_per_category must be ≥ 1 or None, got {self.items_per_category}")



def select_items(items: Sequence[dict], per_category: int | None) -> list[dict]:
    """`per_category` multiple-choice items of each category, spread evenly over its items (in
    order, so the same items every time)."""
    if per_category is None:
        return list(items)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        if item.get("choices") and len(item["choices"]) > 1:
            by_category[item["category"]].append(item)
    chosen = []
    for category in sorted(by_category):
        pool = by_category[category]
        step = len(pool) / min(per_category, len(pool))
        chosen += [pool[int(i * step)] for i in range(min(per_category, len(pool)))]
    return chosen


def _length_sorted(tokenizer, examples: Sequence[Example], max_length: int) -> list[Example]:
    """The examples, shortest encoding first (batches of similar lengths pad less; results are
    per-category sums, so the order does not change them)."""
    samples, _ = encode_examples(tokenizer, list(examples), DataConfig(max_length=max_length))
    length = {s.index: len(s.input_ids) for s in samples}
    return [examples[i] for i in sorted(range(len(examples)), key=lambda i: length.get(i, 0))]


def _mc_overall(mc: dict[str, dict]) -> dict:
    """The categories' results pooled over items."""
    scored = [v for v in mc.values() if v["accuracy"] is not None]
    n = sum(v["mc_items"] for v in scored)
    items = sum(v["items"] for v in mc.values())

    def pooled(key: str) -> float | None:
        return sum(v[key] * v["mc_items"] for v in scored) / n if n else None

    return {"items": items, "mc_items": n, "accuracy": pooled("accuracy"), "accuracy_total": pooled("accuracy_total"),
            "chance": pooled("chance"), "ref_nll": sum(v["ref_nll"] * v["items"] for v in mc.values()) / max(items, 1)}


def _measure(model, tokenizer, held_out: Sequence[Example], items: Sequence[dict], config: EvaluateConfig,
             counts: count_active_units | None = None) -> dict:
    """Held-out perplexity (routing counted by `counts`, if given, on these forwards only) and the
    items' accuracy."""
    data = DataConfig(max_length=config.max_length, batch_size=config.batch_size)
    started = time.time()
    with counts if counts is not None else contextlib.nullcontext():
        ppl = heldout_perplexity(model, tokenizer, held_out, data, config.batch_size)
    mc = _measure_items(model, tokenizer, items, config)
    return {"ppl": ppl, "mc": mc, "seconds": round(time.time() - started, 2)}


def _measure_items(model, tokenizer, items: Sequence[dict], config: EvaluateConfig) -> dict:
    """Per category (and "all"): accuracy by length-normalised log-likelihood, chance, reference NLL."""
    if not items:
        return {}
    mc = multiple_choice_eval(model, tokenizer, items, config.batch_size, config.max_length)
    mc["all"] = _mc_overall(mc)
    return mc


def _routing_for(model, fraction: float) -> list[RoutingConfig]:
    """The saved routing's selection (router "budget" or "oracle"; "budget" for any other mode)
    within `fraction` of the teacher's FFN units per token, shared units included."""
    from tinyonn.evaluation.extract import budget_routing, routed_budgets

    mode = model.routing[0].mode if model.routing[0].mode in ("budget", "oracle") else "budget"
    width = model.config.text_config.intermediate_size
    return budget_routing(model, routed_budgets(model, fraction, width), mode)


def _same_routing(a: Sequence[RoutingConfig], b: Sequence[RoutingConfig]) -> bool:
    return all(dataclasses.replace(x, unit_budget=0.5) == dataclasses.replace(y, unit_budget=0.5)
               and abs(x.unit_budget - y.unit_budget) < 1e-6 for x, y in zip(a, b))


def _tinyonn_row(model, tokenizer, held_out, items, config: EvaluateConfig, name: str,
                 fraction: float | None) -> dict:
    width = model.config.text_config.intermediate_size
    counts = count_active_units(model)
    row = _measure(model, tokenizer, held_out, items, config, counts)
    return {"name": name, "kind": "tinyonn", "nominal_fraction": fraction,
            "routing": sorted({r.mode for r in model.routing}),
            "measured_active_fraction": counts.active_fraction(width),
            **cost_per_token(model, counts.routed_per_layer(), config.flops_context), **row}


def _teacher_row(teacher, tokenizer, held_out, items, config: EvaluateConfig, name: str, cost: dict) -> dict:
    row = _measure(teacher, tokenizer, held_out, items, config)
    return {"name": name, "kind": "teacher", "nominal_fraction": 1.0, "measured_active_fraction": 1.0,
            **cost, **row}


def _load_model(model, config: EvaluateConfig):
    from transformers import AutoModelForCausalLM

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no TinyONN model in {path} (config.json missing)")
        dtype = {"dtype": getattr(torch, config.dtype)} if config.dtype else {}
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return AutoModelForCausalLM.from_pretrained(path, **dtype).to(device).eval(), str(path)
    return model.eval(), None


def evaluate(model, teacher: str | Path = "builtin", held_out: Sequence[Example] = (), items: Sequence[dict] = (),
             config: EvaluateConfig = EvaluateConfig(), out_dir: str | Path | None = None, tokenizer=None,
             extra: dict | None = None, log=print) -> dict:
    """Measure `model` (a saved TinyONN folder, loaded in `config.dtype` or as saved, or a model,
    used as it is) against the teacher at `teacher` (a `load_teacher` source) on `held_out`
    examples and `items` (multiple choice). Returns the report; with `out_dir`, writes `evaluate.json` (the report plus
    `extra`) and the sparsity–quality PNG there. Top-level keys: `teacher_ppl` / `model_ppl`
    (perplexity per category), `measured_active_fraction` (the saved routing), `rows` (every row
    in full), `sweep` (the curve's points), `efficiency` (speed and memory)."""
    from tinyonn.teacher import load_teacher

    started = time.time()
    model, model_dir = _load_model(model, config)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    dtype_name = str(dtype).removeprefix("torch.")
    teacher_model, teacher_tokenizer = load_teacher(teacher, dtype=dtype, device=device)
    tokenizer = tokenizer or teacher_tokenizer
    held_out = _length_sorted(tokenizer, list(held_out), config.max_length)
    items = select_items(items, config.items_per_category)
    log(f"[evaluate] {len(held_out)} held-out examples, {len(items)} evaluation items, {dtype_name}")

    teacher_cost = cost_per_token(teacher_model, context=config.flops_context)
    rows = [_teacher_row(teacher_model, tokenizer, held_out, items, config, f"teacher {dtype_name}", teacher_cost)]
    log(f"[evaluate] teacher: ppl {rows[0]['ppl']['all']['ppl']:.2f} ({rows[0]['seconds']:.0f} s)")
    if config.nf4:
        rows.append(_nf4_row(teacher, tokenizer, held_out, items, config, teacher_cost, device))
    saved = list(model.routing)
    saved_row = _tinyonn_row(model, tokenizer, held_out, items, config, "TinyONN (as saved)", None)
    rows.append(saved_row)
    log(f"[evaluate] TinyONN as saved: ppl {saved_row['ppl']['all']['ppl']:.2f}, "
        f"{saved_row['measured_active_fraction']:.1%} of FFN units ({saved_row['seconds']:.0f} s)")
    for fraction in config.sweep:
        routing = _routing_for(model, fraction)
        if _same_routing(routing, saved):  # the saved model is this point of the curve
            saved_row["nominal_fraction"] = fraction
            continue
        with model.routing_scope(routing):
            rows.append(_tinyonn_row(model, tokenizer, held_out, items, config, f"TinyONN at {fraction:.0%}", fraction))
        log(f"[evaluate] TinyONN at {fraction:.0%}: ppl {rows[-1]['ppl']['all']['ppl']:.2f} ({rows[-1]['seconds']:.0f} s)")

    teacher_row = rows[0]
    report = {
        "config": dataclasses.asdict(config),
        "model_dir": model_dir, "teacher": str(teacher), "device": str(next(model.parameters()).device),
        "examples": len(held_out), "heldout_tokens": teacher_row["ppl"]["all"]["tokens"], "items": len(items),
        "teacher_ppl": {c: v["ppl"] for c, v in teacher_row["ppl"].items()},
        "model_ppl": {c: v["ppl"] for c, v in saved_row["ppl"].items()},
        "ppl_ratio_max": max(saved_row["ppl"][c]["ppl"] / teacher_row["ppl"][c]["ppl"]
                             for c in teacher_row["ppl"] if c != "all"),
        "measured_active_fraction": saved_row["measured_active_fraction"],
        "rows": rows,
        "sweep": _sweep_points(rows),
    }
    if config.benchmark:
        report["efficiency"] = _benchmark(model, teacher_model, tokenizer, config)
        log("[evaluate] speed: " + "; ".join(
            f"{name} prefill {v['prefill_tok_s']:,.0f} tok/s, decode {v['decode_tok_s']:,.1f} tok/s"
            for name, v in report["efficiency"].items() if name in ("teacher", "tinyonn")))
    report["seconds"] = round(time.time() - started, 2)
    report.update(extra or {})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_sparsity_quality(report, out / PLOT_NAME)
        report["plot"] = PLOT_NAME
        write_text_atomic(out / "evaluate.json", json.dumps(report, indent=1))
    return report


def _nf4_row(teacher, tokenizer, held_out, items, config: EvaluateConfig, cost: dict, device: torch.device) -> dict:
    """The teacher in nf4: loaded fresh for this row (bitsandbytes on CPU repacks nf4 weights in
    place after an eval forward, so a loaded nf4 model is never shared or dequantised), or why not."""
    from tinyonn.teacher import load_teacher

    name = "teacher nf4"
    try:
        quantised, _ = load_teacher(teacher, quant="nf4", dtype=torch.bfloat16, device=device)
        row = _teacher_row(quantised, tokenizer, held_out, items, config, name, cost)
        row["parameter_bytes"] = sum(p.numel() * p.element_size() for p in quantised.parameters())
    except Exception as err:  # bitsandbytes missing, no kernel for this CPU/GPU, ...
        return {"name": name, "kind": "teacher", "error": f"{type(err).__name__}: {err}"}
    finally:
        quantised = None
        gc.collect()
    return row


def _sweep_points(rows: list[dict]) -> list[dict]:
    points = []
    for row in rows:
        if row["kind"] != "tinyonn":
            continue
        mc = row["mc"].get("all", {}) if row.get("mc") else {}
        points.append({"name": row["name"], "nominal_fraction": row["nominal_fraction"],
                       "measured_active_fraction": row["measured_active_fraction"],
                       "ppl": row["ppl"]["all"]["ppl"], "accuracy": mc.get("accuracy"),
                       "active_parameters": row["active_parameters"], "flops_per_token": row["flops_per_token"]})
    return sorted(points, key=lambda p: p["measured_active_fraction"])


def _benchmark(model, teacher, tokenizer, config: EvaluateConfig) -> dict:
    sizes = dict(batch=config.bench_batch, prompt_length=config.bench_prompt_length,
                 new_tokens=config.bench_new_tokens, repeats=config.bench_repeats,
                 pad_token_id=tokenizer.pad_token_id or 0)
    result = {"teacher": throughput(teacher, **sizes), "tinyonn": throughput(model, **sizes)}
    result["tinyonn_over_teacher"] = {key: result["tinyonn"][key] / result["teacher"][key]
                                      for key in ("prefill_tok_s", "decode_tok_s")}
    return result


def plot_sparsity_quality(report: dict, path: str | Path) -> Path:
    """Held-out perplexity and evaluation accuracy against the measured fraction of FFN units
    active per token: the TinyONN sweep as a curve, the teacher rows as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["sweep"]
    x = [100 * p["measured_active_fraction"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("ppl", "held-out perplexity (all)"), ("accuracy", "evaluation accuracy (all)"))
    for ax, (key, label) in zip(axes, panels):
        values = [p[key] for p in points]
        if all(v is not None for v in values):
            ax.plot(x, values, "o-", color="tab:blue", label="TinyONN")
            for p, xv, v in zip(points, x, values):
                ax.annotate(p["name"].removeprefix("TinyONN "), (xv, v), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        for row, color in zip((r for r in report["rows"] if r["kind"] == "teacher" and "error" not in r),
                              ("tab:green", "tab:orange")):
            value = row["ppl"]["all"]["ppl"] if key == "ppl" else (row["mc"].get("all") or {}).get("accuracy")
            if value is not None:
                ax.axhline(value, color=color, linestyle="--", label=row["name"])
        if key == "accuracy":
            chance = next((r["mc"]["all"]["chance"] for r in report["rows"] if r.get("mc")), None)
            if chance is not None:
                ax.axhline(chance, color="grey", linestyle=":", label="chance")
        if key == "ppl" and values and all(v is not None and v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_xlabel("FFN units active per token (% of the teacher's, measured)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Sparsity–quality: {report['examples']} held-out examples, {report['items']} items")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    """The report's rows as a Markdown table (perplexity, accuracy beside chance, cost per token)."""
    lines = ["| model | FFN units active | held-out ppl | accuracy (chance) | ref. NLL | active params | GFLOPs/token |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | – | not run: {row['error'][:80]} | – | – | – | – |")
            continue
        mc = (row.get("mc") or {}).get("all") or {}
        accuracy = f"{mc['accuracy']:.3f} ({mc['chance']:.3f})" if mc.get("accuracy") is not None else "–"
        ref = f"{mc['ref_nll']:.3f}" if mc.get("ref_nll") is not None else "–"
        lines.append(f"| {row['name']} | {row['measured_active_fraction']:.1%} | {row['ppl']['all']['ppl']:.2f} | "
                     f"{accuracy} | {ref} | {row['active_parameters'] / 1e6:.2f} M | "
                     f"{row['flops_per_token'] / 1e9:.4f} |")
    return "\n".join(lines)


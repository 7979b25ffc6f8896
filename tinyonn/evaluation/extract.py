"""From a plan to a measured sparse model without training, and the table that compares partitions.

- Budget routing: per layer, the routed units a token may use so that shared + routed units stay
  within a fraction of the teacher's FFN units (`routed_budgets`, `budget_routing`).
- Routings compared: "oracle" (the experts holding the most activation mass of the layer's own
  dense computation, |h_j|·‖W_down[:, j]‖ summed over the expert: the best any router could do for
  the partition), "analytic" (each expert scored by its representative unit's |h|, with a
  load-balancing bias: no training, `tinyonn.model.calibrate`) and "learned" (the analytic router
  warmed up: experts frozen, the router fits each token's normalised expert mass, `warm_up_routers`).
- Output compensation on or off: each expert a token does not use adds its mean output over the
  calibration tokens on which it is not selected (`calibrate_compensation`).
- `convert` builds one such model (what a pipeline run saves); `evaluate_partitions` builds every
  partition once and measures every (routing, compensation, active fraction) row of it: held-out
  perplexity per category beside the teacher's and the conversion time, into `report/extract.json`.

Every perplexity here is `response_perplexity`: exp of the token-weighted mean NLL of the response
tokens, per category and "all" (DESIGN.md, "One evaluation protocol"), computed on length-sorted
batches with the LM head applied only at the scored positions (the same numbers as
`tinyonn.evaluation.metrics.heldout_perplexity` up to float rounding, in a fraction of the time).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tinyonn.clustering.calibration import Calibration, CalibrationConfig
from tinyonn.clustering.config import METHODS
from tinyonn.config import DataConfig
from tinyonn.data import EncodedSample, Example, collate, encode_examples, iter_batches, per_sample_loss
from tinyonn.model.calibrate import (AnalyticConfig, balance_router_bias, calibrate_compensation, clear_compensation,
                                     init_analytic_router)
from tinyonn.model.moe_layer import expert_mass
from tinyonn.model.routing import RoutingConfig

Routing = Literal["oracle", "analytic", "learned"]
ROUTINGS: tuple[Routing, ...] = ("oracle", "analytic", "learned")
PARTITIONS = METHODS


@dataclass(frozen=True)
class WarmupConfig:
    """Router warm-up: experts frozen, routers fit the teacher's per-token expert mass."""

    max_tokens: int = 60_000
    """`collect_router_data`: tokens read (the calibration-based warm-up uses the calibration's)."""
    epochs: int = 4
    batch_tokens: int = 2048
    lr: float = 3e-3
    weight_decay: float = 0.0
    recall_k: int = 4
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(max_length=256, batch_size=16))


# ---------------------------------------------------------------- budgets


def budget_routing(model, budgets: list[float], mode: str = "budget") -> list[RoutingConfig]:
    """Per-layer routing that keeps each token's routed units within `budgets[i]` in layer i,
    picked by the router (mode "budget") or by the oracle (mode "oracle")."""
    routing = []
    for layer, current, budget in zip(model.moe_layers(), model.routing, budgets):
        fraction = min(max(budget / float(layer.expert_sizes.sum()), 1e-9), 1.0)
        routing.append(dataclasses.replace(current, mode=mode, unit_budget=fraction))
    return routing


def routed_budgets(model, active_fraction: float, intermediate_size: int) -> list[float]:
    """Routed units allowed per token so that shared + routed ≤ active_fraction of the teacher's units."""
    budgets = []
    for layer in model.moe_layers():
        shared = layer.shared_gate.shape[0]
        budgets.append(max(active_fraction * intermediate_size - shared, 0.0))
    return budgets


def with_compensation(routing: Sequence[RoutingConfig], compensate: bool) -> list[RoutingConfig]:
    return [dataclasses.replace(r, compensate=compensate) for r in routing]


# ---------------------------------------------------------------- router warm-up


@torch.no_grad()
def collect_router_data(model, examples: list[Example], tokenizer, config: WarmupConfig) -> list[dict]:
    """Per MoE layer: MLP inputs x [N, d] and target expert-mass distributions [N, E] (all experts on)."""
    samples, _ = encode_examples(tokenizer, examples, config.data)
    layers = model.moe_layers()
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, i=i: inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(layers)]
    kept_masks, tokens = [], 0
    device = next(model.parameters()).device
    all_experts = [dataclasses.replace(routing, mode="all") for routing in model.routing]
    try:
        with model.routing_scope(all_experts):
            for batch in iter_batches(samples, config.data.batch_size, tokenizer.pad_token_id, "right"):
                mask = batch.attention_mask.to(device)
                model(input_ids=batch.input_ids.to(device), attention_mask=mask)
                kept_masks.append(mask.reshape(-1).bool())
                tokens += int(batch.attention_mask.sum())
                if tokens >= config.max_tokens:
                    break
    finally:
        for hook in hooks:
            hook.remove()
    keep = torch.cat(kept_masks)
    return [_router_targets(layer, torch.cat(xs)[keep]) for layer, xs in zip(layers, inputs)]


@torch.no_grad()
def calibration_router_data(model, calibration: Calibration) -> list[dict]:
    """Per MoE layer: the calibration tokens' MLP inputs (the teacher's: with every unit kept and
    every expert on, the model's are the same) and their expert-mass targets."""
    device = next(model.parameters()).device
    return [_router_targets(layer, x.to(device, model.dtype)) for layer, x in zip(model.moe_layers(), calibration.inputs)]


def _router_targets(layer, x: torch.Tensor) -> dict:
    mass = expert_mass(layer.dense_h(x), layer.w_down, layer.unit_expert, layer.num_experts)
    return {"x": x, "target": mass / mass.sum(1, keepdim=True).clamp_min(1e-20), "mass": mass}


def recall_at_k(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Mean fraction of the oracle's top-k experts (by mass) found in the router's top-k."""
    k = min(k, scores.shape[1])
    predicted = scores.topk(k, dim=1).indices
    truth = mass.topk(k, dim=1).indices
    hits = (predicted[:, :, None] == truth[:, None, :]).any(2).float().sum(1)
    return float((hits / k).mean())


def warm_up_routers(model, data: list[dict], config: WarmupConfig) -> list[dict]:
    """Fit each layer's router to the soft expert-mass targets (cross-entropy); returns per-layer
    metrics with recall@k before and after, on a held-out tenth of the tokens."""
    torch.manual_seed(config.seed)
    metrics = []
    for index, (layer, d) in enumerate(zip(model.moe_layers(), data)):
        n = d["x"].shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        held, train = order[: n // 10], order[n // 10:]
        router = layer.router
        before = recall_at_k(router.scores(d["x"][held]).detach(), d["mass"][held], config.recall_k)
        optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        for _ in range(config.epochs):
            shuffled = train[torch.randperm(len(train))]
            for start in range(0, len(shuffled), config.batch_tokens):
                idx = shuffled[start : start + config.batch_tokens]
                scores = router.scores(d["x"][idx])
                loss = -(d["target"][idx] * scores).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            held_scores = router.scores(d["x"][held])
            after = recall_at_k(held_scores, d["mass"][held], config.recall_k)
            held_loss = float(-(d["target"][held] * held_scores).sum(1).mean())
        metrics.append({"layer": index, "experts": layer.num_experts, "tokens": n,
                        f"recall@{config.recall_k}_before": before, f"recall@{config.recall_k}": after,
                        "held_out_cross_entropy": held_loss})
    return metrics


# ---------------------------------------------------------------- evaluation


def length_sorted_batches(samples: Sequence[EncodedSample], max_batch_tokens: int) -> list[list[int]]:
    """Sample indices in batches of similar length, each batch ≤ `max_batch_tokens` padded tokens."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].input_ids), i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(samples[i].input_ids) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


@torch.no_grad()
def response_perplexity(model, samples: Sequence[EncodedSample], pad_token_id: int,
                        max_batch_tokens: int = 8192) -> dict[str, float]:
    """Held-out perplexity per category and "all": exp of the token-weighted mean NLL over the
    response tokens, for a causal LM or a TinyONN model (its `backbone`)."""
    lm = getattr(model, "backbone", model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    device = next(model.parameters()).device
    nll: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for indices in length_sorted_batches(samples, max_batch_tokens):
        batch = collate([samples[i] for i in indices], pad_token_id, "right")
        hidden = decoder(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                         use_cache=False).last_hidden_state
        labels = batch.labels.to(device)
        losses = per_sample_loss(hidden, labels, head=head).double().cpu()
        tokens = (batch.labels[:, 1:] != -100).sum(1)
        for category, loss, n in zip(batch.categories, losses.tolist(), tokens.tolist()):
            nll[category] += loss * n
            count[category] += n
    out = {category: math.exp(nll[category] / count[category]) for category in sorted(count)}
    out["all"] = math.exp(sum(nll.values()) / sum(count.values()))
    return out


def first_per_category(examples: Sequence[Example], count: int | None) -> list[Example]:
    """The first `count` examples of each category, categories sorted (all of them for None)."""
    if not count:
        return list(examples)
    by_category: dict[str, list] = defaultdict(list)
    for example in examples:
        by_category[example.category].append(example)
    return [e for category in sorted(by_category) for e in by_category[category][:count]]


def ppl_ratio_max(ppl: dict[str, float], teacher: dict[str, float]) -> float:
    """Worst category's model ÷ teacher perplexity ("all" left out)."""
    return max(ppl[c] / teacher[c] for c in teacher if c != "all")


# ---------------------------------------------------------------- one conversion


def set_routing_state(model, calibration: Calibration, budgets: list[float], routing: Routing,
                      analytic: AnalyticConfig) -> dict[str, float]:
    """Route within `budgets` as `routing` says, compensation off: "oracle" picks by true mass,
    "analytic" balances the router bias for this budget first, "learned" uses the router as it is
    (warm it up before). Returns the seconds each step took."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    seconds = {}
    model.set_routing(with_compensation(budget_routing(model, budgets, "oracle" if routing == "oracle" else "budget"),
                                        False))
    clear_compensation(model)
    if routing == "analytic":
        start = time.perf_counter()
        balance_router_bias(model, calibration, analytic)
        seconds["balance_s"] = time.perf_counter() - start
    return seconds


def compensate(model, calibration: Calibration) -> float:
    """Calibrate output compensation for the model's current routing and switch it on; seconds."""
    start = time.perf_counter()
    calibrate_compensation(model, calibration)
    model.set_routing(with_compensation(model.routing, True))
    return time.perf_counter() - start


def convert(teacher, plan, calibration: Calibration, active_fraction: float, routing: Routing = "learned",
            compensation: bool = True, warmup: WarmupConfig | None = None,
            analytic: AnalyticConfig | None = None) -> tuple[torch.nn.Module, dict]:
    """The training-free TinyONN model of `plan` at `active_fraction` of the teacher's FFN units
    per token: analytic router from the calibration tokens (warmed up for "learned"), routing
    within the budget, output compensation if asked. Returns the model (its routing state set:
    what `save_pretrained` keeps is what was measured) and what the conversion did and took."""
    from tinyonn.model.assemble import assemble
    from tinyonn.teacher import ffn_layout

    analytic = analytic or AnalyticConfig()
    started = time.perf_counter()
    model = assemble(teacher, plan, RoutingConfig(router="analytic"))
    init_analytic_router(model, calibration, analytic)
    info: dict = {"routing": routing, "compensation": compensation, "active_fraction": active_fraction}
    if routing == "learned":
        info["warmup"] = warm_up_routers(model, calibration_router_data(model, calibration), warmup or WarmupConfig())
    budgets = routed_budgets(model, active_fraction, ffn_layout(teacher)[0].intermediate_size)
    info.update(set_routing_state(model, calibration, budgets, routing, analytic))
    if compensation:
        info["compensation_s"] = compensate(model, calibration)
    info["seconds"] = time.perf_counter() - started
    return model.eval(), info


# ---------------------------------------------------------------- the table


def _router_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".router." in k}


def evaluate_partitions(store, teacher="builtin", run_dir: str | Path = "stores/runs/default",
                        fractions: Sequence[float] = (0.25, 0.5, 0.75), cluster_config=None,
                        warmup: WarmupConfig | None = None, eval_per_category: int | None = 100,
                        methods: Sequence[str] = PARTITIONS, routings: Sequence[Routing] = ROUTINGS,
                        compensation: Sequence[bool] = (False, True), data: str = "builtin",
                        split: str = "validation", calibration: CalibrationConfig | None = None,
                        analytic: AnalyticConfig | None = None, save_fraction: float | None = 0.5,
                        max_batch_tokens: int = 8192, log=print) -> dict:
    """Build each partition once (the others with the first one's experts per layer: the same
    budget) and measure every (routing, compensation, active fraction) row: held-out perplexity per
    category beside the teacher's (measured once, on the same examples), the worst category's
    ratio and the conversion time. `data` ("builtin" or a folder of `{split}.jsonl*` files) gives
    the calibration tokens (its train split) and the evaluated examples (`split`, the first
    `eval_per_category` of each category); a single data file is split by
    `tinyonn.data.split_probe_set` (every 10th example held out). Per partition, the best non-oracle row at
    `save_fraction` is saved as `models/<partition>/` with `measured.json` (that row). Writes
    `report/extract.json` after every row."""
    from tinyonn.clustering.cluster import ClusterConfig, baseline_config, cluster
    from tinyonn.data import split_probe_set
    from tinyonn.model.assemble import assemble
    from tinyonn.store.zarr_store import ScoreStore
    from tinyonn.teacher import ffn_layout, load_teacher

    run_dir = Path(run_dir)
    warmup, analytic = warmup or WarmupConfig(), analytic or AnalyticConfig()
    calibration = calibration or CalibrationConfig()
    cluster_config = cluster_config or ClusterConfig()
    store = ScoreStore.open(store) if isinstance(store, (str, Path)) else store
    teacher_model, tokenizer = load_teacher(teacher) if isinstance(teacher, (str, Path)) else teacher
    intermediate = ffn_layout(teacher_model)[0].intermediate_size
    train_examples, held_out = split_probe_set(data, split)  # one data file: a held-out part, never calibrated on
    validation = first_per_category(held_out, eval_per_category)
    samples, _ = encode_examples(tokenizer, validation, DataConfig(max_length=512))

    def measure(model) -> dict[str, float]:
        return response_perplexity(model, samples, tokenizer.pad_token_id, max_batch_tokens)

    start = time.perf_counter()
    tokens = Calibration.collect(teacher_model, tokenizer, train_examples, calibration)
    calibration_s = time.perf_counter() - start
    start = time.perf_counter()
    teacher_ppl = measure(teacher_model)
    report: dict = {
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
        "teacher": str(teacher) if isinstance(teacher, (str, Path)) else "model",
        "store": str(store.path), "validation_examples": len(validation), "eval_per_category": eval_per_category,
        "fractions": list(fractions), "teacher_eval_seconds": time.perf_counter() - start,
        "calibration": {**dataclasses.asdict(calibration), "tokens": tokens.n_tokens, "seconds": calibration_s},
        "analytic": dataclasses.asdict(analytic), "warmup": dataclasses.asdict(warmup),
        "cluster_config": cluster_config.as_dict(),
        "convert_seconds": "calibration pass + cluster + assemble + analytic router (representatives) + the "
                           "row's routing set-up (analytic: bias balancing; learned: warm-up) + compensation",
        "teacher_ppl_by_category": teacher_ppl, "plans": {}, "rows": [],
    }
    log(f"teacher: {teacher_ppl}")
    main_plan = None
    for method in methods:
        config = dataclasses.replace(cluster_config, method=method)
        if main_plan is not None and method != main_plan.method:
            config = baseline_config(config, main_plan, method)  # same experts per layer: a fair budget
        start = time.perf_counter()
        plan = cluster(store, config, tokens)
        plan_s = time.perf_counter() - start
        main_plan = main_plan or plan
        plan.save(run_dir / "plans" / method)
        start = time.perf_counter()
        model = assemble(teacher_model, plan, RoutingConfig(router="analytic")).eval()
        init_analytic_router(model, tokens, analytic)
        base_s = calibration_s + plan_s + time.perf_counter() - start
        analytic_state = _router_state(model)
        budgets = {f: routed_budgets(model, f, intermediate) for f in fractions}
        entry: dict = {"plan": plan.summary(), "cluster_seconds": plan_s, "base_convert_seconds": base_s,
                       "routed_budget_units": {str(f): b for f, b in budgets.items()}}
        report["plans"][method] = entry
        best_saved = math.inf
        for routing in routings:
            model.load_state_dict(analytic_state, strict=False)
            state, setup_s = analytic_state, 0.0
            if routing == "learned":
                start = time.perf_counter()
                entry["warmup"] = warm_up_routers(model, calibration_router_data(model, tokens), warmup)
                setup_s = time.perf_counter() - start
                state = _router_state(model)
                entry["warmup_seconds"] = setup_s
            for fraction in fractions:
                model.load_state_dict(state, strict=False)
                seconds = base_s + setup_s + sum(set_routing_state(model, tokens, budgets[fraction], routing,
                                                                   analytic).values())
                for compensated in sorted(compensation):  # off first: on calibrates for the same routing
                    if compensated:
                        seconds += compensate(model, tokens)
                    ppl = measure(model)
                    row = {"partition": method, "routing": routing, "compensation": compensated,
                           "active_fraction": fraction, "ppl_by_category": ppl,
                           "teacher_ppl_by_category": teacher_ppl, "ppl_ratio_max": ppl_ratio_max(ppl, teacher_ppl),
                           "convert_seconds": seconds}
                    report["rows"].append(row)
                    log(f"{method:15s} {routing:8s} comp={int(compensated)} {fraction:.2f}: all {ppl['all']:.2f}, "
                        f"worst ratio {row['ppl_ratio_max']:.3f}, convert {seconds:.0f} s")
                    if routing != "oracle" and fraction == save_fraction and row["ppl_ratio_max"] < best_saved:
                        best_saved = row["ppl_ratio_max"]
                        save_measured(model, tokenizer, row, run_dir / "models" / method)
                    write_report(report, run_dir)
    report["ranking"] = rank_rows(report["rows"])
    write_report(report, run_dir)
    return report


def save_measured(model, tokenizer, row: dict, directory: Path) -> None:
    """The model as measured (weights, routing, compensation) with its tokenizer and `measured.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "measured.json").write_text(json.dumps(row, indent=1))


def rank_rows(rows: list[dict]) -> list[dict]:
    """(partition, routing, compensation) choices without the oracle, best first: by the geometric
    mean over the active fractions of the worst category's perplexity ratio (so the smallest
    budget's large ratios do not decide alone)."""
    logs: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row["routing"] != "oracle":
            logs[(row["partition"], row["routing"], row["compensation"])].append(math.log(row["ppl_ratio_max"]))
    ranked = sorted((key, math.exp(sum(v) / len(v))) for key, v in logs.items())
    ranked.sort(key=lambda item: item[1])
    return [{"partition": p, "routing": r, "compensation": c, "geomean_ppl_ratio_max": value}
            for (p, r, c), value in ranked]


def write_report(report: dict, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "report" / "extract.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def report_table(report: dict, fractions: Sequence[float] | None = None) -> str:
    """Markdown table of an extract report: per active fraction the teacher, then every row."""
    teacher = report["teacher_ppl_by_category"]
    categories = [c for c in teacher if c != "all"] + ["all"]
    lines = ["| active | partition | routing | comp. | " + " | ".join(categories) + " | worst ratio | convert s |",
             "|---:|---|---|---|" + "---:|" * (len(categories) + 2),
             "| 1.00 | teacher (dense) | – | – | " + " | ".join(f"{teacher[c]:.2f}" for c in categories) + " | 1.000 | – |"]
    rows = [r for r in report["rows"] if fractions is None or r["active_fraction"] in fractions]
    order = {m: i for i, m in enumerate(dict.fromkeys(r["partition"] for r in rows))}
    for row in sorted(rows, key=lambda r: (r["active_fraction"], order[r["partition"]], ROUTINGS.index(r["routing"]),
                                           r["compensation"])):
        ppl = row["ppl_by_category"]
        lines.append(f"| {row['active_fraction']:.2f} | {row['partition']} | {row['routing']} | "
                     f"{'on' if row['compensation'] else 'off'} | " + " | ".join(f"{ppl[c]:.2f}" for c in categories)
                     + f" | {row['ppl_ratio_max']:.3f} | {row['convert_seconds']:.0f} |")
    return "\n".join(lines)

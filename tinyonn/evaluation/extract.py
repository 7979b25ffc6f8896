"""From a plan to a measured sparse model: oracle routing, router warm-up, held-out evaluation.

- Oracle routing (routing mode "oracle"): at every MoE layer and token, the experts holding the most
  activation mass of the layer's own dense computation (|h_j| · ‖W_down[:, j]‖ summed over the
  expert's units), taken in descending order within the unit budget. It is the best a router could
  do for this partition.
- Router warm-up: experts frozen, each layer's router learns from the teacher which experts hold
  the most activation mass per token (soft targets: the normalised mass over experts); recall@k
  says how many of the oracle's top-k experts the router's top-k finds.
- `evaluate_partitions` builds the same budget three ways (PIDiff-guided HDBSCAN, random split,
  co-activation balanced k-means) and reports held-out perplexity per category for each, with
  oracle routing and with the warmed router, into `report/extract.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tinyonn.clustering.config import METHODS
from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples, iter_batches
from tinyonn.model.moe_layer import expert_mass
from tinyonn.model.routing import RoutingConfig


@dataclass(frozen=True)
class WarmupConfig:
    """Router warm-up: experts frozen, routers fit the teacher's per-token expert mass."""

    max_tokens: int = 60_000
    epochs: int = 4
    batch_tokens: int = 2048
    lr: float = 3e-3
    weight_decay: float = 0.0
    recall_k: int = 4
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(max_length=256, batch_size=16))


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
    data = []
    for layer, xs in zip(layers, inputs):
        x = torch.cat(xs)[keep]
        mass = expert_mass(layer.dense_h(x), layer.w_down, layer.unit_expert, layer.num_experts)
        data.append({"x": x, "target": mass / mass.sum(1, keepdim=True).clamp_min(1e-20), "mass": mass})
    return data


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


def heldout_perplexity_by_category(model, tokenizer, examples: list[Example], config: DataConfig) -> dict:
    """Token-weighted response perplexity per category and 'all' (see `tinyonn.evaluation.metrics`)."""
    from tinyonn.evaluation.metrics import heldout_perplexity

    measured = heldout_perplexity(model, tokenizer, examples, config, batch_size=config.batch_size)
    return {category: values["ppl"] for category, values in measured.items()}


def write_report(report: dict, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "report" / "extract.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def timed(fn, *args, **kwargs):
    start = time.time()
    value = fn(*args, **kwargs)
    return value, time.time() - start


PARTITIONS = METHODS


def evaluate_partitions(store, teacher="builtin", run_dir: str | Path = "stores/runs/default",
                        active_fraction: float = 0.5, cluster_config=None, warmup: WarmupConfig | None = None,
                        eval_per_category: int | None = 100, methods: tuple[str, ...] = PARTITIONS,
                        data: str = "builtin", split: str = "validation", log=print) -> dict:
    """Build each partition, measure held-out perplexity per category with oracle routing and with
    the warmed router at `active_fraction` of the FFN units active per token; write the report.
    `data` ("builtin" or a folder of `{split}.jsonl*` files) gives the router warm-up examples
    (its train split) and the evaluated ones (`split`, the first `eval_per_category` per category)."""
    from tinyonn.model.assemble import assemble
    from tinyonn.clustering.cluster import ClusterConfig, baseline_config, cluster
    from tinyonn.data import load_probe_set
    from tinyonn.store.zarr_store import ScoreStore
    from tinyonn.teacher import ffn_layout, load_teacher

    run_dir = Path(run_dir)
    warmup = warmup or WarmupConfig()
    cluster_config = cluster_config or ClusterConfig()
    store = ScoreStore.open(store) if isinstance(store, (str, Path)) else store
    teacher_model, tokenizer = load_teacher(teacher) if isinstance(teacher, (str, Path)) else teacher
    intermediate = ffn_layout(teacher_model)[0].intermediate_size
    validation = load_probe_set(data, split)
    if eval_per_category:
        by_category: dict[str, list] = defaultdict(list)
        for example in validation:
            by_category[example.category].append(example)
        validation = [e for c in sorted(by_category) for e in by_category[c][:eval_per_category]]
    train = load_probe_set(data, "train")
    train = train[:: max(1, len(train) // 3000)]
    eval_config = DataConfig(max_length=512, batch_size=16)
    import datetime
    import sys

    report: dict = {
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "teacher": str(teacher) if isinstance(teacher, (str, Path)) else "model",
        "store": str(store.path), "active_fraction": active_fraction,
        "validation_examples": len(validation), "warmup": dataclasses.asdict(warmup),
        "teacher_ppl": heldout_perplexity_by_category(teacher_model, tokenizer, validation, eval_config),
        "partitions": {},
    }
    log(f"teacher: {report['teacher_ppl']}")
    main_plan = None
    for method in methods:
        started = time.time()
        config = dataclasses.replace(cluster_config, method=method)
        if main_plan is not None and method != main_plan.method:
            config = baseline_config(config, main_plan, method)  # same experts per layer: a fair budget
        plan, cluster_seconds = timed(cluster, store, config)
        main_plan = main_plan or plan
        plan.save(run_dir / "plans" / method)
        model = assemble(teacher_model, plan).eval()
        budgets = routed_budgets(model, active_fraction, intermediate)
        model.set_routing(budget_routing(model, budgets, "oracle"))
        oracle = heldout_perplexity_by_category(model, tokenizer, validation, eval_config)
        data = collect_router_data(model, train, tokenizer, warmup)
        warm_metrics = warm_up_routers(model, data, warmup)
        model.set_routing(budget_routing(model, budgets, "budget"))
        routed = heldout_perplexity_by_category(model, tokenizer, validation, eval_config)
        model.save_pretrained(run_dir / "models" / method)
        report["partitions"][method] = {
            "plan": plan.summary(), "cluster_seconds": cluster_seconds,
            "oracle_ppl": oracle, "router_ppl": routed, "warmup": warm_metrics,
            "routed_budget_units": budgets, "seconds": time.time() - started,
        }
        log(f"{method}: oracle {oracle['all']:.2f}, router {routed['all']:.2f} "
            f"(recall@{warmup.recall_k} {sum(m[f'recall@{warmup.recall_k}'] for m in warm_metrics) / len(warm_metrics):.3f})")
        write_report(report, run_dir)
    return report


def report_table(report: dict) -> str:
    """Markdown table of the held-out perplexities in an extract report."""
    categories = [c for c in report["teacher_ppl"] if c != "all"] + ["all"]
    lines = ["| partition | routing | " + " | ".join(categories) + " |",
             "|---|---|" + "---:|" * len(categories),
             "| teacher (dense) | – | " + " | ".join(f"{report['teacher_ppl'][c]:.2f}" for c in categories) + " |"]
    for method, r in report["partitions"].items():
        for routing, key in (("oracle", "oracle_ppl"), ("warmed router", "router_ppl")):
            lines.append(f"| {method} | {routing} | " + " | ".join(f"{r[key][c]:.2f}" for c in categories) + " |")
    return "\n".join(lines)

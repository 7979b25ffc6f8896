"""What a token costs: active parameters and FLOPs (analytic), prefill/decode speed and peak memory.

Cost per token, for a dense teacher or a TinyONN model with measured routing counts:
- parameters outside the MLPs (embeddings, attention, norms, head; tied weights counted once) are
  always active; TinyONN adds its routers, its shared units and the routed units a token uses, each
  unit being a gate row, an up row and a down column (3·d parameters);
- FLOPs = 2 × the matrix parameters a token multiplies by (attention projections, head, routers,
  active units) + attention scores 4·heads·head_dim·t per layer for a token at position t,
  averaged over a sequence of `context` tokens. Embedding lookups and norms count no FLOPs.
The "oracle" routing computes every unit to choose (a reference, not a deployable router): its
FLOPs are counted as a router's would be, and the report says so.

Speed and memory are measured on the model's device at a given batch and length: prefill is one
forward over the prompts, decode the greedy steps after it (`generate` with a fixed number of new
tokens, minus the prefill). Peak memory: `torch.cuda.max_memory_allocated` on CUDA; on CPU the
weights' bytes plus the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) during the run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from torch import nn

from tinyonn.teacher import decoder_layers


def _outside_mlp(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if ".mlp" not in name]


def _text_config(model: nn.Module):
    return getattr(model.config, "text_config", None) or model.config


def cost_per_token(model: nn.Module, routed_per_layer: list[float] | None = None, context: int = 512) -> dict:
    """Active parameters and FLOPs per token. `model` is a dense causal LM (then every FFN unit is
    active) or a TinyONN model with `routed_per_layer` (mean routed units per token, measured)."""
    text = _text_config(model)
    d = int(text.hidden_size)
    backbone = getattr(model, "backbone", model)
    layers = decoder_layers(backbone)
    seen: set[int] = set()
    outside = 0
    for name, param in backbone.named_parameters(remove_duplicate=True):
        if ".mlp." not in name and id(param) not in seen:
            seen.add(id(param))
            outside += param.numel()
    linear = sum(module.weight.numel() for name, module in _outside_mlp(backbone) if isinstance(module, nn.Linear))
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or d // heads)
    attention_scores = 2 * heads * head_dim * (context + 1) * len(layers)  # 4·h·hd·t, t averaged over 1..context
    if hasattr(model, "moe_layers"):
        if routed_per_layer is None:
            raise ValueError("a TinyONN model needs routed_per_layer (measured routed units per token)")
        moe = model.moe_layers()
        router = sum(p.numel() for layer in moe for p in layer.router.parameters())
        shared = [layer.shared_gate.shape[0] for layer in moe]
        units = [s + r for s, r in zip(shared, routed_per_layer)]
    else:
        router = 0
        units = [float(layer.mlp.gate_proj.out_features) for layer in layers]
    ffn = 3 * d * sum(units)
    return {
        "active_parameters": int(round(outside + router + ffn)),
        "flops_per_token": int(round(2 * (linear + router + ffn) + attention_scores)),
        "ffn_units_per_layer": [round(u, 2) for u in units],
        "parts": {"outside_mlp_parameters": outside, "router_parameters": router, "ffn_parameters": round(ffn),
                  "attention_score_flops": attention_scores, "context": context},
    }


def _hwm_kib() -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    match = re.search(r"VmHWM:\s+(\d+)", status.read_text())
    return int(match.group(1)) if match else None


def _reset_peak(device: torch.device) -> int | None:
    """Reset the peak-memory counter; returns the CPU baseline (KiB) or None on CUDA/unknown."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return None
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _hwm_kib()


def _peak_mib(model: nn.Module, device: torch.device, baseline: int | None) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _hwm_kib()
    if baseline is None or peak is None:
        return None
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return weights / 2**20 + (peak - baseline) / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def throughput(model: nn.Module, batch: int = 1, prompt_length: int = 64, new_tokens: int = 16,
               repeats: int = 1, pad_token_id: int = 0, seed: int = 0) -> dict:
    """Prefill and decode tokens per second and peak memory of `model` on its device, for `batch`
    random prompts of `prompt_length` tokens and `new_tokens` greedy tokens (best of `repeats`,
    after one warm-up)."""
    device = next(model.parameters()).device
    vocab = int(_text_config(model).vocab_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt_length), generator=generator).to(device)
    mask = torch.ones_like(ids)

    def prefill() -> float:
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        _sync(device)
        return time.perf_counter() - start

    def generate() -> float:
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
        _sync(device)
        assert out.shape[1] == prompt_length + new_tokens
        return time.perf_counter() - start

    prefill()  # warm-up
    baseline = _reset_peak(device)
    prefill_s = min(prefill() for _ in range(repeats))
    generate_s = min(generate() for _ in range(repeats))
    decode_s = max(generate_s - prefill_s, 1e-9)
    return {
        "device": str(device), "batch": batch, "prompt_length": prompt_length, "new_tokens": new_tokens,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prefill_tok_s": batch * prompt_length / prefill_s,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s,  # the first new token comes from the prefill
        "peak_memory_mib": _peak_mib(model, device, baseline),
    }

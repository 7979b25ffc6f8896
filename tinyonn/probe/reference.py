"""Slow, obviously-correct references for the probe's statistics (tests and benchmarks use them).

`per_sample_grad_norms` is the naive route: `torch.func.vmap(grad(loss))` over the whole model's
MLP (and o_proj) weights, materialising every sample's full weight gradient. `activation_stats`
runs each sample alone, unpadded, through plain autograd.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from tinyonn.data import Batch, per_sample_loss
from tinyonn.teacher import decoder_layers, ffn_layout


def float_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 padding mask → [B, 1, T, T] additive causal mask (finite minimum, not -inf, so a
    fully masked pad row stays finite). A 4-D float mask keeps the model's forward vmap-friendly."""
    b, t = attention_mask.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, low)[:, None]


def _parameter_names(model, heads: bool) -> tuple[list[tuple[str, str, str]], list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    units = [(names[id(f.gate_proj.weight)], names[id(f.up_proj.weight)], names[id(f.down_proj.weight)])
             for f in ffn_layout(model)]
    o_proj = [names[id(layer.self_attn.o_proj.weight)] for layer in decoder_layers(model)] if heads else []
    return units, o_proj


def per_sample_grad_norms(model, batch: Batch, heads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms by `vmap(grad(...))`: units [B, U] and heads [B, H]."""
    units, o_proj = _parameter_names(model, heads)
    wanted = {n for triple in units for n in triple} | set(o_proj)
    params = {n: p.detach() for n, p in model.named_parameters() if n in wanted}
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    mask = float_attention_mask(batch.attention_mask.to(device), dtype)

    def sample_loss(p, input_ids, mask_4d, labels):
        out = functional_call(model, p, args=(), kwargs={"input_ids": input_ids[None], "attention_mask": mask_4d[None],
                                                         "use_cache": False})
        return per_sample_loss(out.logits, labels[None], dense=True)[0]

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(
        params, batch.input_ids.to(device), mask, batch.labels.to(device))
    unit_norms = [
        (grads[gate].float().square().sum(2) + grads[up].float().square().sum(2)
         + grads[down].float().square().sum(1)).sqrt()
        for gate, up, down in units
    ]
    heads_out = []
    num_heads = model.config.num_attention_heads
    for name in o_proj:
        g = grads[name].float()  # [B, d, H·hd]
        heads_out.append(g.reshape(g.shape[0], g.shape[1], num_heads, -1).square().sum((1, 3)).sqrt())
    empty = torch.zeros(batch.input_ids.shape[0], 0)
    return torch.cat(unit_norms, 1).cpu(), (torch.cat(heads_out, 1).cpu() if heads_out else empty)


def activation_stats(model, batch: Batch, freq_threshold: float) -> dict[str, torch.Tensor]:
    """Mean |h|, firing frequency, Taylor term and head output norm, each sample run alone."""
    layout = ffn_layout(model)
    layers = decoder_layers(model)
    num_heads = model.config.num_attention_heads
    device = next(model.parameters()).device
    rows: dict[str, list[torch.Tensor]] = {"act": [], "freq": [], "taylor": [], "head_out": []}
    for row in range(batch.input_ids.shape[0]):
        keep = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][keep][None].to(device)
        labels = batch.labels[row][keep][None].to(device)
        hs, zs = [], []
        hooks = [f.down_proj.register_forward_hook(lambda m, i, o: hs.append(i[0])) for f in layout]
        hooks += [layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: zs.append(i[0])) for layer in layers]
        embed = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        try:
            with torch.enable_grad():
                loss = per_sample_loss(model(input_ids=ids, use_cache=False).logits, labels)[0]
                dhs = torch.autograd.grad(loss, hs)
        finally:
            for hook in hooks + [embed]:
                hook.remove()
        response = (labels[0] != -100).float()
        n = response.sum()
        act, freq, taylor, head_out = [], [], [], []
        for h, dh, z in zip(hs, dhs, zs):
            h, dh = h[0].detach().float(), dh[0].float()
            act.append((h.abs() * response[:, None]).sum(0) / n)
            rms = torch.sqrt((h**2).mean(1, keepdim=True))
            freq.append(((h.abs() > freq_threshold * rms).float() * response[:, None]).sum(0) / n)
            taylor.append((h * dh).sum(0).abs())
            zh = z[0].detach().float().reshape(z.shape[1], num_heads, -1)
            head_out.append((zh.norm(dim=-1) * response[:, None]).sum(0) / n)
        for key, values in zip(("act", "freq", "taylor", "head_out"), (act, freq, taylor, head_out)):
            rows[key].append(torch.cat(values).cpu())
    return {key: torch.stack(values) for key, values in rows.items()}

"""The probe: exact per-sample statistics of every FFN unit (and attention head) of a teacher.

One forward pass and one backward pass *to the activations* per batch (the weights stay frozen, so
nf4/int8 teachers work): forward hooks keep each layer's x, g, u, h (and o_proj's input z); tensor
hooks receive ∂l/∂y, ∂l/∂h, ∂l/∂g, ∂l/∂u layer by layer during the backward and turn them at once
into per-sample statistics with the vmapped pure functions of `tinyonn.probe.unit_stats`, so only one
layer's gradients are alive at a time. The per-sample loss l_i is the mean NLL over sample i's
response tokens; the batch loss is Σ_i l_i, whose gradient on sample i's activations is ∂l_i.

`probe()` runs this over a probe set in chunks, writing each chunk to the Zarr score store
atomically; a killed probe resumes at the first unfinished chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import vmap

from tinyonn.probe import decoder
from tinyonn.runlock import holding_folder_of
from tinyonn.config import ProbeConfig
from tinyonn.data import Batch, EncodedSample, collate, encode_examples, per_sample_loss
from tinyonn.teacher import FFNLayer, decoder_layers, dequantize, ffn_layout
from tinyonn.probe.unit_stats import (choose_method, direct_flops, gram_flops, head_direct_flops, head_gram_flops,
                                        head_stats, layer_unit_stats)


@dataclass
class BatchStats:
    """Per-sample statistics of one batch: [B, U] for units (layers concatenated), [B, H] for heads."""

    act: torch.Tensor
    freq: torch.Tensor
    grad: torch.Tensor
    taylor: torch.Tensor
    head_out: torch.Tensor
    head_grad: torch.Tensor
    loss: torch.Tensor
    n_tokens: torch.Tensor


def _embedding_module(model) -> torch.nn.Module:
    return model.get_input_embeddings()


class _LayerCapture:
    """Forward and gradient hooks of one decoder layer; fills per-sample stats into `out`."""

    def __init__(self, ffn: FFNLayer, attention_out: torch.nn.Module | None, num_heads: int,
                 config: ProbeConfig):
        self.ffn, self.o_proj, self.num_heads, self.config = ffn, attention_out, num_heads, config
        self.saved: dict[str, torch.Tensor] = {}
        self.result: dict[str, torch.Tensor] = {}
        self.handles = [
            ffn.gate_proj.register_forward_hook(self._on_gate),
            ffn.up_proj.register_forward_hook(self._on_up),
            ffn.down_proj.register_forward_hook(self._on_down),
        ]
        if attention_out is not None:
            self.handles.append(attention_out.register_forward_hook(self._on_o_proj))
        self.masks: tuple[torch.Tensor, torch.Tensor] | None = None

    # forward hooks: keep the tensors, hook their gradients
    def _on_gate(self, module, inputs, output):
        self.saved["x"] = inputs[0]
        output.register_hook(lambda grad: self._on_grad("a", grad))

    def _on_up(self, module, inputs, output):
        output.register_hook(lambda grad: self._on_grad("b", grad))

    def _on_down(self, module, inputs, output):
        self.saved["h"] = inputs[0]
        output.register_hook(lambda grad: self._on_grad("delta", grad))
        inputs[0].register_hook(lambda grad: self._on_grad("dh", grad))

    def _on_o_proj(self, module, inputs, output):
        self.saved["z"] = inputs[0]
        output.register_hook(lambda grad: self._on_grad("delta_o", grad))

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        s, cfg = self.saved, self.config
        s[name] = grad
        response, valid = self.masks
        if all(k in s for k in ("delta", "dh", "a", "b")):  # the layer's gradients are all in
            t, d, i = s["x"].shape[1], s["x"].shape[2], s["h"].shape[2]
            method = choose_method(cfg.grad_method, gram_flops(t, d, i), direct_flops(t, d, i))
            act, freq, taylor, grad_norm = vmap(layer_unit_stats, in_dims=(0, 0, 0, 0, 0, 0, 0, 0, None, None))(
                s["x"], s["h"], s["dh"], s["delta"], s["a"], s["b"], response, valid, cfg.freq_threshold, method)
            self.result.update(act=act, freq=freq, taylor=taylor, grad=grad_norm)
            for key in ("x", "h", "dh", "delta", "a", "b"):
                s.pop(key, None)
        if name == "delta_o":
            t, d, width = s["z"].shape[1], s["delta_o"].shape[2], s["z"].shape[2]
            method = choose_method(cfg.grad_method, head_gram_flops(t, d, width), head_direct_flops(t, d, width))
            out, grad_norm = vmap(head_stats, in_dims=(0, 0, 0, None, None))(
                s["z"], s["delta_o"], response, self.num_heads, method)
            self.result.update(head_out=out, head_grad=grad_norm)
            s.pop("z"), s.pop("delta_o")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.saved.clear()


def response_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  labels: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """Per-sample mean NLL over the response tokens (`per_sample_loss`) from the decoder's hidden
    states, with the LM head applied only where a response token is predicted."""
    if decoder.supports(model):
        hidden = decoder.decoder_hidden_states(model, input_ids, attention_mask, compile=compile)
    else:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    return per_sample_loss(hidden, labels, head=model.get_output_embeddings())


@torch.no_grad()
def teacher_targets(model, batch: Batch, seed: int = 0) -> Batch:
    """`batch` with every response label replaced by a token drawn from the teacher's own
    next-token distribution at that position (`ProbeConfig.grad_target="teacher"`). The draw is
    seeded from `seed` and the batch's tokens, so the same batch always gets the same targets."""
    device = next(model.parameters()).device
    labels = batch.labels.to(device)
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    hidden = model.get_decoder()(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                 use_cache=False)[0]
    probs = model.get_output_embeddings()(hidden[rows, cols]).float().softmax(-1)
    digest = hashlib.sha256(batch.input_ids.numpy().tobytes()).digest()
    generator = torch.Generator(device=probs.device).manual_seed(seed * 1_000_003 + int.from_bytes(digest[:6], "little"))
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    targets = labels.clone()
    targets[rows, cols + 1] = drawn
    return dataclasses.replace(batch, labels=targets.to(batch.labels.device))


def probe_batch(model, batch: Batch, config: ProbeConfig, layout: Sequence[FFNLayer] | None = None) -> BatchStats:
    """Per-sample unit and head statistics of one batch (one forward, one backward to activations;
    with `grad_target="teacher"` one more forward draws the targets, `teacher_targets`)."""
    layout = layout or ffn_layout(model)
    if config.grad_target == "teacher":
        batch = teacher_targets(model, batch, config.target_seed)
    elif config.grad_target != "label":
        raise ValueError(f"ProbeConfig.grad_target must be 'label' or 'teacher', got {config.grad_target!r}")
    device = next(model.parameters()).device
    if uses_graph(model, config):
        return _graph_batch(model, batch, config, device)
    num_heads = model.config.num_attention_heads
    layers = decoder_layers(model)
    captures = [
        _LayerCapture(ffn, layers[ffn.layer].self_attn.o_proj if config.heads else None, num_heads, config)
        for ffn in layout
    ]
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    # Right padding needs no mask: under the causal mask no real token sees a pad, and pads carry
    # no loss, so their gradients are exactly zero. Without a mask, attention runs the fused
    # causal kernel instead of a masked one.
    right_padded = bool((batch.attention_mask[:, 1:] <= batch.attention_mask[:, :-1]).all())
    labels = batch.labels.to(device)
    response = (labels != -100).long()
    for capture in captures:
        capture.masks = (response, attention_mask)
    embed_hook = _embedding_module(model).register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        with torch.enable_grad():
            losses = response_loss(model, input_ids, None if right_padded else attention_mask, labels,
                                   compile=config.compile)
            losses.sum().backward()
    finally:
        embed_hook.remove()
        for capture in captures:
            capture.remove()
    cat = lambda key: torch.cat([c.result[key] for c in captures], dim=1).float().cpu()  # noqa: E731
    empty = torch.zeros(len(losses), 0)
    return BatchStats(
        act=cat("act"), freq=cat("freq"), grad=cat("grad"), taylor=cat("taylor"),
        head_out=cat("head_out") if config.heads else empty,
        head_grad=cat("head_grad") if config.heads else empty,
        loss=losses.detach().float().cpu(),
        n_tokens=response.sum(1).cpu().int(),
    )


def uses_graph(model, config: ProbeConfig) -> bool:
    """Whether `probe_batch` runs the tapped graph (`tinyonn.probe.graph`) rather than the hooks."""
    from tinyonn.probe import graph

    if config.engine == "hooks":
        return False
    if config.engine == "graph":
        if not graph.supports(model):
            raise ValueError(f"ProbeConfig.engine='graph' needs a Llama-family decoder ({', '.join(decoder.FAMILIES)}); "
                             f"{type(model).__name__} is probed with engine='hooks'")
        return True
    if config.engine != "auto":
        raise ValueError(f"ProbeConfig.engine must be auto, hooks or graph, got {config.engine!r}")
    return next(model.parameters()).device.type == "cuda" and graph.supports(model)


def _graph_batch(model, batch: Batch, config: ProbeConfig, device: torch.device) -> BatchStats:
    from tinyonn.probe import graph

    input_ids, attention_mask, labels = (batch.input_ids.to(device), batch.attention_mask.to(device),
                                         batch.labels.to(device))
    if config.compile:  # a few length buckets, each compiled once
        pad_id = int(batch.input_ids[batch.attention_mask == 0][0]) if bool((batch.attention_mask == 0).any()) else 0
        input_ids, attention_mask, labels = graph.pad_to_bucket(input_ids, attention_mask, labels, pad_id)
    stats = graph.graph_probe_batch(model, input_ids, attention_mask, labels, config)
    empty = torch.zeros(len(batch.input_ids), 0)
    cpu = {key: value.float().cpu() for key, value in stats.items()}
    return BatchStats(act=cpu["act"], freq=cpu["freq"], grad=cpu["grad"], taylor=cpu["taylor"],
                      head_out=cpu.get("head_out", empty), head_grad=cpu.get("head_grad", empty),
                      loss=cpu["loss"], n_tokens=(batch.labels != -100).sum(1).int())


def unit_table(layout: Sequence[FFNLayer]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer, index and down_proj column norm of every unit, layers concatenated."""
    layers, indices, norms = [], [], []
    for ffn in layout:
        layers.append(np.full(ffn.intermediate_size, ffn.layer, dtype=np.int16))
        indices.append(np.arange(ffn.intermediate_size, dtype=np.int32))
        norms.append(dequantize(ffn.down_proj, torch.float32).norm(dim=0).cpu().numpy())
    return np.concatenate(layers), np.concatenate(indices), np.concatenate(norms).astype(np.float32)


def _fingerprint(teacher_id: str, samples: Sequence[EncodedSample], config: ProbeConfig) -> str:
    digest = hashlib.sha256()
    digest.update(teacher_id.encode())
    values = dataclasses.asdict(config)
    for name, default in (("per_sample_codec", "zstd"), ("grad_target", "label"), ("target_seed", 0),
                          ("engine", "auto")):
        if values[name] == default:  # defaults of later fields stay out: older stores keep their fingerprint
            del values[name]
    digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    for sample in samples:
        digest.update(np.asarray(sample.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(sample.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _teacher_identity(model) -> str:
    """Name and config of the teacher plus a checksum of its first and last parameters."""
    params = list(model.parameters())
    probe_bytes = b"".join(p.detach().float().flatten()[:4096].cpu().numpy().tobytes() for p in (params[0], params[-1]))
    return json.dumps({"name": getattr(model, "name_or_path", ""), "config": model.config.to_json_string(),
                       "weights": hashlib.sha256(probe_bytes).hexdigest()}, sort_keys=True)


def _chunk_batches(samples: Sequence[EncodedSample], config: ProbeConfig) -> list[list[int]]:
    """Positions inside a chunk grouped into batches (by length when configured)."""
    order = list(range(len(samples)))
    if config.sort_by_length:
        order.sort(key=lambda i: (len(samples[i].input_ids), i))
    size = config.data.batch_size
    return [order[i : i + size] for i in range(0, len(order), size)]


@holding_folder_of("out")  # one writer per run folder: a second probe gets RunInUseError at once
def probe(teacher, data, config: ProbeConfig | None = None, out: str | Path = "stores/runs/default/scores.zarr",
          tokenizer=None, overwrite: bool = False, progress: bool = True, on_bad=None, log=print):
    """Probe a teacher on a data set and return the finished `ScoreStore`.

    `teacher` is a loaded model (then pass `tokenizer`) or a source for `load_teacher` ("builtin",
    a directory, a hub id); `data` is a list of `Example`, a JSONL path, a folder of splits,
    "builtin" (the builtin train split) or a `datasets` object; `config.max_samples` takes that many
    spread over it (`tinyonn.data.spread`: every category of a sorted set gets its share); `on_bad`
    skips malformed data lines (`tinyonn.data.read_examples`). The data and the device are checked
    before the teacher loads and before any file is written; examples that give no sample (empty
    response, response cut away by `max_length`) are counted on `log`. Rerunning with the same
    inputs resumes an interrupted probe.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: each probes its share of the chunks on
    cuda:LOCAL_RANK (or the CPU) into the one store, rank 0 creates and finalizes it
    (`tinyonn.probe.sharded`); the store is the one a single process writes.
    """
    from tqdm.auto import tqdm

    from tinyonn import distributed
    from tinyonn.data import load_probe_set, read_examples, spread
    from tinyonn.devices import resolve_device
    from tinyonn.errors import NoSamplesError
    from tinyonn.probe import sharded
    from tinyonn.store.scores import PIDIFF_FORMULA, ScoreConfig, summary_score_fn
    from tinyonn.store.zarr_store import ChunkStats, ScoreStoreWriter
    from tinyonn.teacher import load_teacher

    config = config or ProbeConfig()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    device = resolve_device(config.device)
    world = distributed.init(device)
    device = str(distributed.rank_device(device, world))
    data_name = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    if isinstance(data, (str, Path)):
        data = load_probe_set(data, "train", on_bad)
    elif not isinstance(data, list):
        data = read_examples(data)
    data = spread(data, config.max_samples)
    teacher_name = str(teacher) if isinstance(teacher, (str, Path)) else getattr(teacher, "name_or_path", "model")
    if isinstance(teacher, (str, Path)):
        teacher, tokenizer = load_teacher(teacher, quant=config.quant, dtype=dtype, device=device)
    if tokenizer is None:
        raise ValueError("probe() needs the tokenizer when `teacher` is a model object")
    samples, skipped = encode_examples(tokenizer, data, config.data)
    if skipped.kept < skipped.total:
        log(f"[probe] {skipped.total - skipped.kept} of {skipped.total} examples give no sample and are skipped: "
            f"{skipped.empty_response} with an empty response, {skipped.truncated_away} whose response "
            f"max_length={config.data.max_length} cuts away")
    if not samples:
        raise NoSamplesError(f"no probe sample left after encoding {data_name}: all {skipped.total} examples skipped "
                             f"({skipped.empty_response} with an empty response, {skipped.truncated_away} whose "
                             f"response max_length={config.data.max_length} cuts away)")
    layout = ffn_layout(teacher)
    units_layer, units_index, down_norm = unit_table(layout)
    num_heads = teacher.config.num_attention_heads
    n_heads = len(layout) * num_heads if config.heads else 0
    categories = sorted({s.category for s in samples})
    category_code = {c: i for i, c in enumerate(categories)}
    score_config = ScoreConfig()
    attrs = {
        "teacher": teacher_name,
        "teacher_config": json.loads(teacher.config.to_json_string()),
        "data": data_name,
        "skipped": dataclasses.asdict(skipped),
        "probe_config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "formula": PIDIFF_FORMULA,
        "score_config": dataclasses.asdict(score_config),
        "fingerprint": _fingerprint(_teacher_identity(teacher), samples, config),
        "statistics": {
            "act": "mean |h| over the response tokens",
            "freq": f"fraction of response tokens with |h| > {config.freq_threshold} x the token's RMS of h",
            "grad": "exact per-sample L2 norm of the unit's gate row, up row and down column gradients",
            "taylor": "|sum over positions of h * dl/dh| (first-order loss change of removing the unit)",
        },
    }
    open_store = lambda overwrite, rank: ScoreStoreWriter.open(  # noqa: E731
        out, units_layer=units_layer, units_index=units_index,
        heads_layer=np.repeat(np.arange(len(layout)), num_heads).astype(np.int16) if n_heads else np.zeros(0, np.int16),
        heads_index=np.tile(np.arange(num_heads), len(layout)).astype(np.int16) if n_heads else np.zeros(0, np.int16),
        categories=categories,
        sample_category=np.asarray([category_code[s.category] for s in samples], dtype=np.int16),
        source_index=np.asarray([s.index for s in samples], dtype=np.int64),
        chunk_samples=config.chunk_samples, per_sample=config.per_sample, attrs=attrs,
        units_down_norm=down_norm, overwrite=overwrite, per_sample_codec=config.per_sample_codec, rank=rank,
    )
    writer, pending = sharded.open_writer(open_store, out, overwrite, world)  # this rank's chunks
    total_tokens = sum(len(samples[i].input_ids) for k in pending for i in range(*writer.chunk_range(k)))
    log_path = Path(out).parent / "probe_log.jsonl"  # beside the store: keeps the Zarr group clean
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="probe", disable=not progress or not world.main)
    teacher.eval()
    started = time.time()
    for k in pending:
        start, stop = writer.chunk_range(k)
        chunk = samples[start:stop]
        rows = {name: np.zeros((len(chunk), n), dtype=np.float32)
                for name, n in (("act", len(units_layer)), ("freq", len(units_layer)), ("grad", len(units_layer)),
                                ("taylor", len(units_layer)), ("head_out", n_heads), ("head_grad", n_heads))}
        loss = np.zeros(len(chunk), dtype=np.float32)
        n_tokens = np.zeros(len(chunk), dtype=np.int32)
        chunk_start = time.time()
        for positions in _chunk_batches(chunk, config):
            batch = collate([chunk[p] for p in positions], tokenizer.pad_token_id, config.data.padding_side)
            stats = probe_batch(teacher, batch, config, layout)
            for name in rows:
                rows[name][positions] = getattr(stats, name).numpy()
            loss[positions] = stats.loss.numpy()
            n_tokens[positions] = stats.n_tokens.numpy()
            tokens = int(batch.attention_mask.sum())
            bar.update(tokens)
            bar.set_postfix(chunk=f"{k + 1}/{writer.n_chunks}", tok_s=f"{bar.n / max(time.time() - started, 1e-9):,.0f}")
        writer.write_chunk(k, ChunkStats(loss=loss, n_tokens=n_tokens, **rows))
        with log_path.open("a") as handle:
            chunk_tokens = sum(len(s.input_ids) for s in chunk)
            handle.write(json.dumps({"chunk": k, **({"rank": world.rank} if world.distributed else {}),
                                     "samples": len(chunk), "tokens": chunk_tokens,
                                     "seconds": time.time() - chunk_start,
                                     "tok_s": chunk_tokens / max(time.time() - chunk_start, 1e-9)}) + "\n")
    bar.close()
    return sharded.finish(writer, lambda w: w.finalize(summary_score_fn(score_config), score_attrs={"score": "pidiff"}),
                          world)

"""Probe throughput against a training step and the naive per-sample route (GPU).

For each shape (Qwen3-0.6B and Qwen3-4B sizes, random weights, batch 8×512), in one run:
  train  — a plain training step: forward + backward with weight gradients (bf16 weights),
           with the model under torch.compile (train_tok_s) and eager (train_eager_tok_s)
  probe  — `tinyonn.probe.run.probe_batch` (bf16) on the tapped graph (`tinyonn.probe.graph`): one
           compiled forward, one compiled backward to the activation taps, compiled statistics
           (probe_tok_s); the same graph eager (probe_eager_tok_s); with --hooks also the hook
           engine, compiled glue (probe_hooks_tok_s)
  nf4    — the same compiled probe on bitsandbytes nf4 weights (4B only)
  naive  — with --naive: `torch.func.vmap(grad(...))` over the MLP and o_proj weights (null when it
           runs out of memory; minutes a shape on a GPU)
  long   — with --long: train and probe at batch 2×2048 (`seq2048`), the method chosen by FLOPs
Writes bench/results/probe.json (merging shapes into an existing file with --merge) and prints a table.

    python bench/probe.py [--shapes 0.6B 4B] [--iters 5] [--long] [--merge]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    # a few-second CPU smoke test of this script's logic (`--device cpu --shapes tiny`)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True),
}
BATCH, SEQ = 8, 512
DEVICE = "cuda"


def make_model(shape: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(DEVICE):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def make_batch(vocab: int):
    from tinyonn.data import Batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # a short prompt; the rest is the response
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                 sample_index=torch.arange(BATCH), categories=tuple("x" * BATCH))


def quantize_nf4(model):
    """Replace every decoder linear layer by a bitsandbytes nf4 Linear4bit (quantised on the GPU)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.cuda())
                    del child
    gc.collect()
    torch.cuda.empty_cache()
    return model


def timed(step, iters: int) -> tuple[float, float]:
    """Seconds per call (median of `iters` after 2 warm-ups) and peak GiB over the timed calls."""
    for _ in range(2):
        step()
    if DEVICE == "cpu":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2], float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def release() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def measure_train(model, gpu: dict, tokens: int, iters: int, eager: bool = True) -> dict:
    """Compiled (and eager) training step tok/s and peak GiB: forward + backward with weight grads."""
    out = {}
    compiled_model = torch.compile(model)

    def train_step(net):
        loss = net(input_ids=gpu["input_ids"], labels=gpu["labels"]).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    model.requires_grad_(True)
    if eager:
        seconds, peak = timed(lambda: train_step(model), iters)
        out.update(train_eager_tok_s=tokens / seconds, train_eager_peak_gib=peak)
        release()
    seconds, peak = timed(lambda: train_step(compiled_model), iters)
    out.update(train_tok_s=tokens / seconds, train_peak_gib=peak)
    model.requires_grad_(False)
    release()
    return out


def progress(shape: str, out: dict) -> None:
    print(shape, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}), flush=True)


def run_shape(shape: str, iters: int, hooks: bool = False, long: bool = False, naive: bool = False) -> dict:
    global BATCH, SEQ
    from tinyonn.config import ProbeConfig
    from tinyonn.probe.run import probe_batch
    from tinyonn.probe.reference import per_sample_grad_norms

    tokens = BATCH * SEQ
    model = make_model(shape)
    batch = make_batch(model.config.vocab_size)
    gpu = {k: v.to(DEVICE) for k, v in (("input_ids", batch.input_ids), ("labels", batch.labels))}
    out: dict = {"batch": BATCH, "seq": SEQ, "parameters": sum(p.numel() for p in model.parameters())}
    out.update(measure_train(model, gpu, tokens, iters))
    progress(shape, out)

    graph, graph_eager = (ProbeConfig(dtype="bfloat16", compile=True, engine="graph"),
                          ProbeConfig(dtype="bfloat16", engine="graph"))
    seconds, peak = timed(lambda: probe_batch(model, batch, graph_eager), iters)
    out.update(probe_eager_tok_s=tokens / seconds, probe_eager_peak_gib=peak)
    release()
    started = time.time()
    probe_batch(model, batch, graph)
    out["probe_first_call_s"] = time.time() - started  # compile time
    seconds, peak = timed(lambda: probe_batch(model, batch, graph), iters)
    out.update(probe_tok_s=tokens / seconds, probe_peak_gib=peak)
    release()
    if hooks:
        seconds, peak = timed(lambda: probe_batch(model, batch, ProbeConfig(dtype="bfloat16", compile=True,
                                                                             engine="hooks")), iters)
        out.update(probe_hooks_tok_s=tokens / seconds, probe_hooks_peak_gib=peak)
        release()

    progress(shape, out)
    if naive:
        try:
            seconds, peak = timed(lambda: per_sample_grad_norms(model, batch), max(1, iters // 2))
            out.update(naive_tok_s=tokens / seconds, naive_peak_gib=peak)
        except torch.OutOfMemoryError:
            out.update(naive_tok_s=None, naive_peak_gib=None, naive_error="out of memory")
        except Exception as err:  # the naive route failing for another reason is recorded, not hidden
            out.update(naive_tok_s=None, naive_peak_gib=None, naive_error=f"{type(err).__name__}: {err}"[:300])
        release()

    if long:  # batch 2 × 2048: the method (Grams or direct) chosen per shape by FLOP count
        from tinyonn.probe.unit_stats import choose_method, direct_flops, gram_flops

        saved = BATCH, SEQ
        BATCH, SEQ = 2, 2048
        try:
            long_batch = make_batch(model.config.vocab_size)
            long_gpu = {k: v.to(DEVICE) for k, v in (("input_ids", long_batch.input_ids), ("labels", long_batch.labels))}
            row = {"batch": BATCH, "seq": SEQ, "unit_method": choose_method(
                "auto", gram_flops(SEQ, model.config.hidden_size, model.config.intermediate_size),
                direct_flops(SEQ, model.config.hidden_size, model.config.intermediate_size))}
            row.update(measure_train(model, long_gpu, BATCH * SEQ, iters, eager=False))
            seconds, peak = timed(lambda: probe_batch(model, long_batch, graph), iters)
            row.update(probe_tok_s=BATCH * SEQ / seconds, probe_peak_gib=peak)
            row["probe_over_train"] = row["probe_tok_s"] / row["train_tok_s"]
            out["seq2048"] = row
            progress(shape, out)
        finally:
            BATCH, SEQ = saved
        release()

    if shape == "4B" and DEVICE == "cuda":
        quantize_nf4(model)
        seconds, peak = timed(lambda: probe_batch(model, batch, graph), iters)
        out.update(probe_nf4_tok_s=tokens / seconds, probe_nf4_peak_gib=peak)
        out["probe_nf4_over_train"] = out["probe_nf4_tok_s"] / out["train_tok_s"]
    model = None  # free the GPU memory before the next shape
    release()
    out["probe_over_train"] = out["probe_tok_s"] / out["train_tok_s"]
    out["probe_over_train_eager"] = out["probe_eager_tok_s"] / out["train_eager_tok_s"]
    return out


def profile_shape(shape: str) -> None:
    """Kernel-time tables of one training step and one probe batch (diagnosis, no JSON)."""
    from torch.profiler import ProfilerActivity, profile

    from tinyonn.config import ProbeConfig
    from tinyonn.probe.run import probe_batch

    model = make_model(shape)
    batch = make_batch(model.config.vocab_size)
    ids, labels = batch.input_ids.to(DEVICE), batch.labels.to(DEVICE)

    compiled_model = torch.compile(model)

    def train_step():
        compiled_model(input_ids=ids, labels=labels).loss.backward()
        for p in model.parameters():
            p.grad = None

    config = ProbeConfig(dtype="bfloat16", compile=True, engine="graph")
    for name, step, grad in (("train", train_step, True), ("probe", lambda: probe_batch(model, batch, config), False)):
        model.requires_grad_(grad)
        step(); step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"==== {shape} {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


def main(argv=None) -> int:
    global DEVICE, SEQ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["0.6B", "4B"])
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of train and probe")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe.json"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--hooks", action="store_true", help="also time the hook engine (history)")
    parser.add_argument("--naive", action="store_true", help="also time vmap(grad) (slow: minutes on a GPU)")
    parser.add_argument("--long", action="store_true", help="also train and probe at batch 2 × 2048")
    parser.add_argument("--merge", action="store_true", help="add these shapes to an existing --out file")
    args = parser.parse_args(argv)
    DEVICE, SEQ = args.device, args.seq
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench/probe.py needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(["bench/probe.py"] + (argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "batch": [BATCH, SEQ],
        "shapes": {},
    }
    if args.profile:
        for shape in args.shapes:
            profile_shape(shape)
        return 0
    if args.merge and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())
        results["shapes"] = previous.get("shapes", {})
        results["runs"] = previous.get("runs", []) + [{k: previous[k] for k in ("date", "command") if k in previous}]
    for shape in args.shapes:
        started = time.time()
        results["shapes"][shape] = run_shape(shape, args.iters, hooks=args.hooks, long=args.long, naive=args.naive)
        results["shapes"][shape]["date"] = results["date"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        results["shapes"][shape]["bench_seconds"] = time.time() - started
        print(shape, json.dumps(results["shapes"][shape]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n{'shape':<6} {'train tok/s':>12} {'probe tok/s':>12} {'ratio':>6} {'nf4 tok/s':>10} "
          f"{'naive tok/s':>12} {'train GiB':>10} {'probe GiB':>10}")
    for shape, r in results["shapes"].items():
        nf4 = f"{r['probe_nf4_tok_s']:,.0f}" if r.get("probe_nf4_tok_s") else "-"
        naive = f"{r['naive_tok_s']:,.0f}" if r.get("naive_tok_s") else ("-" if "naive_tok_s" not in r else "OOM")
        print(f"{shape:<6} {r['train_tok_s']:>12,.0f} {r['probe_tok_s']:>12,.0f} {r['probe_over_train']:>6.2f} "
              f"{nf4:>10} {naive:>12} {r['train_peak_gib']:>10.1f} {r['probe_peak_gib']:>10.1f}")
        if "seq2048" in r:
            long = r["seq2048"]
            print(f"{shape + ' 2k':<6} {long['train_tok_s']:>12,.0f} {long['probe_tok_s']:>12,.0f} "
                  f"{long['probe_over_train']:>6.2f} {'':>10} {long['unit_method']:>12} {long['train_peak_gib']:>10.1f} "
                  f"{long['probe_peak_gib']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

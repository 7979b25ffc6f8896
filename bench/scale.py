"""Scale: probe → cluster → assemble → SMK training steps on Qwen3-0.6B- and Qwen3-4B-shaped teachers
on one GPU, in bf16 and in nf4, and the probe's 2-GPU speed-up.

For each configuration (a shape of bench/probe.py with random weights from `Qwen3Config`, or a real
local checkpoint with --teacher, in bf16 or bitsandbytes nf4), in this process, with the real
Tiny-ONN functions:

  probe     `tinyonn.probe` on `--samples` synthetic samples of ~`--seq` tokens (aggregates only:
            `per_sample=False`, so host and disk memory do not grow with the probe set), one probe
            chunk per batch; `probe_tok_s` = tokens of the chunks after the first (the warm-up)
            over their seconds (`probe_log.jsonl`)
  cluster   `tinyonn.cluster` with `--cluster-method` (default random: the per-layer partition whose
            cost does not depend on the probe; bench/cluster_scale.py times the real partitions at
            the 4B size on a CPU)
  assemble  `tinyonn.assemble` (bf16 student on the GPU)
  train     `tinyonn.training.train`, SMK: one phase-1 step (every expert computes) then
            `--smk-steps` phase-2 steps (routed experts, PI-driven min_k); `smk_step_tok_s` = the
            last phase-2 step's tokens over its seconds. The run stops after the last timed step
            (no checkpoint, no saved model: a 4B student's fp32 optimiser state is ~30 GB of disk)

and records `probe_tok_s`, `smk_step_tok_s`, `peak_gib` (torch.cuda.max_memory_allocated over the
configuration) and each stage's seconds under `configs`. Then `probe_2gpu_speedup`: with 2 or more
GPUs, the 0.6B bf16 probe of `--speedup-samples` samples launched by torchrun on 1 and on 2 GPUs
(the same launcher both times), tokens per second of the 2-rank run over the 1-rank run; else
null with the reason. Writes bench/results/scale.json.

    python bench/scale.py                                    # one H200: the 4 configurations, ~4-5 min
    python bench/scale.py --configs 4B-bf16 4B-nf4 --merge   # some configurations, merged into the JSON
    python bench/scale.py --only-speedup                     # on a 2+ GPU machine: probe_2gpu_speedup alone
    python bench/scale.py --device cpu --shapes tiny         # a CPU smoke test of the logic (~1 min)
    python bench/scale.py --teacher /path/to/Qwen3-4B --quants bf16 nf4   # a real checkpoint
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {  # copied from bench/probe.py
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    # a few-second CPU smoke test of this script's logic (`--device cpu --shapes tiny`)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True),
}
QUANTS = ("bf16", "nf4")
WORK = ROOT / "stores" / "runs" / "_scale"
DEVICE = "cuda"


def say(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.startswith("cuda") else None


def release() -> None:
    gc.collect()
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Teacher and data


def builtin_tokenizer():
    from transformers import AutoTokenizer

    from tinyonn.teacher import resolve_teacher_source

    return AutoTokenizer.from_pretrained(resolve_teacher_source("builtin"))


def random_teacher(shape: str, quant: str, vocab_at_least: int):
    """A Qwen3 of `shape` with random weights (seed 0) in bf16 on DEVICE; nf4: its decoder linears
    replaced by bitsandbytes Linear4bit (quantised from those bf16 weights)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sizes = dict(SHAPES[shape])
    sizes["vocab_size"] = max(sizes["vocab_size"], vocab_at_least)
    config = Qwen3Config(**sizes, max_position_embeddings=4096, attn_implementation="sdpa", pad_token_id=0,
                         eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    model.name_or_path = f"random Qwen3 {shape} (seed 0)"
    if quant == "nf4":
        quantize_nf4(model)
    return model.eval().requires_grad_(False)


def quantize_nf4(model) -> None:
    """Replace every decoder linear layer by a bitsandbytes nf4 Linear4bit (bench/probe.py's way)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.to(DEVICE))
                    del child
    release()


def local_teacher(path: str, quant: str):
    from tinyonn.teacher import load_teacher

    model, tokenizer = load_teacher(path, quant="nf4" if quant == "nf4" else "none", dtype=torch.bfloat16,
                                    device=DEVICE, attn_implementation="sdpa")
    return model, tokenizer


def synthetic_examples(tokenizer, count: int, seq: int) -> list:
    """`count` examples of close to `seq` tokens: a builtin prompt and, as the response, builtin
    responses joined until the sample nearly fills `seq` (so the probe and training see full rows)."""
    from tinyonn import Example, load_probe_set

    pool = load_probe_set("builtin", "train")
    out, cursor = [], 0
    for i in range(count):
        prompt = pool[cursor % len(pool)].messages[0]["content"]
        cursor += 1
        parts, used = [], len(tokenizer(prompt)["input_ids"]) + 16
        while True:
            text = pool[cursor % len(pool)].response
            cursor += 1
            need = len(tokenizer(text)["input_ids"]) + 1
            if used + need > seq - 8:
                break
            parts.append(text)
            used += need
        out.append(Example(messages=({"role": "user", "content": prompt},
                                     {"role": "assistant", "content": " ".join(parts) or text}),
                           category=pool[i % len(pool)].category, source="bench/scale.py"))
    return out


# --------------------------------------------------------------------------------------------
# One configuration


class _Stop(Exception):
    """Raised from `on_step` after the last timed step: no final checkpoint, no saved model."""


def run_config(name: str, teacher_source: str, quant: str, args) -> dict:
    """probe → cluster → assemble → SMK steps for one configuration; the figures."""
    from tinyonn import ClusterConfig, DataConfig, ProbeConfig, RoutingConfig, assemble, cluster, probe
    from tinyonn.training import Phase1Config, Phase2Config, TrainConfig, train

    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict = {"teacher": teacher_source, "quant": quant, "samples": args.samples, "seq": args.seq,
                 "batch": args.batch}
    if DEVICE.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if teacher_source in SHAPES:
        tokenizer = builtin_tokenizer()
        teacher = random_teacher(teacher_source, quant, len(tokenizer))
    else:
        teacher, tokenizer = local_teacher(teacher_source, quant)
    sync()
    out["load_s"] = round(time.perf_counter() - started, 2)
    out["parameters"] = sum(p.numel() for p in teacher.parameters())
    examples = synthetic_examples(tokenizer, args.samples, args.seq)
    say(f"{name}: teacher ready in {out['load_s']} s")

    # probe
    data = DataConfig(max_length=args.seq, batch_size=args.batch)
    probe_config = ProbeConfig(data=data, chunk_samples=args.batch, per_sample=False, dtype="bfloat16",
                               quant="nf4" if quant == "nf4" else "none", device=DEVICE, compile=args.probe_compile)
    started = time.perf_counter()
    store = probe(teacher, examples, probe_config, work / "scores.zarr", tokenizer=tokenizer, overwrite=True,
                  progress=False)
    sync()
    out["probe_s"] = round(time.perf_counter() - started, 2)
    chunks = [json.loads(line) for line in (work / "probe_log.jsonl").read_text().splitlines()]
    timed = chunks[1:] or chunks
    out["probe_tokens"] = sum(c["tokens"] for c in chunks)
    out["probe_tok_s"] = sum(c["tokens"] for c in timed) / sum(c["seconds"] for c in timed)
    out["probe_peak_gib"] = peak_gib()
    say(f"{name}: probe {out['probe_tokens']} tokens in {out['probe_s']} s, {out['probe_tok_s']:,.0f} tok/s")

    # cluster
    started = time.perf_counter()
    plan = cluster(store, ClusterConfig(method=args.cluster_method))
    out["cluster_s"] = round(time.perf_counter() - started, 2)
    out["cluster_method"] = args.cluster_method
    out["experts"] = int(sum(lp.num_experts for lp in plan.layers))
    say(f"{name}: cluster ({args.cluster_method}) {out['experts']} experts in {out['cluster_s']} s")

    # assemble
    started = time.perf_counter()
    student = assemble(teacher, plan, RoutingConfig(), dtype=torch.bfloat16)
    sync()
    out["assemble_s"] = round(time.perf_counter() - started, 2)
    out["assemble_peak_gib"] = peak_gib()
    say(f"{name}: assemble in {out['assemble_s']} s")

    # SMK: one phase-1 step, then phase-2 steps; stop after the last one (no checkpoint)
    steps = 1 + args.smk_steps
    config = TrainConfig(rule="smk", data=data, max_steps=steps, max_tokens=None, warmup_steps=0,
                         phase1=Phase1Config(steps=1, max_run_fraction=1.0),
                         phase2=Phase2Config(routing="budget", active_fraction=0.5), checkpoint_every=0,
                         validation_per_category=0, progress=False, device=DEVICE)
    records: list[dict] = []

    def on_step(step: int, record: dict) -> None:
        records.append(record)
        say(f"{name}: step {step} (phase {record['phase']}) {record['tokens']} tokens in "
            f"{record['step_seconds']:.2f} s, loss {record['loss']:.3f}")
        if step == steps:
            raise _Stop

    started = time.perf_counter()
    try:
        train(student, teacher, tokenizer, examples, config, work / "train", on_step=on_step)
    except _Stop:
        pass
    sync()
    out["train_s"] = round(time.perf_counter() - started, 2)
    last = records[-1]
    out["smk_step_tok_s"] = last["tokens"] / last["step_seconds"]
    out["smk_step_tokens"] = last["tokens"]
    out["smk_phase1_step_tok_s"] = records[0]["tokens"] / records[0]["step_seconds"]
    out["smk_steps"] = [{k: r[k] for k in ("step", "phase", "tokens", "step_seconds", "loss", "memory_gib")}
                        for r in records]
    out["peak_gib"] = peak_gib()
    say(f"{name}: SMK step {out['smk_step_tok_s']:,.0f} tok/s; peak {out['peak_gib'] or 0:.1f} GiB")
    del student, teacher, store, plan
    release()
    shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# The 2-GPU probe speed-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_worker(args) -> None:
    """One rank of a torchrun launch: the random `--shape` teacher on cuda:LOCAL_RANK, the sharded
    probe of `--speedup-samples` samples; rank 0 prints the tokens and seconds as JSON."""
    from tinyonn import DataConfig, ProbeConfig, distributed, probe
    from tinyonn.data import collate, encode_examples
    from tinyonn.probe.run import probe_batch

    world = distributed.init(args.device)
    global DEVICE
    DEVICE = str(distributed.rank_device(args.device, world))
    tokenizer = builtin_tokenizer()
    teacher = random_teacher(args.shape, "bf16", len(tokenizer))
    if world.distributed:  # rank 0's weights everywhere (one store fingerprint), whatever each GPU's RNG drew
        import torch.distributed as dist

        for param in teacher.parameters():
            dist.broadcast(param.data, src=0)
    examples = synthetic_examples(tokenizer, args.speedup_samples, args.seq)
    config = ProbeConfig(data=DataConfig(max_length=args.seq, batch_size=args.batch), chunk_samples=args.batch * 4,
                         per_sample=False, dtype="bfloat16", device=DEVICE)
    out = Path(args.store)
    samples, _ = encode_examples(tokenizer, examples[: args.batch], config.data)
    probe_batch(teacher, collate(samples, tokenizer.pad_token_id, "right"), config)  # warm-up, not timed
    sync()
    distributed.barrier(world)
    started = time.perf_counter()
    probe(teacher, examples, config, out, tokenizer=tokenizer, overwrite=True, progress=False)
    sync()
    distributed.barrier(world)
    seconds = time.perf_counter() - started
    if world.main:
        tokens = sum(json.loads(line)["tokens"] for line in (out.parent / "probe_log.jsonl").read_text().splitlines())
        print(json.dumps({"ranks": world.size, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}),
              flush=True)


def probe_speedup(args) -> tuple[float | None, dict]:
    """(2-GPU over 1-GPU probe tok/s, details), or (None, {"reason": ...}) with fewer than 2 GPUs."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None, {"reason": f"torch.cuda.device_count() = {count}: this machine has fewer than 2 GPUs, so "
                                "the 2-GPU probe was not run; run bench/scale.py on a machine with 2+ GPUs (it "
                                "launches torchrun --nproc_per_node 1 and 2 itself)"}
    runs = {}
    for ranks in (1, 2):
        work = WORK / f"speedup-{ranks}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()),
                   "--probe-worker", "--shape", args.speedup_shape, "--speedup-samples", str(args.speedup_samples),
                   "--seq", str(args.seq), "--batch", str(args.batch), "--store", str(work / "scores.zarr"),
                   "--device", "cuda"]
        say(f"2-GPU speed-up: {' '.join(command[2:])}")
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        if done.returncode != 0:
            return None, {"reason": f"the {ranks}-rank torchrun probe failed (exit {done.returncode}): "
                                    + " | ".join(done.stderr.strip().splitlines()[-6:])}
        runs[ranks] = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"ranks"')][-1])
        say(f"{ranks} GPU(s): {runs[ranks]['tok_s']:,.0f} tok/s")
        shutil.rmtree(work, ignore_errors=True)
    speedup = runs[2]["tok_s"] / runs[1]["tok_s"]
    return speedup, {"shape": args.speedup_shape, "samples": args.speedup_samples, "seq": args.seq,
                     "launcher": "python -m torch.distributed.run --nproc_per_node {1,2}",
                     "one_gpu": runs[1], "two_gpus": runs[2]}


# --------------------------------------------------------------------------------------------


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["0.6B", "4B"], choices=sorted(SHAPES))
    parser.add_argument("--quants", nargs="+", default=list(QUANTS), choices=QUANTS)
    parser.add_argument("--configs", nargs="+", default=None, help="e.g. 4B-bf16 0.6B-nf4 (default: shapes x quants)")
    parser.add_argument("--teacher", default=None, help="a local checkpoint instead of the random shapes")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--smk-steps", type=int, default=2, help="phase-2 steps after the phase-1 step")
    parser.add_argument("--cluster-method", default="random")
    parser.add_argument("--probe-compile", action="store_true", help="ProbeConfig.compile (off: eager)")
    parser.add_argument("--speedup-shape", default="0.6B", choices=sorted(SHAPES))
    parser.add_argument("--speedup-samples", type=int, default=512)
    parser.add_argument("--no-speedup", action="store_true")
    parser.add_argument("--only-speedup", action="store_true", help="only the 2-GPU probe speed-up, merged into --out")
    parser.add_argument("--merge", action="store_true", help="merge configurations into an existing --out")
    parser.add_argument("--out", default=None, help="default bench/results/scale.json (CUDA) or "
                        "stores/runs/_scale/scale.json (CPU smoke test)")
    parser.add_argument("--probe-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="0.6B", help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.probe_worker:
        probe_worker(args)
        return
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --shapes tiny for the smoke test")
    out_path = Path(args.out or (ROOT / "bench" / "results" / "scale.json" if DEVICE.startswith("cuda")
                                 else WORK / "scale.json"))
    sources = [args.teacher] if args.teacher else args.shapes
    names = {f"{(Path(s).name if args.teacher else s)}-{q}": (s, q) for s in sources for q in args.quants}
    if args.only_speedup:
        names, args.merge = {}, True
    elif args.configs:
        unknown = sorted(set(args.configs) - set(names))
        if unknown:
            raise SystemExit(f"unknown configuration(s) {unknown}; known: {sorted(names)}")
        names = {n: names[n] for n in args.configs}
    result = json.loads(out_path.read_text()) if args.merge and out_path.is_file() else {"configs": {}}
    started = time.perf_counter()
    now = lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")  # noqa: E731
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    for name, (source, quant) in names.items():
        say(f"== {name}")
        try:
            result["configs"][name] = {**run_config(name, source, quant, args), "date": now(), "command": command}
        except Exception as err:  # record what failed and go on with the next configuration
            result["configs"][name] = {"error": f"{type(err).__name__}: {err}"}
            say(f"{name} FAILED: {type(err).__name__}: {err}")
            release()
    if not args.no_speedup and DEVICE.startswith("cuda"):
        speedup, details = probe_speedup(args)
        result["probe_2gpu_speedup"], result["probe_2gpu"] = speedup, {**details, "date": now(), "command": command}
    elif "probe_2gpu_speedup" not in result:
        result["probe_2gpu_speedup"], result["probe_2gpu"] = None, {"reason": "not measured (CPU smoke test or --no-speedup)"}
    import transformers

    result.update({
        "device": torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "cpu",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "date": now(), "command": command,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bench_seconds": round(time.perf_counter() - started, 1),
        "notes": "random weights from Qwen3Config (seed 0) unless 'teacher' is a path; probe aggregates only "
                 "(per_sample=False); probe_tok_s excludes the first chunk (warm-up); smk_step_tok_s is the "
                 "last phase-2 step; peak_gib = torch.cuda.max_memory_allocated over the configuration",
    })
    try:
        import bitsandbytes

        result["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        result["bitsandbytes"] = None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    say(f"written {out_path}")
    print(f"{'config':<12} {'probe tok/s':>12} {'SMK step tok/s':>15} {'peak GiB':>9} {'probe s':>8} {'cluster s':>9} "
          f"{'assemble s':>10} {'train s':>8}")
    for name, row in result["configs"].items():
        if "error" in row:
            print(f"{name:<12} {row['error'][:90]}")
            continue
        peak = row["peak_gib"]
        print(f"{name:<12} {row['probe_tok_s']:>12,.0f} {row['smk_step_tok_s']:>15,.0f} "
              f"{peak if peak is not None else float('nan'):>9.1f} {row['probe_s']:>8.1f} {row['cluster_s']:>9.1f} "
              f"{row['assemble_s']:>10.1f} {row['train_s']:>8.1f}")
    print(f"probe_2gpu_speedup: {result['probe_2gpu_speedup']}  ({result['probe_2gpu'].get('reason', '')})")


if __name__ == "__main__":
    main()

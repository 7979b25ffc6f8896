"""SMK training step time on the builtin teacher: where a step's time goes, per data layout.

    python bench/train_profile.py                                  # GPU defaults: the cases below
    python bench/train_profile.py --cases old:16,packed:65536:16384 --steps 4 --warmup 1 --compile
    python bench/train_profile.py --profile                       # + torch.profiler's top ops

NOTES (read first)
------------------
Measured here (CPU, 2 cores shared with other work, 1 thread; builtin teacher + the saved
pidiff-hdbscan TinyONN: 24–28 experts and 16 shared units a layer; kd_tokens="all", z-loss 0; phase 2
at a 50% unit budget; tok/s counts sample tokens; the load made wall times swing up to 3×, so the
steadiest run and the CPU-seconds rate are quoted):

  padding, builtin train split (21,119 samples, 1.41M tokens, 67 a sample on average):
    16 samples a step padded to the longest ×64 (the old layout, the H200 run)      72.5%
    the same 16 samples packed into rows of 512                                     18.5%
    steps of 64k tokens, one sample a row grouped by length (×16 / ×64)           32% / 40%
    steps of 64k tokens packed into 4 micro-batches of 32×512 (one shape)            1.5%
  same 16 samples a step, old code → new (packed), phase 1 / phase 2:
    84 / 88 tok/s → 212 / 236 tok/s (2.5–2.7×; ~11 → ~4.7 s a step; busier runs: 27–55 → 130–214).
    The new code in the old layout ran 68–78 tok/s: a CPU is FLOP-bound, so here the gain is the
    padding (3.6× fewer positions, less ~15% more attention work in 512-token rows), not the syncs
  a 64k-token step (64,546 tokens in 8 micro-batches of 16×512, phase 2): 309 s, 209 tok/s, 1.5%
    padding: the large-step config runs at the small-step rate on a CPU (on a GPU it is what removes
    the per-step overhead)
  packed 4k-token steps (4096-position micro-batches), eager, ms a step: student forward 4,600,
    teacher forward 5,400, losses 6,900 / 4,500 (KL and entropy over the 16k vocabulary; phase 1 also
    recomputes every unit's h for router distillation), backward 8,900, and the per-step bookkeeping
    (surprise, keep masks, clip, masked AdamW, log read) 170: under 1%
  the same compiled with Inductor: phase 1 254 vs 236 tok/CPU-s (+8%), phase 2 280 vs 225 (+24%),
    after 171 s compiling phase 1 (student + teacher: 2 graphs) and 81 s for phase 2 (1 graph)

What changed (tinyonn/training):
  1. Packed steps: a step is a fixed grid of micro-batches (`step_tokens`, `micro_batch_tokens`,
     `pack_length`) filled from the data stream, so the step's samples and order stay a pure function
     of (seed, epoch) (resume stays bitwise, tested) and every micro-batch has one shape. Samples
     share rows through position ids (transformers' packed-sequence masks; logits equal the padded
     ones to 2e-7, tested). The original layout and a length-grouped padded one remain.
  2. No host syncs in a step: loss positions (response tokens, within-sample pairs) are flat indices
     built on the host with the batch; router losses and routing counts use 0/1 token weights, not
     boolean selections; PI, act_k, min_k, keep masks, lr × PI and the masked AdamW stay tensors;
     the log's values are read in one transfer per step (`log_every` steps). A test runs a step under
     a dispatch mode and finds no syncing op from tinyonn/training and one read (the log's);
     transformers' packed-mask check (`find_packed_sequence_indices`, one `.all()` per forward) is
     the only other one, eager only.
  3. Bookkeeping over all layers at once: `ExpertRows` lays the layers' experts out as an [L, E_max]
     grid; surprise is one cat + row norms + index_add, keep masks one stable sort (`keep_grid`, equal
     to `keep_experts` per layer, tested), balance loss and phase-1 top-k on stacked [L, N, E_max]
     scores; clipping through foreach; MaskedAdamW applies masks as per-row coefficients (no
     nonzero/index_select/index_copy; masked rows keep their values, tested).
  4. Compile: `compile_backend` ("inductor" default, or "tinyonn"), dynamic=False with packed
     fixed shapes: the student compiles once per phase and the teacher once (3 graphs on the tiny
     model over the phase switch; a test asserts no new graph within a phase).

Why compile was slower on the H200 (found on CPU with TORCH_LOGS=recompiles,graph_breaks, plus
reading the code; the GPU figures are the earlier run's, not re-measured):
  - every new padded length (8 multiples of 64) or batch size recompiled; the student's backbone and
    the teacher run the same code object (transformers' deprecation wrapper), so they share
    dynamo's per-code cache (limit 8), and after two lengths dynamo switches to dynamic shapes;
  - TinyONNForCausalLM.forward registers forward hooks inside forward (`record_routing`): dynamo
    gives up on that frame ("skipping the function"), runs it eagerly and compiles the backbone and
    the output dataclass as separate frames (each with its own per-shape recompiles). Not fixed here
    (tinyonn/model is not this stage's): registering the routing hooks once, or returning the router
    outputs from the layers, would let the whole forward be one graph;
  - the tinyonn backend's `tinyonn::moe_experts` reads two values to the host per call (forward and
    again in its backward, 8 layers each), and in phase 1 (every expert on) dispatches N·E slots per
    layer (each token's x gathered E≈28 times) and recomputes the forward in the backward; at d=384
    with ~57-unit experts the ragged kernels run below dense speed (README: 0.48–0.81× dense bf16);
  - the phase switch recompiles once (routing mode is guarded Python state): bounded, kept.
  `compile` stays off by default: the only GPU evidence is eager 3.4× faster, a 20M-token row runs
  ~1–2 min eager (estimate below), and compiling costs minutes on this CPU (25–40 s each on the GPU,
  3 graphs, ×2 with no cache hit); flip it if this bench shows compiled + first_step_s winning.

Expected GPU effect (an ESTIMATE, not measured: the device was not used in this session):
  the old step (16 samples, ~4.1k padded positions, 127 ms at 8.4k tok/s) needed ~3–5 ms of H200
  FLOPs, so ~95% of it was per-step overhead (~60 host syncs: per-layer .item()/float(), boolean
  selections, nonzero per masked parameter) and padding (72.5%). A 64k-token packed step is 4
  micro-batches of 16k positions at 1.5% padding, ~3 TFLOP each (10–20 ms) plus ~5 ms of
  memory-bound loss work, with kernel launches overlapping the GPU since nothing syncs: ~150–250 ms
  a step, i.e. ~250–400k tok/s eager (30–50× the 8.4k), 20M tokens in ~1–1.5 min a row plus
  validation. To check, run as is on the GPU machine:
      python bench/train_profile.py --sync-debug --out bench/results/train_profile_gpu.json
      python bench/train_profile.py --compile --cases packed:65536:16384 --steps 10
      python bench/train_profile.py --compile --backend tinyonn --cases packed:65536:16384 --steps 10
  and tests/scripts/train_builtin_gpu.py OUT 40 for whole runs (old, eager, inductor, tinyonn).

Cases (`--cases`, comma-separated):
  old:B                    the original layout: B samples a step, one micro-batch, padded to the
                           longest (rounded up to 64): the config the H200 ran at 5.2k/8.4k tok/s
  pack:B[:LEN]             the same B samples a step as old:B, packed into rows of LEN (512) tokens
  packed:STEP:MICRO[:LEN]  STEP tokens a step, packed into rows of LEN (512) tokens, micro-batches
                           of MICRO positions (one fixed shape with --compile)
  padded:STEP:MICRO        STEP tokens a step, one sample a row, grouped by length, MICRO positions
For each case and phase (1: every expert on + router distillation; 2: 50% unit budget), it runs
`--warmup` steps (with --compile: the compile, reported as first_step_s), then `--steps` timed steps
as the training loop runs them (one host sync a step, for the log), then the same steps again with a
device sync around each section for the breakdown (ms per step: collate, student_forward,
teacher_forward, losses, backward, rule, clip, optimizer, log_read; "other" is the rest). tok/s counts
sample tokens (prompt and response), not padding. `--sync-debug` (CUDA) counts synchronizing calls in
one step through torch.cuda.set_sync_debug_mode. Results go to stdout and `--out` (JSON).

The student is `--student`: a saved TinyONN directory, or full:E (every teacher unit, E experts a
layer, 4 router groups; the default full:28 has the shapes of the builtin PIDiff partition, whose
saved model lives in the ignored stores/runs/ and so is not on a fresh GPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tinyonn import load_probe_set, load_teacher
from tinyonn.config import DataConfig
from tinyonn.training import Phase1Config, Phase2Config, TrainConfig
from tinyonn.training.batches import padding_fraction
from tinyonn.training.loop import Trainer

SECTIONS = ("collate", "student_forward", "teacher_forward", "losses", "backward", "rule", "clip", "optimizer",
            "log_read")
DEFAULT_CASES = "old:16,packed:16384:16384,packed:65536:16384,packed:65536:32768"


def case_config(spec: str, args) -> TrainConfig:
    kind, *numbers = spec.split(":")
    steps = len(args.phases) * (args.warmup + 2 * args.steps + 3)
    common = dict(max_steps=steps, max_tokens=None, kd_tokens="all", checkpoint_every=0, progress=False,
                  device=args.device, compile=args.compile, compile_backend=args.backend,
                  phase1=Phase1Config(steps=10_000), phase2=Phase2Config(routing="budget", active_fraction=0.5),
                  param_dtype=args.param_dtype, z_loss_weight=args.z_loss)
    if kind == "old":
        return TrainConfig(data=DataConfig(max_length=512, batch_size=int(numbers[0])), micro_batch_tokens=None,
                           pad_to_multiple=64, **common)
    if kind == "pack":
        length = int(numbers[1]) if len(numbers) > 1 else 512
        return TrainConfig(data=DataConfig(max_length=512, batch_size=int(numbers[0])), micro_batch_tokens=16384,
                           packing=True, pack_length=length, **common)
    step, micro = int(numbers[0]), int(numbers[1])
    if kind == "packed":
        length = int(numbers[2]) if len(numbers) > 2 else 512
        return TrainConfig(data=DataConfig(max_length=512), step_tokens=step, micro_batch_tokens=micro,
                           packing=True, pack_length=length, **common)
    if kind == "padded":
        return TrainConfig(data=DataConfig(max_length=512), step_tokens=step, micro_batch_tokens=micro,
                           packing=False, pad_to_multiple=16, **common)
    raise ValueError(f"unknown case {spec!r}")


def build_student(spec: str, teacher):
    from tinyonn.clustering.plan import full_plan
    from tinyonn.model.assemble import assemble
    from tinyonn.model.routing import RoutingConfig

    if spec.startswith("full:"):
        layers = teacher.config.num_hidden_layers
        return assemble(teacher, full_plan(layers, teacher.config.intermediate_size, int(spec[5:]), groups=4, seed=0),
                        RoutingConfig(mode="all"))
    from transformers import AutoModelForCausalLM

    import tinyonn.model.modeling  # noqa: F401
    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(trainer: Trainer, count: int) -> list[tuple[float, int, float]]:
    """`count` steps as the loop runs them (the flush is the step's one host sync): (seconds, tokens,
    CPU seconds of this process: on a shared CPU the steadier measure of the work)."""
    out = []
    for _ in range(count):
        planned = trainer.plan[trainer.state.step]
        started, cpu = time.perf_counter(), time.process_time()
        trainer.pending.append(trainer._step(planned))
        trainer._flush()
        out.append((time.perf_counter() - started, planned.tokens, time.process_time() - cpu))
    return out


def count_syncs(trainer: Trainer) -> int | None:
    if trainer.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_steps(trainer, 1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def profile_step(trainer: Trainer, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_steps(trainer, 1)
    for key in (("self_device_time_total", "self_cuda_time_total") if trainer.device.type == "cuda" else ()) \
            + ("self_cpu_time_total",):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return prof.key_averages().table(row_limit=rows)


def measure_case(spec: str, args, teacher, tokenizer, examples) -> dict:
    config = case_config(spec, args)
    student = build_student(args.student, teacher)
    trainer = Trainer(student, teacher, tokenizer, examples, config, tempfile.mkdtemp(prefix="train_profile-"))
    plan = trainer.plan
    result = {"case": spec, "padding_fraction": padding_fraction(plan),
              "tokens_per_step": statistics.mean(s.tokens for s in plan),
              "micro_batches_per_step": statistics.mean(len(s.layout) for s in plan),
              "shapes": len({(m.num_rows, m.length) for s in plan for m in s.layout}), "phases": {}}
    trainer._prepare(resume=False)
    trainer._log_file = open(os.devnull, "w")
    from tqdm.auto import tqdm
    trainer._progress = tqdm(disable=True)
    for phase in args.phases:
        trainer.state.phase = phase
        trainer._set_phase_routing()
        if args.compile:
            torch._dynamo.utils.counters.clear()
        warm = run_steps(trainer, args.warmup)
        timed = run_steps(trainer, args.steps)
        seconds = sum(t for t, _, _ in timed)
        tokens = sum(n for _, n, _ in timed)
        per_step = {}
        if args.breakdown:
            trainer.timer.totals.clear()
            trainer.timer.enabled = True
            sectioned = run_steps(trainer, args.steps)
            trainer.timer.enabled = False
            per_step = {k: 1000 * v / len(sectioned) for k, v in trainer.timer.totals.items()}
            wall = 1000 * sum(t for t, _, _ in sectioned) / len(sectioned)
            per_step["other"] = wall - sum(per_step.values())
        entry = {"step_s": statistics.median(t for t, _, _ in timed), "tok_per_s": tokens / seconds,
                 "tok_per_cpu_s": tokens / sum(c for _, _, c in timed),
                 "first_step_s": warm[0][0] if warm else None,
                 "breakdown_ms": {k: round(per_step.get(k, 0.0), 2) for k in (*SECTIONS, "other")} if per_step else None,
                 "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None}
        if args.compile:
            stats = torch._dynamo.utils.counters["stats"]
            entry["graphs_compiled"] = stats.get("unique_graphs", 0)
        if args.sync_debug:
            entry["syncs_per_step"] = count_syncs(trainer)
        if args.profile:
            entry["profile"] = profile_step(trainer)
        result["phases"][str(phase)] = entry
        print(f"{spec} phase {phase}: {entry['step_s']:.3f} s/step, {entry['tok_per_s']:,.0f} tok/s "
              f"({entry['tok_per_cpu_s']:,.0f} per CPU s), {result['tokens_per_step']:,.0f} tok/step, "
              f"padding {result['padding_fraction']:.1%}, first step {entry['first_step_s'] or 0:.1f} s"
              + (f", {entry['graphs_compiled']} graphs" if args.compile else "")
              + (f", {entry['syncs_per_step']} syncs/step" if args.sync_debug else ""), flush=True)
        if args.breakdown:
            print("   ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in entry["breakdown_ms"].items()), flush=True)
        if args.profile:
            print(entry["profile"], flush=True)
    trainer._log_file.close()
    for hook in trainer._hooks:
        hook.remove()
    del trainer, student
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--student", default="full:28")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--phases", default="1,2")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "tinyonn"))
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--z-loss", type=float, default=0.0)
    parser.add_argument("--examples", type=int, default=0, help="use every n-th training example (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the second, section-synced pass")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sync-debug", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.phases = [int(p) for p in args.phases.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tokenizer = load_teacher("builtin", device=args.device)
    examples = load_probe_set("builtin", "train")
    if args.examples:
        examples = examples[::args.examples]
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "student": args.student, "command": " ".join(sys.argv), "cases": []}
    for spec in args.cases.split(","):
        report["cases"].append(measure_case(spec, args, teacher, tokenizer, examples))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

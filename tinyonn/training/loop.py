"""The training loop: SMK (and the selective/full/dense baselines) over a deterministic data plan.

One optimiser step: for each micro-batch of the plan (`tinyonn.training.batches`: packed rows or
length-grouped padded rows under a token budget), the student's forward (with every MoE layer's
routing) and the frozen teacher's, the loss (response CE + KL to the teacher + load balance
[+ z-loss] [+ router distillation]), backward; then for all MoE layers at once each expert's surprise
from the accumulated gradients, PI from the step's CE, logit entropy and global gradient norm, min_k
(phase 1: a fraction of the layer's experts; phase 2: f(PI, act_k)), the rule's keep mask (gradients
of the other experts zeroed, their optimiser rows frozen), clipping, the warm-up + cosine learning
rate (× PI optionally) and `MaskedAdamW.step`.

Everything a step computes stays on the device: the loss positions come from the host with the
batch, routing counts and losses are accumulated as tensors, and the log's values are read back in
one transfer at the end of the step (or every `log_every` steps), the step's only host sync.

A step whose loss or gradient norm is NaN or inf is skipped: the optimiser leaves every weight,
moment and step count as it was (decided on the device, no host sync), the data and schedule move on
to the next step, and the log records it (`skipped: true`, the run's count in `skipped_steps`, in the
summary too) with a `NonFiniteStepWarning` naming the step.

Each step appends one JSON line to `log.jsonl`; checkpoints are written every `checkpoint_every`
steps, at the end, and when SIGTERM/SIGINT arrives (the signal is deferred to the end of the step,
the checkpoint written, then the signal re-raised with the previous handler).
`train(..., resume=True)` continues from the newest checkpoint and ends bitwise equal to an
uninterrupted run (the log's fields other than `TIMING_FIELDS` too).

A plain Hugging Face causal LM (no MoE layers) trains through the same loop with rule "full": its
MLPs are what trains, KD from a frozen copy of the teacher (the dense fine-tune baseline).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import threading
import warnings
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tinyonn import distributed
from tinyonn.config import DataConfig
from tinyonn.data import Example, encode_examples
from tinyonn.model.moe_layer import expert_mass
from tinyonn.model.routing import RoutingConfig
from tinyonn.training.batches import MicroBatch, PlannedStep, SampleArrays, collate_micro_batch, plan_steps
from tinyonn.training.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint, \
    seed_rng, truncate_log, write_text_atomic
from tinyonn.training.config import TrainConfig, experts_for
from tinyonn.training.losses import cross_entropy_sum_at, distillation_per_token, kl_to_teacher_sum_at, \
    router_z_loss, stacked_balance_loss
from tinyonn.training.optim import scheduled_lr, set_learning_rate
from tinyonn.training.parameters import TrainedParameters, build_optimizer, cast_parameters, select_trained
from tinyonn.training.phases import phase1_done, phase1_routing, phase2_routing
from tinyonn.training.rules import keep_grid, zero_dropped_rows
from tinyonn.training.surprise import ExpertRows, entropy_sum, global_surprise, min_k_tensor, pi_score

class NonFiniteStepWarning(RuntimeWarning):
    """A training step's loss or gradient was NaN or inf: its optimiser step was skipped."""


TIMING_FIELDS = ("step_seconds", "tok_per_s", "elapsed_s", "memory_gib")
"""Log fields that measure the machine, not the training: they differ between identical runs."""
CONFIG_FIELDS_FREE_ON_RESUME = ("progress", "checkpoint_every", "keep_checkpoints", "log_every")
"""Config fields a resumed run may change (they do not change what is computed)."""


@dataclass
class RunState:
    """What a checkpoint records besides tensors (JSON)."""

    step: int = 0
    """Optimiser steps done."""
    phase: int = 1
    phase1_steps: int = 0
    phase2_start: int | None = None
    """The first step (0-based) of phase 2."""
    tokens_seen: int = 0
    distill_history: list[float] = field(default_factory=list)
    """Phase 1's router distillation loss per step (the convergence rule reads it)."""
    log_lines: int = 0
    skipped_steps: int = 0
    """Steps whose loss or gradient was not finite (no optimiser update)."""
    elapsed_s: float = 0.0
    validation_before: dict | None = None
    validation_teacher: dict | None = None


class DeferredSignals:
    """Inside the block, SIGTERM and SIGINT only set `received`; on exit the previous handlers are
    restored (`reraise` then delivers the signal to them)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is signal.SIG_IGN:  # ignored by whoever started us: stays so
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def reraise(self) -> None:
        if self.received is not None:
            signal.raise_signal(self.received)


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def memory_gib(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _json_ready(config: TrainConfig) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def evaluation_data_config(model, config: TrainConfig) -> DataConfig:
    """The evaluation protocol's data: the model's full context length, the run's batch size."""
    text = getattr(model.config, "text_config", None) or model.config
    return DataConfig(max_length=int(getattr(text, "max_position_embeddings", config.data.max_length)),
                      batch_size=config.data.batch_size, use_chat_template=config.data.use_chat_template,
                      system_prompt=config.data.system_prompt)


def validation_loss(model, tokenizer, examples: Sequence[Example], data: DataConfig) -> dict:
    """Held-out response NLL and perplexity per category and "all" (`heldout_perplexity`)."""
    from tinyonn.evaluation.metrics import heldout_perplexity

    was_training = model.training
    model.eval()
    try:
        return heldout_perplexity(model, tokenizer, examples, data, batch_size=data.batch_size)
    finally:
        model.train(was_training)


def topk_grid(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`tinyonn.model.routing.topk_mask` of every layer at once: scores [L, N, E_max] (−inf in padding
    columns), k [L] → 0/1 float32 mask of each token's k_l best experts."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    return ((rank < k.view(-1, 1, 1)) & (scores > -math.inf)).to(torch.float32)


class SectionTimer:
    """Wall time per named section of a step, with a device sync around each section; off (and
    free) unless `enabled` (bench/train_profile.py turns it on)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = False
        self.totals: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def _timed(self, name: str):
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else nullcontext()


@dataclass
class PendingRecord:
    """A step's log record whose device values have not been read yet."""

    record: dict
    tensors: dict[str, torch.Tensor]
    host_seconds: float


class Trainer:
    """The state of one run; `run()` does the steps (see the module docstring)."""

    def __init__(self, model, teacher, tokenizer, examples: Sequence[Example], config: TrainConfig,
                 out_dir: str | Path, validation: Sequence[Example] | None = None,
                 on_step: Callable[[int, dict], None] | None = None, notes: dict | None = None):
        if model is teacher:
            raise ValueError("the teacher must be a separate, frozen model (for a dense fine-tune: a copy)")
        self.model, self.teacher, self.tokenizer, self.config = model, teacher, tokenizer, config
        self.out_dir = Path(out_dir)
        self.validation = list(validation) if validation else []
        self.on_step = on_step
        self.notes = dict(notes or {})
        self.device = resolve_device(config)
        self.layers = list(model.moe_layers()) if hasattr(model, "moe_layers") else []
        if not self.layers and config.rule != "full":
            raise ValueError(f"a model without MoE layers trains with rule 'full', not {config.rule!r}")
        self.samples, self.skipped = encode_examples(tokenizer, list(examples), config.data)
        self.pack_length = config.pack_length or -(-config.data.max_length // config.pad_to_multiple) * config.pad_to_multiple
        self.plan = plan_steps(self.samples, config.data.batch_size, config.grad_accum, config.seed,
                               config.max_steps, config.max_tokens, step_tokens=config.step_tokens,
                               micro_batch_tokens=config.micro_batch_tokens, packing=config.packing,
                               pack_length=self.pack_length, pad_to_multiple=config.pad_to_multiple,
                               fixed_rows=config.compile)
        self.arrays = [SampleArrays.of(sample) for sample in self.samples]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.original_dtype = next(model.parameters()).dtype
        self.param_dtype = getattr(torch, config.param_dtype)
        self.base_routing: tuple[RoutingConfig, ...] = tuple(model.routing) if self.layers else ()
        text = getattr(model.config, "text_config", None) or model.config
        self.intermediate_size = int(text.intermediate_size)
        self.eval_data = evaluation_data_config(model, config)
        self.use_autocast = config.autocast and self.device.type == "cuda"
        self.state = RunState()
        self.layer_inputs: dict[int, torch.Tensor] = {}
        self._hooks: list = []
        self.log_path = self.out_dir / "log.jsonl"
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self._last_saved_step: int | None = None
        self.pending: list[PendingRecord] = []
        self.timer = SectionTimer(self.device)

    # ------------------------------------------------------------------ set-up

    def _prepare(self, resume: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = load_checkpoint(latest_checkpoint(self.checkpoint_dir)) \
            if resume and latest_checkpoint(self.checkpoint_dir) else None
        if checkpoint is None:
            self._clear_outputs()
            seed_rng(self.config.seed)  # a fresh run's RNG state never depends on what ran before it
        self.model.to(self.device)
        self.teacher.to(self.device).eval().requires_grad_(False)
        if checkpoint is None and self.validation:
            self.state.validation_teacher = validation_loss(self.teacher, self.tokenizer, self.validation, self.eval_data)
            self.state.validation_before = validation_loss(self.model, self.tokenizer, self.validation, self.eval_data)
        cast_parameters(self.model, self.param_dtype)
        cast_parameters(self.teacher, torch.bfloat16 if self.use_autocast else self.param_dtype)
        self.trained: TrainedParameters = select_trained(self.model, self.config)
        self.optimizer = build_optimizer(self.trained, self.config)
        self.model.train()
        if checkpoint is not None:
            self._restore(checkpoint)
        self._set_phase_routing()
        if self.layers:
            self.rows = ExpertRows(self.layers)
            count = lambda fraction: torch.tensor([experts_for(fraction, e) for e in self.rows.num_experts],  # noqa: E731
                                                  device=self.device)
            self.phase1_top_k = count(self.config.phase1.top_k_fraction)
            self.phase1_min_k = count(self.config.phase1.min_k_fraction)
        if self._needs_layer_inputs():  # each MoE layer's input x (router distillation, z-loss)
            for index, layer in enumerate(self.layers):
                self._hooks.append(layer.register_forward_pre_hook(
                    lambda module, args, index=index: self.layer_inputs.__setitem__(index, args[0])))
        self.forward_model, self.teacher_forward = self.model, self.teacher
        if self.config.compile:
            backend = self.config.compile_backend if self.layers else "inductor"
            if backend == "tinyonn":
                import tinyonn.compile  # noqa: F401  (registers the "tinyonn" backend where no entry point does)
            # packed micro-batches have one shape: compile for it alone, never for symbolic sizes
            dynamic = False if self.config.packing and self.config.micro_batch_tokens else None
            self.forward_model = torch.compile(self.model, backend=backend, dynamic=dynamic)
            self.teacher_forward = torch.compile(self.teacher, dynamic=dynamic)

    def _restore(self, checkpoint) -> None:
        saved = checkpoint.state
        current = _json_ready(self.config)
        differing = sorted(k for k in current.keys() | saved["config"].keys()
                           if current.get(k) != saved["config"].get(k) and k not in CONFIG_FIELDS_FREE_ON_RESUME)
        if differing:
            raise ValueError(f"{checkpoint.path} was written with another TrainConfig (differs in {differing}); "
                             "resume with the same one")
        if saved["total_steps"] != len(self.plan):
            raise ValueError(f"{checkpoint.path}: the data plan has {len(self.plan)} steps, the checkpoint's "
                             f"{saved['total_steps']}: not the same examples")
        missing = set(self.trained.by_name) - set(checkpoint.model)
        if missing:
            raise ValueError(f"{checkpoint.path} lacks trained parameters: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, param in self.trained.by_name.items():
                param.copy_(checkpoint.model[name])
        self.optimizer.load_state_tensors(self.trained.names, checkpoint.optimizer)
        restore_rng_state(saved["rng"], checkpoint.rng)
        fields = {f for f in RunState.__dataclass_fields__}
        self.state = RunState(**{k: v for k, v in saved.items() if k in fields})
        self._resume_log()
        self._last_saved_step = self.state.step

    def _clear_outputs(self) -> None:
        """A fresh run: no checkpoints, no log (`tinyonn.training.ddp` keeps rank 0's on other ranks)."""
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def _resume_log(self) -> None:
        """A resumed run: the log cut back to the lines the checkpoint recorded."""
        truncate_log(self.log_path, self.state.log_lines)

    def _needs_layer_inputs(self) -> bool:
        phase1, phase2 = self.config.phase1, self.config.phase2
        return bool(self.layers) and (self.config.z_loss_weight > 0 or phase2.router_distill_weight > 0
                                      or (phase1.steps > 0 and phase1.router_distill_weight > 0))

    def _set_phase_routing(self) -> None:
        if not self.layers:
            return
        if self.state.phase == 1:
            self.model.set_routing(phase1_routing(self.base_routing))
        else:
            self.model.set_routing(phase2_routing(self.layers, self.base_routing, self.config.phase2,
                                                  self.intermediate_size))

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_autocast else nullcontext()

    def _micro_batch(self, micro: MicroBatch, planned: PlannedStep, sums: dict, scale: float = 1.0) -> None:
        """Forward and backward of one micro-batch; adds its loss parts and routing counts to `sums`
        (device tensors only: nothing is read back). `scale` multiplies the loss that is
        backpropagated (0: a pass that only joins a data-parallel all-reduce)."""
        config, timer = self.config, self.timer
        with timer("collate"):
            batch = collate_micro_batch(self.arrays, micro, self.pad_id).to(self.device)
        inputs = dict(input_ids=batch.input_ids, use_cache=False)
        if batch.attention_mask is not None:
            inputs["attention_mask"] = batch.attention_mask
        if batch.position_ids is not None:
            inputs["position_ids"] = batch.position_ids
        kd_count = planned.response_tokens if config.kd_tokens == "response" else planned.pairs
        self.layer_inputs.clear()
        with self._autocast():
            with timer("student_forward"):
                out = self.forward_model(**inputs, output_router_logits=True) if self.layers \
                    else self.forward_model(**inputs)
            teacher_logits = None
            if config.kd_weight > 0:
                with timer("teacher_forward"), torch.no_grad():
                    teacher_logits = self.teacher_forward(**inputs).logits
        with timer("losses"):
            logits = out.logits
            ce, scored = cross_entropy_sum_at(logits, batch.response_index, batch.response_targets)
            loss = config.ce_weight * ce / planned.response_tokens
            sums["ce"] += ce.detach()
            sums["entropy"] += entropy_sum(scored)
            if teacher_logits is not None:
                index = batch.response_index if config.kd_tokens == "response" else batch.pair_index
                kd = kl_to_teacher_sum_at(logits, teacher_logits, index, config.kd_temperature)
                loss = loss + config.kd_weight * kd / kd_count
                sums["kd"] += kd.detach() / kd_count
            if self.layers:
                loss = loss + self._router_losses(out.router_outputs, batch.token_weight, batch.tokens, planned, sums)
        with timer("backward"):
            (loss if scale == 1.0 else loss * scale).backward()
        sums["loss"] += loss.detach()

    def _router_losses(self, router_outputs, weights: torch.Tensor, count: int, planned: PlannedStep,
                       sums: dict) -> torch.Tensor:
        """Load balance, router distillation and z-loss of a micro-batch over its sample tokens
        (`weights`, `count` of them), weighted by its share of the step's tokens; each expert's token
        count. The balance loss and the counts are computed for all layers at once."""
        config, phase, rows = self.config, self.state.phase, self.rows
        distill_weight = config.phase1.router_distill_weight if phase == 1 else config.phase2.router_distill_weight
        share = count / planned.tokens
        scores = rows.pad([routed.scores for routed in router_outputs], -math.inf)  # [L, N, E_max]
        mask = rows.pad([routed.mask for routed in router_outputs], 0.0)
        # phase 1 turns every expert on: balance the top_k the router learns to pick
        balance_mask = topk_grid(scores.detach(), self.phase1_top_k) if phase == 1 else mask.detach()
        balance = stacked_balance_loss(scores, balance_mask, weights, count, rows.experts).mean()
        total = config.balance_weight * balance
        sums["balance"] += share * balance.detach()
        sums["expert_tokens"] += (mask.detach() * weights.unsqueeze(-1)).sum(1).double()
        if distill_weight > 0 or config.z_loss_weight > 0:
            distill, z_loss = [], []
            for index, (layer, routed) in enumerate(zip(self.layers, router_outputs)):
                x = self.layer_inputs[index].reshape(-1, self.layer_inputs[index].shape[-1])
                if distill_weight > 0:
                    with torch.no_grad():
                        mass = expert_mass(layer.dense_h(x.detach()), layer.w_down, layer.unit_expert, layer.num_experts)
                    distill.append((distillation_per_token(routed.scores, mass) * weights).sum() / count)
                if config.z_loss_weight > 0:
                    z_loss.append(router_z_loss(layer.router, x, weights, count))
            if distill:
                mean = torch.stack(distill).mean()
                total = total + distill_weight * mean
                sums["router_distill"] += share * mean.detach()
            if z_loss:
                mean = torch.stack(z_loss).mean()
                total = total + config.z_loss_weight * mean
                sums["z_loss"] += share * mean.detach()
        return share * total

    def _step(self, planned: PlannedStep) -> PendingRecord:
        """One optimiser step; returns its log record, its device values still unread."""
        config, state, timer = self.config, self.state, self.timer
        started = time.perf_counter()
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        sums = {key: zero() for key in ("loss", "ce", "kd", "entropy", "balance", "router_distill", "z_loss")}
        if self.layers:
            sums["expert_tokens"] = torch.zeros(self.rows.num_layers, self.rows.width, dtype=torch.float64,
                                                device=self.device)
        self._accumulate(planned, sums)

        with timer("rule"):
            params = self.trained.parameters()
            surprise = global_surprise(p.grad for p in params)
            epsilon = sums["ce"] / planned.response_tokens
            tau = sums["entropy"] / planned.response_tokens
            pi = pi_score(epsilon, tau, surprise, config.pi_alpha, config.pi_gamma).to(self.device)
            layer_tensors, row_masks = self._apply_rule(pi, planned, sums) if self.layers else ({}, {})
        with timer("clip"):
            if config.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
            else:
                grad_norm = global_surprise(p.grad for p in params)
        with timer("optimizer"):
            lr = scheduled_lr(state.step, len(self.plan), config.lr, config.warmup_steps, config.min_lr_ratio)
            lr_value = lr * pi if config.pi_modulated_lr else lr
            set_learning_rate(self.optimizer, lr_value)
            finite = torch.isfinite(sums["loss"]) & torch.isfinite(surprise) & torch.isfinite(grad_norm)
            self.optimizer.step(row_masks, finite=finite)
            self.optimizer.zero_grad(set_to_none=True)

        state.tokens_seen += planned.tokens
        record = {
            "step": state.step + 1, "phase": state.phase, "epoch": planned.epoch, "lr": lr,
            "loss": None, "ce": None, "kd": None, "balance": None, "router_distill": None, "z_loss": None,
            "pi": None, "tau": None, "surprise": None, "grad_norm": None, "tokens": planned.tokens,
            "response_tokens": planned.response_tokens, "tokens_seen": state.tokens_seen,
            "surprise_mean": [], "surprise_max": [], "min_k": [], "act_k": [], "experts_updated": [],
            "active_experts": [], "active_units": [], "active_experts_mean": None, "active_units_mean": None,
            "active_unit_fraction": 1.0, "val_loss": None, "skipped": None, "skipped_steps": None,
            "step_seconds": None, "tok_per_s": None, "elapsed_s": None, "memory_gib": memory_gib(self.device),
        }
        tensors = {"loss": sums["loss"], "ce": epsilon, "kd": sums["kd"], "balance": sums["balance"],
                   "router_distill": sums["router_distill"], "z_loss": sums["z_loss"], "pi": pi, "tau": tau,
                   "surprise": surprise, "grad_norm": grad_norm, "skipped": ~finite, **layer_tensors}
        if config.pi_modulated_lr:
            tensors["lr"] = lr_value
        if state.phase == 1:
            state.phase1_steps += 1
        state.step += 1
        return PendingRecord(record, tensors, time.perf_counter() - started)

    def _accumulate(self, planned: PlannedStep, sums: dict) -> None:
        """Forward and backward of every micro-batch of the step, gradients accumulated in `.grad`
        (`tinyonn.training.ddp` runs this rank's share and sums over the ranks)."""
        for micro in planned.layout:
            self._micro_batch(micro, planned, sums)

    def _stop_requested(self, signals: DeferredSignals) -> bool:
        """Whether SIGTERM/SIGINT arrived (the run checkpoints and stops after the current step)."""
        return signals.received is not None

    def _apply_rule(self, pi: torch.Tensor, planned: PlannedStep, sums: dict
                    ) -> tuple[dict[str, torch.Tensor], dict[torch.Tensor, torch.Tensor]]:
        """Every layer at once: surprise, act_k, min_k, the rule's keep mask (gradients zeroed outside
        it); the log's per-layer tensors and the optimiser's row masks."""
        config, rows, tokens = self.config, self.rows, planned.tokens
        surprise = rows.stacked_surprise()
        expert_tokens = sums["expert_tokens"]  # [L, E_max] tokens that selected each expert (exact in float64)
        experts = expert_tokens.sum(1).round().to(torch.int64)
        act_k = ((experts + tokens - 1) // tokens).clamp_min(1)  # ceil of the mean experts per token
        min_k = self.phase1_min_k if self.state.phase == 1 else min_k_tensor(pi, act_k)
        keep = keep_grid(config.rule, surprise, expert_tokens > 0, min_k, rows.valid)
        row_masks = {}
        if config.rule != "full":
            masks = rows.row_masks(keep)
            zero_dropped_rows(rows.params, masks)
            row_masks = dict(zip(rows.params, masks))
        units = (expert_tokens * rows.sizes).sum(1) + rows.shared * tokens
        layer_tensors = {
            "surprise_mean": surprise.sum(1) / rows.experts, "surprise_max": surprise.max(1).values,
            "min_k": min_k, "act_k": act_k, "experts_updated": keep.sum(1),
            "active_experts": experts.double() / tokens, "active_units": units / tokens,
        }
        return layer_tensors, row_masks

    # ------------------------------------------------------------------ logging

    INT_FIELDS = ("min_k", "act_k", "experts_updated")
    BOOL_FIELDS = ("skipped",)

    def _flush(self) -> None:
        """Read every pending record's device values in one transfer (the host sync), then write the
        records, update the progress bar and call `on_step` for each."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        started = time.perf_counter()
        with self.timer("log_read"):
            parts = [t.detach().reshape(-1).to(torch.float64) for p in pending for t in p.tensors.values()]
            values = torch.cat(parts).tolist() if parts else []
        wait = (time.perf_counter() - started) / len(pending)
        state, at = self.state, 0
        for item in pending:
            record = item.record
            for key, tensor in item.tensors.items():
                size = tensor.numel()
                chunk = values[at:at + size]
                at += size
                if key in self.INT_FIELDS:
                    chunk = [int(v) for v in chunk]
                elif key in self.BOOL_FIELDS:
                    chunk = [bool(v) for v in chunk]
                record[key] = chunk if tensor.dim() else chunk[0]
            if self.layers:
                count = len(self.layers)
                record["active_experts_mean"] = sum(record["active_experts"]) / count
                record["active_units_mean"] = sum(record["active_units"]) / count
                record["active_unit_fraction"] = record["active_units_mean"] / self.intermediate_size
            else:
                record["active_experts_mean"] = record["active_units_mean"] = None
            seconds = item.host_seconds + wait
            state.elapsed_s += seconds
            record.update(step_seconds=seconds, tok_per_s=record["tokens"] / max(seconds, 1e-9),
                          elapsed_s=state.elapsed_s)
            if record["skipped"]:
                state.skipped_steps += 1
                warnings.warn(f"training step {record['step']}: non-finite loss or gradient (loss {record['loss']}, "
                              f"gradient norm {record['grad_norm']}): optimiser step skipped, training goes on "
                              f"({state.skipped_steps} skipped so far)", NonFiniteStepWarning, stacklevel=2)
            record["skipped_steps"] = state.skipped_steps
            if record["phase"] == 1 and not record["skipped"]:
                state.distill_history = (state.distill_history + [record["router_distill"]])[
                    -2 * self.config.phase1.converge_window:]
            self._log_file.write(json.dumps(record) + "\n")
            state.log_lines += 1
            self._progress.update(1)
            self._progress.set_postfix(loss=f"{record['loss']:.4f}", phase=record["phase"],
                                       tok_s=f"{record['tok_per_s']:.0f}")
            if self.on_step is not None:
                self.on_step(record["step"], record)
        self._log_file.flush()

    def _must_flush(self) -> bool:
        """Whether the pending records are to be read now (see `TrainConfig.log_every`)."""
        state, config = self.state, self.config
        return (len(self.pending) >= config.log_every or self.on_step is not None
                or state.step >= len(self.plan)
                or (state.phase == 1 and config.phase1.switch == "converged")
                or bool(config.checkpoint_every and state.step % config.checkpoint_every == 0))

    # ------------------------------------------------------------------ the run

    def _checkpoint(self) -> None:
        if self._last_saved_step == self.state.step:
            return
        self._flush()
        self._log_file.flush()
        os.fsync(self._log_file.fileno())
        next_step = self.plan[self.state.step] if self.state.step < len(self.plan) else None
        state = {**asdict(self.state), "config": _json_ready(self.config), "total_steps": len(self.plan),
                 "data_position": {"epoch": next_step.epoch, "offset": next_step.offset} if next_step else None}
        tensors = {name: param.detach() for name, param in self.trained.by_name.items()}
        save_checkpoint(self.checkpoint_dir, self.state.step, tensors,
                        self.optimizer.state_tensors(self.trained.names), state, keep=self.config.keep_checkpoints)
        self._last_saved_step = self.state.step

    def _maybe_switch_phase(self) -> None:
        state = self.state
        if state.phase == 1 and phase1_done(self.config.phase1, state.phase1_steps, state.distill_history,
                                            len(self.plan)):
            state.phase, state.phase2_start = 2, state.step
            self._set_phase_routing()

    def run(self, resume: bool = False) -> dict:
        from tqdm.auto import tqdm

        self._prepare(resume)
        resumed_from = self.state.step if resume and self._last_saved_step is not None else None
        signals = DeferredSignals()
        self._progress = tqdm(total=len(self.plan), initial=self.state.step, disable=not self.config.progress,
                              desc="train", unit="step", dynamic_ncols=True)
        self._log_file = open(self.log_path, "a")
        try:
            with signals:
                while self.state.step < len(self.plan) and not self._stop_requested(signals):
                    self._maybe_switch_phase()
                    pending = self._step(self.plan[self.state.step])
                    if self.config.eval_every and self.validation and self.state.step % self.config.eval_every == 0:
                        pending.record["val_loss"] = validation_loss(self.model, self.tokenizer, self.validation,
                                                                     self.eval_data)["all"]["nll"]
                    self.pending.append(pending)
                    if self._must_flush():
                        self._flush()
                    if self.config.checkpoint_every and self.state.step % self.config.checkpoint_every == 0:
                        self._checkpoint()
                self._flush()
                if signals.received is not None or self.state.step == len(self.plan):
                    self._checkpoint()
        finally:
            self.pending.clear()
            self._progress.close()
            self._log_file.close()
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
        if signals.received is not None:
            signals.reraise()  # the previous handler: SIGINT raises KeyboardInterrupt, SIGTERM ends the process
            return self._summary(resumed_from, interrupted=True)
        return self._finish(resumed_from)

    def _finish(self, resumed_from: int | None) -> dict:
        if self.layers and self.state.phase == 1:  # the run ended inside phase 1: save the phase-2 routing
            warnings.warn(f"training ended in phase 1 after {self.state.step} steps; the saved model gets the "
                          "phase-2 routing its routers were trained for (raise the budget or lower phase1.steps)",
                          stacklevel=3)
            self.model.set_routing(phase2_routing(self.layers, self.base_routing, self.config.phase2,
                                                  self.intermediate_size))
            self.notes["ended_in_phase1"] = True
        cast_parameters(self.model, self.original_dtype)
        self.model.eval()
        after = validation_loss(self.model, self.tokenizer, self.validation, self.eval_data) if self.validation else None
        model_dir = self.out_dir / "model"
        self.model.save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        summary = self._summary(resumed_from, interrupted=False, validation_after=after)
        write_text_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def _summary(self, resumed_from: int | None, interrupted: bool, validation_after: dict | None = None) -> dict:
        state = self.state
        last = {}
        if self.log_path.exists():
            lines = self.log_path.read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
        return {
            "rule": self.config.rule, "steps": state.step, "total_steps": len(self.plan),
            "tokens": state.tokens_seen, "samples": len(self.samples),
            "skipped": {"empty_response": self.skipped.empty_response, "truncated_away": self.skipped.truncated_away},
            "phase": state.phase, "phase2_start_step": state.phase2_start, "dense": not self.layers,
            "final": {key: last.get(key) for key in ("loss", "ce", "kd", "balance", "router_distill", "pi",
                                                     "active_experts_mean", "active_units_mean",
                                                     "active_unit_fraction")},
            "routing": [asdict(r) for r in self.model.routing] if self.layers else None,
            "validation": {"teacher": state.validation_teacher, "before": state.validation_before,
                           "after": validation_after},
            "elapsed_s": state.elapsed_s, "tok_per_s": state.tokens_seen / max(state.elapsed_s, 1e-9),
            "skipped_steps": state.skipped_steps,
            "resumed_from_step": resumed_from, "interrupted": interrupted,
            "model_dir": str(self.out_dir / "model") if not interrupted else None,
            "config": _json_ready(self.config), **self.notes,
        }


def train(model, teacher, tokenizer, examples: Sequence[Example], config: TrainConfig, out_dir: str | Path, *,
          validation: Sequence[Example] | None = None, resume: bool = False,
          on_step: Callable[[int, dict], None] | None = None, notes: dict | None = None) -> dict:
    """Train `model` (a TinyONN model, or a plain causal LM with rule "full") on `examples` with KD
    from the frozen `teacher` (moved to the run's device and cast to its compute dtype); write `out_dir/` (`model/`, `log.jsonl`, `checkpoints/`,
    `summary.json`) and return the summary. `validation` examples are evaluated (held-out
    perplexity) for the teacher and the model before and after, and every `eval_every` steps;
    `resume` continues from the newest checkpoint in `out_dir/checkpoints`; `on_step(step, record)`
    is called after each step; `notes` are added to the summary. Under torchrun (WORLD_SIZE > 1)
    each rank runs its share of every step through DistributedDataParallel (`tinyonn.training.ddp`)."""
    trainer_class = Trainer
    if distributed.launched():  # torchrun: data-parallel over the ranks
        from tinyonn.training.ddp import DistributedTrainer as trainer_class
    trainer = trainer_class(model, teacher, tokenizer, examples, config, out_dir, validation, on_step, notes)
    return trainer.run(resume=resume)

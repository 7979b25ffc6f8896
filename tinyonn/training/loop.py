"""The training loop: SMK (and the selective/full/dense baselines) over a deterministic data plan.

One optimiser step: for each micro-batch, the student's forward (with every MoE layer's routing) and
the frozen teacher's, the loss (response CE + KL to the teacher + load balance [+ z-loss] [+ router
distillation]), backward; then per MoE layer each expert's surprise from the accumulated gradients,
PI from the step's CE, logit entropy and global gradient norm, min_k (phase 1: a fraction of the
layer's experts; phase 2: f(PI, act_k)), the rule's keep mask (gradients of the other experts zeroed,
their optimiser rows frozen), clipping, the warm-up + cosine learning rate (× PI optionally) and
`MaskedAdamW.step`. Each step appends one JSON line to `log.jsonl`; checkpoints are written every
`checkpoint_every` steps, at the end, and when SIGTERM/SIGINT arrives (the signal is deferred to the
end of the step, the checkpoint written, then the signal re-raised with the previous handler).
`train(..., resume=True)` continues from the newest checkpoint and ends bitwise equal to an
uninterrupted run (the log's fields other than `TIMING_FIELDS` too).

A plain Hugging Face causal LM (no MoE layers) trains through the same loop with rule "full": its
MLPs are what trains, KD from a frozen copy of the teacher (the dense fine-tune baseline).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tinyonn.config import DataConfig
from tinyonn.data import Example, collate, encode_examples
from tinyonn.model.moe_layer import expert_mass
from tinyonn.model.routing import RoutingConfig, topk_mask
from tinyonn.training.batches import PlannedStep, pad_to_multiple, plan_steps
from tinyonn.training.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint, \
    truncate_log, write_text_atomic
from tinyonn.training.config import TrainConfig, experts_for
from tinyonn.training.losses import cross_entropy_sum, kd_positions, kl_to_teacher_sum, router_distillation_loss, \
    router_z_loss, switch_balance_loss
from tinyonn.training.optim import scheduled_lr, set_learning_rate
from tinyonn.training.parameters import TrainedParameters, build_optimizer, cast_parameters, select_trained
from tinyonn.training.phases import phase1_done, phase1_routing, phase2_routing
from tinyonn.training.rules import keep_experts, mask_expert_gradients
from tinyonn.training.surprise import entropy_sum, expert_surprise, global_surprise, min_k_from_pi, pi_score

TIMING_FIELDS = ("step_seconds", "tok_per_s", "elapsed_s", "memory_gib")
"""Log fields that measure the machine, not the training: they differ between identical runs."""
CONFIG_FIELDS_FREE_ON_RESUME = ("progress", "checkpoint_every", "keep_checkpoints")
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
        self.plan = plan_steps(self.samples, config.data.batch_size, config.grad_accum, config.seed,
                               config.max_steps, config.max_tokens)
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

    # ------------------------------------------------------------------ set-up

    def _prepare(self, resume: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = load_checkpoint(latest_checkpoint(self.checkpoint_dir)) \
            if resume and latest_checkpoint(self.checkpoint_dir) else None
        if checkpoint is None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)
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
        if self._needs_layer_inputs():  # each MoE layer's input x (router distillation, z-loss)
            for index, layer in enumerate(self.layers):
                self._hooks.append(layer.register_forward_pre_hook(
                    lambda module, args, index=index: self.layer_inputs.__setitem__(index, args[0])))
        self.forward_model, self.teacher_forward = self.model, self.teacher
        if self.config.compile and self.device.type == "cuda":
            import tinyonn.compile  # noqa: F401  (registers the "tinyonn" backend where no entry point does)

            self.forward_model = torch.compile(self.model, backend="tinyonn" if self.layers else "inductor")
            self.teacher_forward = torch.compile(self.teacher)

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
        truncate_log(self.log_path, self.state.log_lines)
        self._last_saved_step = self.state.step

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

    def _micro_batch(self, indices: Sequence[int], planned: PlannedStep, sums: dict, layer_stats: list[dict]) -> None:
        """Forward and backward of one micro-batch; adds its loss parts and routing counts to `sums`
        and `layer_stats`."""
        config = self.config
        batch = collate([self.samples[i] for i in indices], self.pad_id, "right")
        batch = pad_to_multiple(batch, config.pad_to_multiple, self.pad_id).to(self.device)
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        kd_count = planned.response_tokens if config.kd_tokens == "response" else planned.pairs
        self.layer_inputs.clear()
        with self._autocast():
            out = self.forward_model(**inputs, output_router_logits=True) if self.layers else self.forward_model(**inputs)
            teacher_logits = None
            if config.kd_weight > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher_forward(**inputs).logits
        logits = out.logits
        ce, scored = cross_entropy_sum(logits, batch.labels)
        loss = config.ce_weight * ce / planned.response_tokens
        sums["ce"] += ce.detach()
        sums["entropy"] += entropy_sum(scored)
        if teacher_logits is not None:
            kd = kl_to_teacher_sum(logits, teacher_logits, kd_positions(batch.labels, batch.attention_mask,
                                                                        config.kd_tokens), config.kd_temperature)
            loss = loss + config.kd_weight * kd / kd_count
            sums["kd"] += kd.detach() / kd_count
        if self.layers:
            loss = loss + self._router_losses(out.router_outputs, batch.attention_mask, planned, sums, layer_stats)
        loss.backward()
        sums["loss"] += loss.detach()

    def _router_losses(self, router_outputs, attention_mask: torch.Tensor, planned: PlannedStep, sums: dict,
                       layer_stats: list[dict]) -> torch.Tensor:
        """Load balance, router distillation and z-loss of a micro-batch (weighted by its share of
        the step's tokens); counts of active experts and units per layer."""
        config, phase = self.config, self.state.phase
        distill_weight = config.phase1.router_distill_weight if phase == 1 else config.phase2.router_distill_weight
        attended = attention_mask.reshape(-1).bool()
        share = attended.sum() / planned.tokens
        balance, distill, z_loss = [], [], []
        for index, (layer, routed) in enumerate(zip(self.layers, router_outputs)):
            scores, mask = routed.scores[attended], routed.mask[attended]
            balance_mask = mask
            if phase == 1:  # every expert is on: balance the top_k the router learns to pick
                balance_mask = topk_mask(scores.detach(), experts_for(config.phase1.top_k_fraction, layer.num_experts))
            balance.append(switch_balance_loss(scores, balance_mask))
            if distill_weight > 0 or config.z_loss_weight > 0:
                x = self.layer_inputs[index].reshape(-1, self.layer_inputs[index].shape[-1])[attended]
                if distill_weight > 0:
                    with torch.no_grad():
                        mass = expert_mass(layer.dense_h(x.detach()), layer.w_down, layer.unit_expert, layer.num_experts)
                    distill.append(router_distillation_loss(scores, mass))
                if config.z_loss_weight > 0:
                    z_loss.append(router_z_loss(layer.router, x))
            stats = layer_stats[index]
            selected = mask.detach() > 0
            stats["experts"] += selected.sum()
            stats["units"] += (mask.detach() @ layer.expert_sizes.to(mask.dtype)).sum() \
                + layer.shared_gate.shape[0] * selected.shape[0]
            stats["activated"] |= selected.any(0)
        total = config.balance_weight * torch.stack(balance).mean()
        sums["balance"] += share * torch.stack(balance).mean().detach()
        if distill:
            total = total + distill_weight * torch.stack(distill).mean()
            sums["router_distill"] += share * torch.stack(distill).mean().detach()
        if z_loss:
            total = total + config.z_loss_weight * torch.stack(z_loss).mean()
            sums["z_loss"] += share * torch.stack(z_loss).mean().detach()
        return share * total

    def _step(self, planned: PlannedStep) -> dict:
        """One optimiser step; returns its log record."""
        config, state = self.config, self.state
        started = time.perf_counter()
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        sums = {key: zero() for key in ("loss", "ce", "kd", "entropy", "balance", "router_distill", "z_loss")}
        layer_stats = [{"experts": zero(), "units": zero(),
                        "activated": torch.zeros(layer.num_experts, dtype=torch.bool, device=self.device)}
                       for layer in self.layers]
        for indices in planned.micro_batches:
            self._micro_batch(indices, planned, sums, layer_stats)

        params = self.trained.parameters()
        surprise = global_surprise(p.grad for p in params)
        epsilon = sums["ce"] / planned.response_tokens
        tau = sums["entropy"] / planned.response_tokens
        pi = float(pi_score(epsilon, tau, surprise, config.pi_alpha, config.pi_gamma))
        record_layers = self._apply_rule(pi, planned, layer_stats)
        if config.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        else:
            grad_norm = float(global_surprise(p.grad for p in params))
        lr = scheduled_lr(state.step, len(self.plan), config.lr, config.warmup_steps, config.min_lr_ratio)
        if config.pi_modulated_lr:
            lr *= pi
        set_learning_rate(self.optimizer, lr)
        self.optimizer.step(record_layers.pop("row_masks"))
        self.optimizer.zero_grad(set_to_none=True)

        values = {key: float(value) for key, value in sums.items()}
        seconds = time.perf_counter() - started
        state.tokens_seen += planned.tokens
        state.elapsed_s += seconds
        record = {
            "step": state.step + 1, "phase": state.phase, "epoch": planned.epoch, "lr": lr,
            "loss": values["loss"], "ce": float(epsilon), "kd": values["kd"],
            "balance": values["balance"], "router_distill": values["router_distill"], "z_loss": values["z_loss"],
            "pi": pi, "tau": float(tau), "surprise": float(surprise),
            "grad_norm": grad_norm, "tokens": planned.tokens, "response_tokens": planned.response_tokens,
            "tokens_seen": state.tokens_seen, **record_layers, "val_loss": None,
            "step_seconds": seconds, "tok_per_s": planned.tokens / max(seconds, 1e-9),
            "elapsed_s": state.elapsed_s, "memory_gib": memory_gib(self.device),
        }
        if state.phase == 1:
            state.phase1_steps += 1
            state.distill_history = (state.distill_history + [values["router_distill"]])[
                -2 * config.phase1.converge_window:]
        state.step += 1
        return record

    def _apply_rule(self, pi: float, planned: PlannedStep, layer_stats: list[dict]) -> dict:
        """Per layer: surprise, min_k, the rule's keep mask (gradients zeroed outside it); the log's
        per-layer lists and the optimiser's row masks."""
        config = self.config
        out = {key: [] for key in ("surprise_mean", "surprise_max", "min_k", "act_k", "experts_updated",
                                   "active_experts", "active_units")}
        row_masks = {}
        for layer, stats in zip(self.layers, layer_stats):
            surprise = expert_surprise(layer)
            experts = int(stats["experts"])
            act_k = max(1, -(-experts // planned.tokens))  # ceil of the mean experts per token
            if self.state.phase == 1:
                min_k = experts_for(config.phase1.min_k_fraction, layer.num_experts)
            else:
                min_k = min_k_from_pi(pi, act_k)
            keep = keep_experts(config.rule, surprise, stats["activated"], min_k)
            if config.rule != "full":
                row_masks.update(mask_expert_gradients(layer, keep))
            out["surprise_mean"].append(float(surprise.mean()))
            out["surprise_max"].append(float(surprise.max()))
            out["min_k"].append(min_k)
            out["act_k"].append(act_k)
            out["experts_updated"].append(int(keep.sum()))
            out["active_experts"].append(experts / planned.tokens)
            out["active_units"].append(float(stats["units"]) / planned.tokens)
        count = max(len(self.layers), 1)
        out["active_experts_mean"] = sum(out["active_experts"]) / count if self.layers else None
        out["active_units_mean"] = sum(out["active_units"]) / count if self.layers else None
        out["active_unit_fraction"] = (out["active_units_mean"] / self.intermediate_size) if self.layers else 1.0
        out["row_masks"] = row_masks
        return out

    # ------------------------------------------------------------------ the run

    def _checkpoint(self) -> None:
        if self._last_saved_step == self.state.step:
            return
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
        if state.phase == 1 and phase1_done(self.config.phase1, state.phase1_steps, state.distill_history):
            state.phase, state.phase2_start = 2, state.step
            self._set_phase_routing()

    def run(self, resume: bool = False) -> dict:
        from tqdm.auto import tqdm

        self._prepare(resume)
        resumed_from = self.state.step if resume and self._last_saved_step is not None else None
        signals = DeferredSignals()
        progress = tqdm(total=len(self.plan), initial=self.state.step, disable=not self.config.progress,
                        desc="train", unit="step", dynamic_ncols=True)
        self._log_file = open(self.log_path, "a")
        try:
            with signals:
                while self.state.step < len(self.plan) and signals.received is None:
                    self._maybe_switch_phase()
                    record = self._step(self.plan[self.state.step])
                    if self.config.eval_every and self.validation and self.state.step % self.config.eval_every == 0:
                        record["val_loss"] = validation_loss(self.model, self.tokenizer, self.validation,
                                                             self.eval_data)["all"]["nll"]
                    self._log_file.write(json.dumps(record) + "\n")
                    self._log_file.flush()
                    self.state.log_lines += 1
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", phase=record["phase"],
                                         tok_s=f"{record['tok_per_s']:.0f}")
                    if self.on_step is not None:
                        self.on_step(self.state.step, record)
                    if self.config.checkpoint_every and self.state.step % self.config.checkpoint_every == 0:
                        self._checkpoint()
                if signals.received is not None or self.state.step == len(self.plan):
                    self._checkpoint()
        finally:
            progress.close()
            self._log_file.close()
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
        if signals.received is not None:
            signals.reraise()  # the previous handler: SIGINT raises KeyboardInterrupt, SIGTERM ends the process
            return self._summary(resumed_from, interrupted=True)
        return self._finish(resumed_from)

    def _finish(self, resumed_from: int | None) -> dict:
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
    is called after each step; `notes` are added to the summary."""
    trainer = Trainer(model, teacher, tokenizer, examples, config, out_dir, validation, on_step, notes)
    return trainer.run(resume=resume)

"""The training configuration: one frozen, validated `TrainConfig` with a config per SMK phase.

Phase 1, "forced differentiation" (`Phase1Config`): routing mode "all" (every expert computes and
gets a gradient; the layer is the teacher's MLP) while each router learns which experts carry a
token's activation mass; experts update by the run's rule with min_k = a fraction of the layer's
experts. Phase 2, "adaptive emergence" (`Phase2Config`): only routed experts compute (dynamic top-k,
a unit budget, or fixed top-k), and min_k = f(PI, act_k) (`tinyonn.training.surprise.min_k_from_pi`).
Counts that depend on a layer's expert count E are fractions of E (`experts_for`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tinyonn.config import DataConfig

RULES = ("smk", "samk", "selective", "full")
"""Update rules (the seed's PILF names): see `tinyonn.training.rules`."""
PHASE2_ROUTING = ("dynamic", "budget", "topk")
SWITCH_RULES = ("steps", "converged")
KD_TOKENS = ("response", "all")
COMPILE_BACKENDS = ("inductor", "tinyonn")


def experts_for(fraction: float, num_experts: int) -> int:
    """A fraction of a layer's E experts as a count: round(fraction·E), at least 1, at most E."""
    return min(num_experts, max(1, round(fraction * num_experts)))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _fraction(owner: str, name: str, value: float) -> None:
    _check(0 < value <= 1, f"{owner}.{name} is a fraction in (0, 1], got {value}")


@dataclass(frozen=True)
class Phase1Config:
    """Forced differentiation: all experts on, routers learn the teacher's per-token expert mass."""

    steps: int = 200
    """Length of phase 1 in optimiser steps (with switch="converged" its upper bound); 0 skips it."""
    max_run_fraction: float = 0.5
    """Phase 1 never takes more than this fraction of the run's steps (floor), so a short run still
    reaches phase 2 and saves a sparsely routed model; 1.0 lets `steps` alone decide."""
    switch: str = "steps"
    """"steps": phase 2 starts after `steps`; "converged": after `min_steps`, as soon as the router
    distillation loss's mean over the last `converge_window` steps is less than `converge_tol`
    (relative) below its mean over the window before."""
    min_steps: int = 20
    converge_window: int = 20
    converge_tol: float = 0.01
    min_k_fraction: float = 0.1
    """min_k = experts_for(min_k_fraction, E) (the seed: 10 of ~100 experts)."""
    top_k_fraction: float = 0.1
    """The top_k the router learns to pick: the load-balance loss counts each token's top_k experts."""
    router_distill_weight: float = 1.0
    """Weight of the router distillation loss (cross-entropy of the router's scores against the
    normalised per-token expert activation mass)."""

    def __post_init__(self):
        _check(self.steps >= 0 and self.min_steps >= 0 and self.converge_window >= 1,
               "Phase1Config: steps and min_steps must be ≥ 0, converge_window ≥ 1")
        _check(self.switch in SWITCH_RULES, f"Phase1Config.switch must be one of {SWITCH_RULES}, got {self.switch!r}")
        _check(self.converge_tol >= 0 and self.router_distill_weight >= 0,
               "Phase1Config: converge_tol and router_distill_weight must be ≥ 0")
        _check(self.switch == "steps" or self.router_distill_weight > 0,
               "Phase1Config: switch='converged' watches the router distillation loss: router_distill_weight must be > 0")
        _fraction("Phase1Config", "min_k_fraction", self.min_k_fraction)
        _fraction("Phase1Config", "max_run_fraction", self.max_run_fraction)
        _fraction("Phase1Config", "top_k_fraction", self.top_k_fraction)


@dataclass(frozen=True)
class Phase2Config:
    """Adaptive emergence: only routed experts compute; min_k = f(PI, act_k)."""

    routing: str = "dynamic"
    """"dynamic" (per token the fewest experts reaching `top_p` of the router's mass, between
    k_min and k_max), "budget" (shared + routed units ≤ `active_fraction` of the teacher's FFN units
    per token, the budget the quality table compares) or "topk" (`top_k_fraction` of E)."""
    top_p: float = 0.5
    k_min_fraction: float = 0.05
    k_max_fraction: float = 0.25
    top_k_fraction: float = 0.1
    active_fraction: float = 0.5
    router_distill_weight: float = 0.0
    """Keep distilling the routers on the expert mass in phase 2 (costs every unit's h)."""

    def __post_init__(self):
        _check(self.routing in PHASE2_ROUTING,
               f"Phase2Config.routing must be one of {PHASE2_ROUTING}, got {self.routing!r}")
        for name in ("top_p", "k_min_fraction", "k_max_fraction", "top_k_fraction", "active_fraction"):
            _fraction("Phase2Config", name, getattr(self, name))
        _check(self.k_min_fraction <= self.k_max_fraction, "Phase2Config: k_min_fraction must be ≤ k_max_fraction")
        _check(self.router_distill_weight >= 0, "Phase2Config.router_distill_weight must be ≥ 0")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (written into its summary and checkpoints)."""

    rule: str = "smk"
    """Expert update rule in both phases: "smk", "samk", "selective" or "full" (the only one for a
    dense model)."""
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512, batch_size=8))
    """Tokenisation; `batch_size` samples per micro-batch in the original layout (`micro_batch_tokens`
    None), and with `step_tokens` None `batch_size · grad_accum` samples per step."""
    data_source: str = "builtin"
    """For `train_run`: the probe set ("builtin", a JSONL file or a directory of splits)."""
    max_examples: int | None = None
    """For `train_run`: use this many training examples, spread evenly over the set (None: all)."""
    validation_per_category: int | None = 50
    """For `train_run`: held-out examples per category of the validation split (the first n of
    each, sorted by category; None: all, 0: no validation)."""
    step_tokens: int | None = None
    """Size of an optimiser step in tokens (None: `data.batch_size · grad_accum` samples a step).
    Packed (`packing`): each step is ceil(step_tokens / micro_batch_tokens) full micro-batches, filled
    from the data stream until the next sample fits no row (~98% sample tokens on the builtin set).
    Padded: samples until their attended tokens reach step_tokens."""
    micro_batch_tokens: int | None = 16384
    """Positions (rows × length, padding included) of one forward/backward; the step's samples are
    grouped by length into micro-batches within it. None: micro-batches of `data.batch_size` samples
    in stream order, one a row (the original layout)."""
    packing: bool = True
    """With `micro_batch_tokens`: pack several samples into each row of `pack_length` tokens (position
    ids restart per sample; Hugging Face's packed-sequence attention keeps samples apart), else one
    sample a row padded to the longest of its micro-batch."""
    pack_length: int | None = None
    """Row length of packed micro-batches (None: `data.max_length` rounded up to `pad_to_multiple`)."""
    pad_to_multiple: int = 64
    """Pad each padded micro-batch's length to a multiple of this (1: no padding): few distinct shapes,
    so cuDNN attention plans, cuBLAS heuristics and compiled graphs are reused (a new shape cost
    ~15 ms of host time per attention call on an H200)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (the original layout, `micro_batch_tokens=None`); with
    `step_tokens` None it also sets the step size: `data.batch_size · grad_accum` samples."""
    max_steps: int | None = None
    max_tokens: int | None = 2_000_000
    """Token budget (attended tokens, prompt and response); the data repeats in new epochs if
    needed. With both limits the run stops at the first one reached; with neither, one epoch."""
    seed: int = 0
    """Data order (one permutation per epoch) and the RNGs."""
    lr: float = 1e-4
    router_lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr · min_lr_ratio."""
    weight_decay: float = 0.01
    """Decoupled weight decay of matrices (parameters with ≥ 2 dimensions)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm (after the rule's masking); 0 turns clipping off."""
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_tokens: str = "response"
    """Positions the KL to the teacher covers: "response" (the positions the CE scores) or "all"
    (every attended position with an attended next token: prompt and response)."""
    balance_weight: float = 0.01
    """Switch-style load balance E·Σ_e f_e·P_e per layer (mean over layers)."""
    z_loss_weight: float = 0.0
    """Router z-loss (squared log-partition of the main and sub routers' logits)."""
    pi_alpha: float = 1.0
    pi_gamma: float = 0.5
    pi_modulated_lr: bool = False
    """Multiply the scheduled learning rate by the step's PI."""
    train_routers: bool = True
    train_shared: bool = True
    train_attention: bool = False
    """Attention projections and everything else in the decoder that is not a norm, MLP or embedding."""
    train_norms: bool = False
    train_embeddings: bool = False
    """Input embeddings and the LM head."""
    param_dtype: str = "float32"
    """Dtype of the trained weights and the optimiser state (the model is saved in its own dtype)."""
    device: str | None = None
    """None: CUDA when available, else the CPU."""
    compile: bool = False
    """`torch.compile` the student (with `compile_backend`) and the teacher (Inductor), on any device.
    Packed micro-batches then have one fixed shape (padding rows fill a step's last micro-batch), so
    each model compiles once per routing mode: the student twice (phase 1, phase 2), the teacher once.
    Off by default: the only GPU measurement so far (the `tinyonn` backend, before packing) ran 3.4×
    slower than eager plus 25–40 s per compile; see bench/train_profile.py for how to compare."""
    compile_backend: str = "inductor"
    """Backend for the student: "inductor" (the dense masked expert computation fused by Inductor: no
    host syncs, every unit computed) or "tinyonn" (the ragged Triton expert kernels; two host syncs per
    layer per call, and phase 1's every-expert routing dispatches N·E slots)."""
    autocast: bool = True
    """On CUDA: bf16 autocast for the student's and teacher's forwards."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    eval_every: int = 0
    """Steps between held-out evaluations logged as `val_loss` (0: only before and after)."""
    progress: bool = True
    """A tqdm bar with the loss and tok/s."""
    log_every: int = 1
    """Steps between reads of the logged metrics from the device (the only host sync of a step; every
    step still gets its log line). Runs with `on_step`, and phase 1 under switch="converged", read
    every step."""

    def __post_init__(self):
        _check(self.rule in RULES, f"TrainConfig.rule must be one of {RULES}, got {self.rule!r}")
        _check(self.kd_tokens in KD_TOKENS, f"TrainConfig.kd_tokens must be one of {KD_TOKENS}, got {self.kd_tokens!r}")
        _check(self.grad_accum >= 1 and self.pad_to_multiple >= 1 and self.log_every >= 1,
               f"TrainConfig: grad_accum, pad_to_multiple and log_every must be ≥ 1, got {self.grad_accum}, "
               f"{self.pad_to_multiple}, {self.log_every}")
        _check(self.pack_length is None or not self.packing or self.pack_length >= self.data.max_length,
               f"TrainConfig.pack_length ({self.pack_length}) must hold the longest sample, "
               f"data.max_length ({self.data.max_length})")
        _check(self.compile_backend in COMPILE_BACKENDS,
               f"TrainConfig.compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}")
        for name in ("max_steps", "max_tokens", "max_examples", "step_tokens", "micro_batch_tokens", "pack_length"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"TrainConfig.{name} must be ≥ 1 or None, got {value}")
        _check(self.validation_per_category is None or self.validation_per_category >= 0,
               "TrainConfig.validation_per_category must be ≥ 0 or None")
        _check(self.lr > 0 and self.router_lr > 0, "TrainConfig: lr and router_lr must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "TrainConfig.betas must be two values in [0, 1)")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "ce_weight", "kd_weight", "balance_weight",
                     "z_loss_weight", "pi_alpha", "checkpoint_every", "eval_every"):
            _check(getattr(self, name) >= 0, f"TrainConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        _check(self.eps > 0 and self.kd_temperature > 0, "TrainConfig: eps and kd_temperature must be > 0")
        _check(0 <= self.pi_gamma <= 1, f"TrainConfig.pi_gamma must be in [0, 1], got {self.pi_gamma}")
        _check(self.keep_checkpoints >= 1, "TrainConfig.keep_checkpoints must be ≥ 1")
        _check(self.param_dtype in ("float32", "bfloat16", "float16"),
               f"TrainConfig.param_dtype must be float32, bfloat16 or float16, got {self.param_dtype!r}")
        _check(self.ce_weight + self.kd_weight > 0, "TrainConfig: ce_weight + kd_weight must be > 0")
        _check(math.isfinite(self.lr), "TrainConfig.lr must be finite")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`from_dict` gives the config back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config from `to_dict`'s output (nested dicts become the phase and data configs)."""
        values = dict(values)
        nested = {"phase1": Phase1Config, "phase2": Phase2Config, "data": DataConfig}
        for name, kind in nested.items():
            if isinstance(values.get(name), dict):
                values[name] = kind(**values[name])
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

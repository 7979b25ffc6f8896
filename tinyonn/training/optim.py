"""AdamW with per-row masks and step counts, and the warm-up + cosine learning-rate schedule.

`MaskedAdamW.step(row_masks)` updates, for a parameter given a row mask, only its kept rows (first
dimension: a unit of a MoE layer's `w_gate`/`w_up`/`w_down`): the other rows' weights, moments and
step counts are not touched at all (no momentum decay, no weight decay, no step), so an expert the
update rule skips resumes later exactly where it stopped. Every parameter keeps a step count per
row, so bias correction is per row. Without a mask the update is torch's AdamW (decoupled weight
decay, then the moments, then `p -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)`). A masked update is
the same arithmetic with per-row coefficients (no row selection, so no host sync): a row not kept
is multiplied by 1 and moved by 0 (values unchanged; at most the sign of a zero can flip).

`step(row_masks, finite=flag)` takes a 0-dim bool tensor on the device: where it is False (the
step's loss or gradient was NaN/inf) no parameter, moment or step count changes, whatever the
gradients hold; where it is True the update is bitwise the one without the flag. The flag is read
on the device (`torch.where`), so skipping costs no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


@torch.no_grad()
def _adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: torch.Tensor, keep: torch.Tensor | None, lr: float | torch.Tensor, beta1: float,
                  beta2: float, eps: float, weight_decay: float, finite: torch.Tensor | None = None) -> None:
    """One AdamW update in place on `param`, `exp_avg`, `exp_avg_sq` and the per-row step counts
    `step` [rows], of the rows where `keep` [rows] is True (None: every row). Rows not kept are not
    touched: their coefficients are 1 (decay, moment decay) and 0 (update), their gradient is read as
    0, so their weights and moments come out with the same values, and their step counts do not move.
    `finite` (0-dim bool, None: True): False leaves everything as it was, even with NaN gradients or
    learning rate. Nothing here reads a tensor back to the host; `lr` may be a tensor."""
    shape = (-1,) + (1,) * (param.dim() - 1) if param.dim() else ()
    if finite is not None:
        finite = finite.to(param.device, torch.bool)
        grad = grad.masked_fill(~finite, 0)
        if isinstance(lr, torch.Tensor):
            lr = torch.where(finite, lr, torch.zeros_like(lr))
        if keep is not None:
            keep = keep.to(param.device, torch.bool) & finite
    if keep is None:
        step += 1 if finite is None else finite
        steps = step if finite is None else step.clamp_min(1)
    else:
        keep = keep.to(param.device, torch.bool)
        step += keep
        steps = step.clamp_min(1)  # rows never updated: any finite bias correction (their update is × 0)
        grad = grad.masked_fill(~keep.reshape(shape), 0)
    steps = steps.to(torch.float64)
    step_size = (lr / (1 - beta1 ** steps)).to(param.dtype)
    bias_correction2_sqrt = (1 - beta2 ** steps).sqrt().to(param.dtype).reshape(shape)
    if keep is None and finite is not None:  # the unmasked update, computed aside and kept only if finite
        def commit(target: torch.Tensor, value: torch.Tensor) -> None:
            target.copy_(torch.where(finite, value, target))

        if weight_decay:
            commit(param, param * (1 - lr * weight_decay))
        commit(exp_avg, exp_avg.lerp(grad, 1 - beta1))
        commit(exp_avg_sq, (exp_avg_sq * beta2).addcmul_(grad, grad, value=1 - beta2))
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        commit(param, param - step_size.reshape(shape) * exp_avg / denom)
        return
    if keep is None:
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        kept = keep.to(param.dtype)
        if weight_decay:
            param.mul_((1 - kept * (lr * weight_decay)).reshape(shape))
        exp_avg.mul_((1 - kept * (1 - beta1)).reshape(shape)).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_((1 - kept * (1 - beta2)).reshape(shape)).addcmul_(grad, grad, value=1 - beta2)
        step_size = step_size * kept
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.sub_(step_size.reshape(shape) * exp_avg / denom)


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW whose `step` can skip rows of chosen parameters entirely (see the module docstring).

    Param groups may carry `lr_scale` (the group's lr is `lr · lr_scale` after `set_learning_rate`).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lr_scale=1.0))

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            rows = param.shape[0] if param.dim() else 1
            state["step"] = torch.zeros(rows, dtype=torch.int64, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, row_masks: Mapping[torch.Tensor, torch.Tensor] | None = None,  # type: ignore[override]
             finite: torch.Tensor | None = None) -> None:
        """Update every parameter that has a gradient; a parameter in `row_masks` ([rows] bool,
        True = update) changes only in its kept rows; `finite` False (0-dim bool) skips the whole step.
        No host syncs (a group's lr may be a tensor)."""
        row_masks = row_masks or {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            settings = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], finite=finite)
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                _adamw_update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                              row_masks.get(param), **settings)

    def state_tensors(self, names: Mapping[torch.Tensor, str]) -> dict[str, torch.Tensor]:
        """The optimiser state as `{"<param name>/<key>": tensor}` (for a safetensors file)."""
        out = {}
        for group in self.param_groups:
            for param in group["params"]:
                for key, value in self.state.get(param, {}).items():
                    out[f"{names[param]}/{key}"] = value
        return out

    def load_state_tensors(self, names: Mapping[torch.Tensor, str], tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` gave (parameters absent from `tensors` keep no state)."""
        self.state.clear()
        for group in self.param_groups:
            for param in group["params"]:
                keys = [f"{names[param]}/{key}" for key in STATE_KEYS]
                if all(key in tensors for key in keys):
                    self.state[param] = {key: tensors[name].to(param.device).clone()
                                         for key, name in zip(STATE_KEYS, keys)}


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's lr to `lr · lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scheduled_lr(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of step `step` (0-based) of `total_steps`: linear warm-up to `lr` over
    `warmup_steps`, then a cosine down to `lr · min_lr_ratio` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

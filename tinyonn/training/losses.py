"""The training losses: response cross-entropy, KL to the teacher, load balance, router losses.

Token sums (CE, KL) are returned as sums so that micro-batches of one optimiser step can be divided
by the step's token count; the router losses are means over a micro-batch's attended tokens.
Positions index the logits: position t predicts token t+1.

The `*_at` variants take the positions as flat indices computed on the host
(`tinyonn.training.batches.collate_micro_batch`) and the `weights` arguments a 0/1 weight per token
instead of a boolean selection, so the loop needs no data-dependent shapes (no host syncs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyonn.data import IGNORE_INDEX
from tinyonn.model.routing import group_logsumexp, router_logits


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the logits positions whose next token is a response label (what the CE scores)."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored


def attended_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: attended positions whose next token is attended too (prompt and response)."""
    attended = attention_mask.bool()
    positions = torch.zeros_like(attended)
    positions[:, :-1] = attended[:, :-1] & attended[:, 1:]
    return positions


def kd_positions(labels: torch.Tensor, attention_mask: torch.Tensor, which: str) -> torch.Tensor:
    """[B, T] bool positions the KL to the teacher covers: "response" or "all" (see `TrainConfig.kd_tokens`)."""
    if which == "response":
        return response_positions(labels)
    if which == "all":
        return attended_positions(attention_mask)
    raise ValueError(f"kd tokens must be 'response' or 'all', got {which!r}")


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (float32) over the response positions, and those positions' logits
    rows [n, V] (for the entropy τ). `logits` [B, T, V], `labels` [B, T] (−100 outside responses)."""
    rows, cols = response_positions(labels).nonzero(as_tuple=True)
    scored = logits[rows, cols]
    nll = F.cross_entropy(scored.float(), labels[rows, cols + 1], reduction="sum")
    return nll, scored


def cross_entropy_sum_at(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy_sum` with the scored positions given: flat indices [n] into the [B·T] positions
    of `logits` [B, T, V] and their targets [n]."""
    scored = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
    return F.cross_entropy(scored.float(), targets, reduction="sum"), scored


def kl_to_teacher_sum_at(student_logits: torch.Tensor, teacher_logits: torch.Tensor, index: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """`kl_to_teacher_sum` over the flat positions `index` [n]."""
    vocab = student_logits.shape[-1]
    student = (student_logits.reshape(-1, vocab).index_select(0, index).float() / temperature).log_softmax(-1)
    teacher = (teacher_logits.detach().reshape(-1, vocab).index_select(0, index).float() / temperature).log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature ** 2


def kl_to_teacher_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, positions: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T² · Σ over `positions` of KL(teacher ‖ student) of the temperature-softened distributions
    (float32; the teacher's side carries no gradient)."""
    rows, cols = positions.nonzero(as_tuple=True)
    student = (student_logits[rows, cols].float() / temperature).log_softmax(-1)
    teacher = (teacher_logits[rows, cols].detach().float() / temperature).log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature ** 2


def switch_balance_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch-style load balance E · Σ_e f_e · P_e over N tokens: f_e the share of the token–expert
    selections that went to e, P_e the mean router probability of e. 1 when both are uniform.
    `scores` [N, E] log-probs, `mask` [N, E] 0/1."""
    num_experts = scores.shape[-1]
    share = mask.float().sum(0) / mask.float().sum().clamp_min(1)
    mean_prob = scores.float().exp().mean(0)
    return num_experts * (share.detach() * mean_prob).sum()


def router_distillation_loss(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the router's [N, E] log-prob scores against the normalised per-token expert
    activation mass [N, E] (the target of `tinyonn.evaluation.extract`'s router warm-up)."""
    target = mass / mass.sum(1, keepdim=True).clamp_min(1e-20)
    return -(target * scores.float()).sum(1).mean()


def router_z_loss(router: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor | None = None,
                  count: float | None = None) -> torch.Tensor:
    """Mean over tokens x [N, d] of logsumexp(main logits)² plus the mean over populated groups of
    logsumexp(sub logits within the group)²: keeps the routers' logits small. With `weights` [N]
    (0/1) and `count` (their sum): the mean over the weighted tokens only."""
    group_logits, expert_logits = router_logits(dict(router.named_parameters()), x)
    expert_group = router.expert_group
    num_groups = group_logits.shape[-1]
    populated = torch.zeros(num_groups, dtype=torch.bool, device=expert_group.device).index_fill(0, expert_group, True)
    main = torch.logsumexp(group_logits.float(), dim=-1).square()
    within = group_logsumexp(expert_logits.float(), expert_group, num_groups).masked_fill(~populated, 0)
    within = within.square().sum(1) / populated.sum()
    per_token = main + within
    if weights is None:
        return per_token.mean()
    return (per_token * weights).sum() / count


def distillation_per_token(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """[N] cross-entropy of each token's router scores [N, E] against its normalised expert mass
    (`router_distillation_loss` before the mean)."""
    target = mass / mass.sum(1, keepdim=True).clamp_min(1e-20)
    return -(target * scores.float()).sum(1)


def stacked_balance_loss(scores: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, count: float,
                         num_experts: torch.Tensor) -> torch.Tensor:
    """`switch_balance_loss` of every layer at once over the weighted tokens: scores [L, N, E_max]
    log-probs (−inf in padding columns), mask [L, N, E_max] 0/1, weights [N] 0/1 summing to `count`,
    num_experts [L] (each layer's own E) → [L]."""
    selections = mask.float() * weights.unsqueeze(-1)
    share = selections.sum(1) / selections.sum((1, 2)).clamp_min(1).unsqueeze(1)
    mean_prob = (scores.float().exp() * weights.unsqueeze(-1)).sum(1) / count
    return num_experts.to(mean_prob.dtype) * (share.detach() * mean_prob).sum(-1)

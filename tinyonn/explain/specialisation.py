"""Expert specialisation as OLMoE (Muennighoff et al., 2024, §5) measures it, from a `RoutingRecord`.

- Domain share: of the tokens of category c, the fraction routed to expert e, beside the rate
  k/E a uniform router would give (k the mean experts a token selects in that layer).
- Token-id specialisation: for a token id v, the fraction of its occurrences routed to e; per
  expert, averaged over the token ids it receives most often (seen ≥ `min_count` times).
- Co-activation: P(expert j selected | expert i selected), beside (k−1)/(E−1) for a uniform router.
"""

from __future__ import annotations

import numpy as np

from tinyonn.explain.routing import RoutingRecord


def per_category_mean(record: RoutingRecord, values: np.ndarray) -> np.ndarray:
    """[C, E] mean of per-token `values` [N, E] over each category's tokens (0 where a category has none)."""
    table = np.zeros((len(record.categories), values.shape[1]))
    for c in range(len(record.categories)):
        rows = record.category == c
        if rows.any():
            table[c] = values[rows].astype(np.float64).mean(axis=0)
    return table


def domain_share(record: RoutingRecord, layer: int) -> np.ndarray:
    """[C, E] fraction of each category's tokens routed to each expert."""
    return per_category_mean(record, record.masks[layer])


def mean_activation(record: RoutingRecord, layer: int) -> np.ndarray:
    """[C, E] mean over each category's tokens of each expert's mean |h|."""
    return per_category_mean(record, record.activation[layer])


def uniform_rate(record: RoutingRecord, layer: int) -> float:
    """k/E: the share of tokens each expert would get from a uniform router selecting as many."""
    mask = record.masks[layer]
    return float(mask.sum(axis=1).mean() / mask.shape[1]) if mask.size else 0.0


def token_share(record: RoutingRecord, layer: int, min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids seen ≥ min_count times [V], their counts [V], fraction of their occurrences routed
    to each expert [V, E])."""
    ids, inverse, counts = np.unique(record.token_ids, return_inverse=True, return_counts=True)
    mask = record.masks[layer].astype(np.float64)
    routed = np.zeros((len(ids), mask.shape[1]))
    np.add.at(routed, inverse, mask)
    keep = counts >= min_count
    return ids[keep], counts[keep], routed[keep] / counts[keep, None]


def token_specialisation(record: RoutingRecord, layer: int, min_count: int, top: int) -> np.ndarray:
    """[E] per expert: the mean fraction of the occurrences of its `top` most-received token ids
    (seen ≥ min_count times) that were routed to it (NaN for an expert that receives none)."""
    ids, counts, share = token_share(record, layer, min_count)
    out = np.full(share.shape[1], np.nan)
    for e in range(share.shape[1]):
        received = share[:, e] * counts
        order = np.argsort(-received, kind="stable")[:top]
        order = order[received[order] > 0]
        if len(order):
            out[e] = share[order, e].mean()
    return out


def coactivation(record: RoutingRecord, layer: int) -> np.ndarray:
    """[E, E] P(j selected | i selected) (row i; 0 for a never-selected i; diagonal 1 where defined)."""
    mask = record.masks[layer].astype(np.float64)
    both = mask.T @ mask
    chosen = np.diag(both)
    return np.divide(both, chosen[:, None], out=np.zeros_like(both), where=chosen[:, None] > 0)


def layer_summary(record: RoutingRecord, layer: int, min_count: int, top: int) -> dict:
    """One MoE layer's specialisation numbers beside what a uniform router would give."""
    mask = record.masks[layer]
    experts = mask.shape[1]
    k = float(mask.sum(axis=1).mean()) if mask.size else 0.0
    uniform = k / experts if experts else 0.0
    share = domain_share(record, layer)
    tokens = token_specialisation(record, layer, min_count, top)
    co = coactivation(record, layer)
    off = co.copy()
    np.fill_diagonal(off, -np.inf)
    selected = mask.any(axis=0)
    peak_co = off.max(axis=1)[selected] if experts > 1 else np.zeros(0)
    return {
        "experts": int(experts), "mean_selected": k, "uniform_rate": uniform,
        "domain_share_max": float(share.max()) if share.size else 0.0,
        "domain_peak_share": float(share.max(axis=0).mean()) if share.size else 0.0,
        "domain_peak_ratio": float((share.max(axis=0) / uniform).mean()) if uniform else 0.0,
        "experts_2x_uniform": int((share.max(axis=0) >= 2 * uniform).sum()) if uniform else 0,
        "token_specialisation": float(np.nanmean(tokens)) if np.isfinite(tokens).any() else 0.0,
        "coactivation_peak": float(peak_co.mean()) if len(peak_co) else 0.0,
        "coactivation_uniform": (k - 1) / (experts - 1) if experts > 1 else 0.0,
        "never_selected": int((~selected).sum()),
    }

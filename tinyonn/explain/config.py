"""`ExplainConfig`: how much of the held-out set `tinyonn.explain` reads and how it draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PROJECTIONS = ("auto", "tsne", "umap")


@dataclass(frozen=True)
class ExplainConfig:
    """What `tinyonn.explain` measures: a small held-out set (the default runs in seconds on a CPU)."""

    per_category: int = 12
    """Held-out examples read per category (0: all the examples given)."""
    max_length: int = 256
    batch_size: int = 8
    max_units: int = 2000
    """Units in the 2-D projection (a fixed-seed sample of them when the plan holds more)."""
    tsne_iterations: int = 500
    """t-SNE optimisation steps (scikit-learn's `max_iter`; its minimum is 250)."""
    max_samples: int = 1024
    """Probe samples whose per-sample activations are a unit's features in the projection."""
    projection: Literal["auto", "tsne", "umap"] = "auto"
    """"auto": UMAP when `umap-learn` is installed, else t-SNE (scikit-learn)."""
    seed: int = 0
    top_tokens: int = 6
    """Tokens listed per expert."""
    min_token_count: int = 3
    """Tokens seen fewer times in the held-out set are left out of top tokens and token specialisation."""
    labels: str | None = None
    """A JSON file of hand-written expert labels ({"L3·E5": "arithmetic digits"}, or "3:5" keys);
    None: the run folder's `labels.json` when there is one."""

    def __post_init__(self):
        for name in ("max_length", "batch_size", "max_units", "max_samples", "top_tokens", "min_token_count",
                     "tsne_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ExplainConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.per_category, int) or self.per_category < 0:
            raise ValueError(f"ExplainConfig.per_category must be ≥ 0, got {self.per_category!r}")
        if self.tsne_iterations < 250:
            raise ValueError(f"ExplainConfig.tsne_iterations must be ≥ 250, got {self.tsne_iterations}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"ExplainConfig.projection must be one of {', '.join(PROJECTIONS)}, "
                             f"got {self.projection!r}")

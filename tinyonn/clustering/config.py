"""`ClusterConfig`: how units become cells and experts; `METHODS`: the cluster methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from tinyonn.store.scores import ScoreConfig

Method = Literal["pidiff-hdbscan", "random", "coact-kmeans", "cmoe"]
METHODS: tuple[Method, ...] = get_args(Method)
"""Every cluster method, `ClusterConfig`'s default first (the CLI's choices, the partitions `evaluate_partitions`
compares in this order; `tinyonn run` defaults to the measured best, `pipeline.default_cluster_config`)."""


@dataclass(frozen=True)
class ClusterConfig:
    """How units become cells and experts (shared by all methods unless marked)."""

    method: Method = "pidiff-hdbscan"
    seed: int = 0
    # -- budget: the same for every method
    keep_fraction: float = 1.0
    """Fraction of each layer's units kept (shared + routed), rounded to a multiple of `block`;
    the lowest-score units are pruned first."""
    score: ScoreConfig | None = None
    """Score that ranks units; None uses the store's `summary/score` (PIDiff defaults if absent)."""
    shared_freq: float = 0.99
    """Units with activation frequency >= this form the shared expert: a per-layer quantile of
    `summary/freq` (shared_by="quantile") or an absolute frequency (shared_by="threshold")."""
    shared_by: Literal["quantile", "threshold"] = "quantile"
    shared_max_fraction: float = 0.0625
    """At most this fraction of a layer's units are shared (the most frequent first); 0 disables."""
    # -- experts
    min_size: int = 32
    max_size: int = 128
    block: int = 16
    """Expert sizes are rounded to multiples of this where possible (kernel tile)."""
    groups_per_layer: int = 4
    experts_per_layer: int | tuple[int, ...] | None = None
    """random / coact-kmeans / cmoe: experts per layer (one int, or one per layer); None: routed
    units / `expert_size`. Pass a pidiff-hdbscan plan's counts (`baseline_config`) for a fair comparison."""
    expert_size: int = 64
    """random / coact-kmeans / cmoe: target expert size when `experts_per_layer` is None."""
    # -- pidiff-hdbscan features
    w_score: float = 0.5
    """Weight of the score block: rank-normalised score, act, freq, grad (per layer)."""
    w_category: float = 1.0
    """Weight of the per-category block: by-category act, freq, grad ranked per category and layer,
    centred per unit (what the unit does more in one category than in the others)."""
    w_coact: float = 3.0
    """Weight of the co-activation block: the unit's standardised log activation profile over
    samples projected on the top `coact_dims` sample-space components."""
    w_output: float = 0.5
    """Weight of the output-contribution block: per-layer rank of the unit's mean |h| times
    ‖W_down[:, j]‖ (what the unit adds to the layer's output), overall and per category."""
    w_layer: float = 0.5
    """Weight of the layer position layer / (L - 1); small, so cells can span layers."""
    coact_dims: int = 16
    coact_max_samples: int = 4096
    """Co-activation uses at most this many samples (evenly strided) so its Gram matrix stays small."""
    pca_dims: int = 4
    """Weighted features are reduced to this many principal components before HDBSCAN (density
    clustering needs few dimensions: with more, nearly every unit of a real teacher is noise)."""
    min_cluster_size: int | None = None
    """HDBSCAN min_cluster_size; None: max(min_size, routed units / 400), so a cell can fill an expert."""
    min_samples: int = 1
    """HDBSCAN min_samples (larger: more conservative, more noise)."""
    cluster_selection_method: Literal["eom", "leaf"] = "leaf"
    """"leaf" gives many fine, homogeneous cells (what experts want); "eom" fewer, larger ones."""
    # -- coact-kmeans
    kmeans_iters: int = 10
    """Balanced k-means (coact-kmeans, cmoe): rounds of (recompute centroids, optimal balanced
    reassignment)."""
    # -- cmoe
    firing_top_k: float = 0.1
    """cmoe: K_a as a fraction of the layer's units: a unit fires on a token when it is among the
    token's top K_a units by |h| (per-token activations from a `Calibration`)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"ClusterConfig.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"ClusterConfig.keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        if self.shared_by not in ("quantile", "threshold"):
            raise ValueError(f"ClusterConfig.shared_by must be quantile or threshold, got {self.shared_by!r}")
        if not 0 <= self.shared_max_fraction < 1:
            raise ValueError(f"ClusterConfig.shared_max_fraction must be in [0, 1), got {self.shared_max_fraction!r}")
        if self.block < 1 or self.min_size < 1:
            raise ValueError("ClusterConfig.block and min_size must be >= 1")
        if self.min_size % self.block or self.max_size % self.block:
            raise ValueError(f"ClusterConfig.min_size ({self.min_size}) and max_size ({self.max_size}) must be "
                             f"multiples of block ({self.block})")
        if self.max_size < 2 * self.min_size:
            raise ValueError(f"ClusterConfig.max_size ({self.max_size}) must be >= 2 * min_size ({self.min_size}) "
                             "so that a split of a too-large expert never gives a too-small one")
        if self.groups_per_layer < 1 or self.expert_size < 1:
            raise ValueError("ClusterConfig.groups_per_layer and expert_size must be >= 1")
        if self.cluster_selection_method not in ("eom", "leaf"):
            raise ValueError(f"ClusterConfig.cluster_selection_method must be eom or leaf, "
                             f"got {self.cluster_selection_method!r}")
        if min(self.w_score, self.w_category, self.w_coact, self.w_output, self.w_layer) < 0:
            raise ValueError("ClusterConfig feature weights must be >= 0")
        if self.min_samples < 1 or (self.min_cluster_size is not None and self.min_cluster_size < 2):
            raise ValueError("ClusterConfig.min_samples must be >= 1 and min_cluster_size >= 2")
        if not 0 < self.firing_top_k <= 1:
            raise ValueError(f"ClusterConfig.firing_top_k must be in (0, 1], got {self.firing_top_k!r}")
        if self.coact_dims < 1 or self.pca_dims < 1 or self.coact_max_samples < 2:
            raise ValueError("ClusterConfig.coact_dims and pca_dims must be >= 1, coact_max_samples >= 2")

    def as_dict(self) -> dict:
        """The config as JSON-ready values (what `ExpertPlan.info["config"]` records)."""
        out = asdict(self)
        if isinstance(out.get("experts_per_layer"), tuple):
            out["experts_per_layer"] = list(out["experts_per_layer"])
        return out

    @classmethod
    def from_dict(cls, saved: dict) -> ClusterConfig:
        """The config `as_dict` recorded (keys this version does not know are ignored)."""
        values = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        if isinstance(values.get("experts_per_layer"), list):
            values["experts_per_layer"] = tuple(values["experts_per_layer"])
        if isinstance(values.get("score"), dict):
            score = {k: v for k, v in values["score"].items() if k in ScoreConfig.__dataclass_fields__}
            values["score"] = ScoreConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in score.items()})
        return cls(**values)

"""Concept cells and experts: a score store → an `ExpertPlan` (which teacher units each expert holds).

Modules, each importing only the ones listed before it:
config (ClusterConfig, METHODS) · plan (ExpertPlan, LayerPlan) · units (the store's units) ·
budget (shared / routed / pruned units per layer) · profiles (activation profiles) ·
features (unit features, co-activation, PCA) · experts (Expert, packing into a LayerPlan) ·
slices (cell slices → sized experts) · groups (Ward tree → router groups) ·
calibration (Calibration: per-token MLP inputs of the teacher) · kmeans (balanced k-means) ·
cells (pidiff-hdbscan) · baselines (random, coact-kmeans) · cmoe (CMoE-style) · plot (plot_cells) ·
cluster (the entry).
"""

from tinyonn.clustering.calibration import Calibration, CalibrationConfig
from tinyonn.clustering.cluster import baseline_config, cluster
from tinyonn.clustering.config import METHODS, ClusterConfig
from tinyonn.clustering.plan import ExpertPlan, LayerPlan

__all__ = ["METHODS", "Calibration", "CalibrationConfig", "ClusterConfig", "ExpertPlan", "LayerPlan",
           "baseline_config", "cluster"]

"""Concept cells and experts: a score store → an `ExpertPlan` (which teacher units each expert holds)."""

from tinyonn.clustering.cluster import ClusterConfig, cluster
from tinyonn.clustering.plan import ExpertPlan, LayerPlan

__all__ = ["ClusterConfig", "ExpertPlan", "LayerPlan", "cluster"]

"""Explain a run: what its saved model's experts do, and a report a person can read.

Modules, each importing only the ones listed before it:
config (ExplainConfig) · routing (RoutingRecord: the model's own routing on held-out tokens) ·
specialisation (OLMoE's domain share, token-id specialisation, co-activation) · labels (expert
labels, override file) · cells (units and cells of the plan, layer spans) · projection (t-SNE /
UMAP of units) · plots (PNGs) · explain (the entry → report/explain.json) · report (the offline
report/index.html).
"""

from tinyonn.explain.config import ExplainConfig
from tinyonn.explain.explain import explain
from tinyonn.explain.report import write_report

__all__ = ["ExplainConfig", "explain", "write_report"]

"""Probe a teacher: exact per-sample statistics of every FFN unit and attention head → a Zarr store.

- `run`: the probe stage, `probe(teacher, data, config, out)` (batches → statistics → store).
- `decoder`: a readable decoder forward that exposes each MLP's g, u, h for the statistics.
- `unit_stats`: per-sample activation, frequency and exact gradient norms (Gram or direct).
- `reference`: `torch.func.vmap(grad)` over the whole model, the exact reference tests compare with.
"""

from tinyonn.probe.run import probe

__all__ = ["probe"]

"""The TinyONN model: the teacher's architecture with each MLP replaced by a routed MoE layer.

- `routing`: `RoutingConfig`, the hierarchical router, expert selection (pure functions).
- `moe_layer`: `MoELayer` and its stateless forward `moe_forward`.
- `modeling`: `TinyONNConfig` and `TinyONNForCausalLM` (registered with the Auto classes).
- `assemble`: teacher + plan → a TinyONN model.
"""

from tinyonn.model.routing import RoutingConfig

__all__ = ["RoutingConfig"]

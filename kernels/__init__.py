"""Tiny-ONN's Triton kernels, installed as `tinyonn.kernels` (each beside a PyTorch reference).

- `ragged_swiglu` (reference: `reference`): grouped SwiGLU over experts of any size, fwd and bwd.
- `routing` (reference: `routing_reference`): fused hierarchical top-k, dispatch, gather, combine.
- `moe`: the `tinyonn::moe_experts` custom op composing them (Triton on CUDA, references elsewhere),
  which the `tinyonn` compile backend (`tinyonn.compile`) substitutes into compiled models.

Keep this file free of imports: from the repository root, Python can also find this folder as a
top-level `kernels` package (transformers and bitsandbytes probe for the hub's `kernels`), and an
empty package makes their probe fail quietly, as it should.
"""

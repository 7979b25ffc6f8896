"""Tiny-ONN's Triton kernels, installed as `tinyonn.kernels` (each beside a PyTorch reference).

Keep this file free of imports: from the repository root, Python can also find this folder as a
top-level `kernels` package (transformers and bitsandbytes probe for the hub's `kernels`), and an
empty package makes their probe fail quietly, as it should.
"""

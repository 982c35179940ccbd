"""Quantised weights: formats, GGUF conversions, kernels, and the Linear-like modules that use them."""

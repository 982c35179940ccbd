"""Quantised weights: formats and the Linear-like modules that use them (their
products run in gemma4.native)."""

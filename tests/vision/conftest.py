import pytest

from gemma4.native import ops


@pytest.fixture(autouse=True)
def float_products(monkeypatch):
    """Parity with the float32 reference is checked in the float32 mode; the matrix engine's bf16 products (the
    default where the CPU has one) are bounded against it in tests/native/test_matrix_engine.py."""
    monkeypatch.setenv("GEMMA4_ACTIVATIONS", "float")
    monkeypatch.setattr(ops, "_activations", "float")

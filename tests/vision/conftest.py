import pytest


@pytest.fixture(autouse=True)
def _float_products(float_products):
    """Every test here checks parity with the float32 reference (tests/conftest.py: float_products)."""

import pytest

from gemma4.native import ops


@pytest.fixture
def mode(monkeypatch):
    """Sets GEMMA4_MATRIX_ENGINE for the test; the choices made from it (which modules serve the matrix engine and
    its int8 and bf16 tiles) are made again after."""
    def set_mode(value: str) -> None:
        monkeypatch.setenv("GEMMA4_MATRIX_ENGINE", value)
        for name in ("_tiles", "_engine", "_bf16_tiles"):
            monkeypatch.setattr(ops, name, None)
    yield set_mode
    ops._tiles = ops._engine = ops._bf16_tiles = None

"""Where the tests find the repository's own files, wherever a test file sits under tests/."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BENCH = ROOT / "bench"
DATA = TESTS / "data"

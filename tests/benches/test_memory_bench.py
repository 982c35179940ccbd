"""bench/memory.py's measuring child on a tiny MoE GGUF: it loads under a budget, decodes, and reports the
memory figures and the expert hit rate the table is made of."""

import sys

import gemma4.native
import pytest

from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from paths import BENCH
from reference import build_gemma4, tiny_vocab_metadata

sys.path.insert(0, str(BENCH))
import memory  # noqa: E402

pytestmark = pytest.mark.skipif(gemma4.native.compiled() is None, reason="no native kernel on this machine")


def test_memory_child_reports_what_the_table_shows(tmp_path):
    build_gemma4(tmp_path / "hf", "blocks", seed=2)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "Q8_0", tiny_vocab_metadata())
    r = memory.child_ours(str(path), 9, 3, 1)
    for point in ("before_load", "after_load", "after_run"):
        assert r[point]["RssAnon"] > 0 and r[point]["RssFile"] > 0
    assert r["tok_s"] > 0 and r["experts"] == 3 * 4 and r["hot"] == 0  # a 1-byte budget: no expert pinned
    assert r["hit_rate"] == 0.0  # every routed expert was read on demand

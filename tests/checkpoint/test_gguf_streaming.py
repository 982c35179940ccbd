"""The GGUF writer streams a large tensor: each slab of rows is encoded and written before the next, so the
memory it takes is a slab's, not the tensor's (E2B's per-layer table is 4.7 GB in BF16)."""

import tracemalloc

import numpy as np
import torch

from gemma4.checkpoint import gguf_writer
from gemma4.checkpoint.gguf_file import GGUFFile
from gemma4.config import ModelConfig
from reference import gemma4_text_config

ROWS, WIDTH = 8192, 64  # 2^19 values: 557 KB of Q8_0


class OneTable:
    """A checkpoint reader holding only the embedding table (the writer needs no other tensor)."""

    def __init__(self, table: torch.Tensor):
        self.config = ModelConfig.from_hf(gemma4_text_config("dense_kv_off", vocab_size=ROWS, hidden_size=WIDTH)
                                          .to_dict())
        self.table = table

    def names(self):
        return ["embed_tokens.weight"]

    def shape(self, name):
        return tuple(self.table.shape)

    def tensor(self, name):
        return self.table


def test_a_table_is_written_a_slab_at_a_time(tmp_path, monkeypatch):
    table = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(gguf_writer, "SLAB_ELEMENTS", 1 << 12)  # 64 rows a slab: 128 slabs
    reader = OneTable(table)
    gguf_writer.write_gguf(reader, tmp_path / "warm.gguf", "Q8_0")  # the lazy imports, outside the measure
    tracemalloc.start()
    try:
        path = gguf_writer.write_gguf(reader, tmp_path / "t.gguf", "Q8_0")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = ROWS * WIDTH // 32 * 34  # the table's Q8_0 bytes
    # numpy's buffers are traced: a slab's encoding and its temporaries (a few times 16 KB of float32) stay far
    # below the whole table's bytes, which the old whole-tensor buffer held at once
    assert peak < whole / 4, (peak, whole)
    f = GGUFFile(path)
    assert np.array_equal(f.raw("token_embd.weight").reshape(-1),
                          gguf_writer._encode(table, f.tensors["token_embd.weight"].type).reshape(-1))

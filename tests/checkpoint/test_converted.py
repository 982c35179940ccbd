"""Weights in place: a GGUF's quantised tensors are converted once into a cache file and mapped from it.

Each load runs in a subprocess of its own, so its anonymous memory (RssAnon) is measured from a clean start:
mapped weights are file pages, an in-memory conversion would be anonymous ones as large as the weights.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import gemma4.native
from gemma4.store import embedded_path
from paths import ROOT

pytestmark = pytest.mark.skipif(gemma4.native.compiled() is None, reason="no native kernel on this machine")

PROBE = r"""
import json, sys, torch
from gemma4.checkpoint import converted, open_checkpoint
from gemma4.engine import prefill
from gemma4.model.load import build_decoder
from gemma4.native import compiled

def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))

compiled()
checkpoint = open_checkpoint(sys.argv[1])
before = anon()
decoder = build_decoder(checkpoint, torch.float32, torch.device("cpu"), progress=False)
added = anon() - before
ids = torch.tensor([[2, 105, 2364, 107, 9259, 1902, 236761]])
with torch.inference_mode():
    cache = decoder.new_cache(batch=1, capacity=16)
    logits = decoder.logits(prefill(decoder, cache, ids, torch.arange(ids.shape[1])[None]))
torch.save(logits, sys.argv[2])
print(json.dumps(dict(added=added, conversions=converted.conversions)))
"""


def _load(model, out, cache) -> dict:
    env = {**os.environ, "GEMMA4_CONVERTED": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(model), str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gguf_weights_are_mapped_not_copied(tmp_path):
    """The embedded model (Q8_0, Q5_0, Q4_K, Q6_K tensors): the first load writes the cache entry, the second
    maps it without converting and adds well under 10% of the file in anonymous memory (the decoder's own
    small tensors: norms, RoPE tables), and both give the logits of the in-memory conversion, bit for bit."""
    model = embedded_path()
    size = model.stat().st_size
    cache = tmp_path / "converted"

    first = _load(model, tmp_path / "first.pt", cache)
    assert first["conversions"] == 1
    (entry,) = cache.iterdir()
    weights = entry / "weights.bin"
    written = weights.stat().st_mtime_ns
    assert json.loads((entry / "index.json").read_text())["tensors"]  # the quantised matrices are there

    second = _load(model, tmp_path / "second.pt", cache)
    assert second["conversions"] == 0 and weights.stat().st_mtime_ns == written
    added = second["added"]
    assert added < 0.10 * size, f"{added / 2**20:.0f} MiB anonymous for a {size / 2**20:.0f} MiB file"

    in_memory = _load(model, tmp_path / "in_memory.pt", "off")
    assert in_memory["added"] > 0.5 * size  # the measure sees a copy where there is one
    reference = torch.load(tmp_path / "in_memory.pt")
    assert torch.equal(torch.load(tmp_path / "first.pt"), reference)
    assert torch.equal(torch.load(tmp_path / "second.pt"), reference)


def test_an_entry_belongs_to_one_version_of_the_file(tmp_path):
    """A file replaced in place (new mtime) is converted again into a new entry, never served the old file's
    weights; the old entry goes. The arrays come back as written, bf16 and a missing zero included."""
    from gemma4.checkpoint import converted
    from gemma4.quant.formats import QuantWeight

    g = torch.Generator().manual_seed(0)
    w = QuantWeight(8, 32, torch.randint(-128, 127, (3, 64), generator=g, dtype=torch.int8),
                    torch.randn(3, 2, generator=g).to(torch.float16), None, torch.randn(3, 4).to(torch.bfloat16))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    root = tmp_path / "cache"
    start = converted.conversions
    first = converted.open_or_convert(f, ["a", "b"], lambda name: w if name == "a" else None, root=root)
    assert "b" not in first and converted.conversions == start + 1
    got = first.get("a")
    assert got.bits == 8 and got.group == 32 and got.zero is None
    for x, y in zip((got.q, got.scale, got.sub), (w.q, w.scale, w.sub)):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert converted.open_or_convert(f, ["a"], None, root=root).folder == first.folder  # mapped, not converted
    os.utime(f, ns=(1, 1))
    second = converted.open_or_convert(f, ["a"], lambda name: w, root=root)
    assert second.folder != first.folder and converted.conversions == start + 2
    assert [p.name for p in root.iterdir()] == [second.folder.name]


FLOAT_PROBE = r"""
import sys, torch
from gemma4.checkpoint import open_checkpoint
from gemma4.model.load import build_decoder

def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))

checkpoint = open_checkpoint(sys.argv[1])
before = anon()
decoder = build_decoder(checkpoint, torch.float32, torch.device("cpu"), progress=False)
print(anon() - before)
"""


def test_float_safetensors_weights_stay_mapped(tmp_path):
    """A float32 HF checkpoint loaded as float32: the tensors are views of the safetensors file's map (a 15 MiB
    embedding), not copies."""
    from reference import build_gemma4

    build_gemma4(tmp_path / "hf", "blocks", seed=1, vocab_size=60000)
    size = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FLOAT_PROBE, str(tmp_path / "hf")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    added = int(done.stdout.split()[-1])
    assert size > 15 * 2**20 and added < 0.10 * size, f"{added / 2**20:.1f} MiB anonymous for {size / 2**20:.1f} MiB"

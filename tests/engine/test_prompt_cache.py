"""Prompt-cache files and `run --file`: a document's KV saved, reloaded by a fresh model, equals a
plain full forward; a file of another model is refused; the CLI reuses it end to end."""

import os

import pytest
import torch

import gemma4
from gemma4.engine.prompt_cache import PromptCache
from gemma4.kv import files as prompt_cache
from gemma4.engine import prefill
import commands
from reference import VOCAB, build_gemma4

def _ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off"])
def test_save_reload_in_a_fresh_model_equals_a_fresh_prefill_bit_for_bit(gemma4_models, tmp_path, name):
    path = gemma4_models[name][0]
    writer = gemma4.load(path)
    w = writer.config.sliding_window
    chunk = w + 1
    doc = _ids(5 * w + 2, 1)
    question = _ids(2 * w + 3, 5)
    pc = PromptCache(tmp_path / "doc.kv", prefix_len=len(doc))
    _, first = pc.prefill(writer.decoder, doc + question, capacity=4, chunk=chunk)
    keep = len(doc) // chunk * chunk  # the last grid point within the document
    assert pc.saved == keep and pc.reused == 0
    assert os.listdir(tmp_path) == ["doc.kv"]  # no temporary file left behind
    del writer

    reader = gemma4.load(path)  # a fresh model, as a later run has
    snap = prompt_cache.load(tmp_path / "doc.kv", reader.decoder)
    assert snap.tokens == doc[:keep]
    for q in (question, _ids(w, 9)):  # the same question, another one
        ids = doc + q
        pc = PromptCache(tmp_path / "doc.kv", prefix_len=len(doc))
        cache, hidden = pc.prefill(reader.decoder, ids, capacity=4, chunk=chunk)
        assert pc.reused == keep and pc.saved == 0
        fresh = prefill(reader.decoder, reader.decoder.new_cache(), torch.tensor([ids]), torch.arange(len(ids))[None],
                        chunk)
        assert torch.equal(hidden, fresh)  # the last position's state, whose logits choose the first token
    cache, hidden = pc.prefill(reader.decoder, doc[:keep], capacity=4, chunk=chunk)  # the file is the whole prompt
    assert pc.reused == 0 and pc.saved == 0  # and no shorter copy replaces it
    assert prompt_cache.load(tmp_path / "doc.kv", reader.decoder).tokens == doc[:keep]
    assert keep % (chunk + 1)  # another chunk size: the file's end is not one of its chunk ends
    pc = PromptCache(tmp_path / "doc.kv", prefix_len=len(doc))
    cache, hidden = pc.prefill(reader.decoder, doc + question, capacity=4, chunk=chunk + 1)
    assert pc.reused == 0


def test_a_file_of_another_model_or_not_a_cache_is_refused(gemma4_models, tmp_path):
    path = gemma4_models["moe_kv"][0]
    model = gemma4.load(path)
    doc = _ids(20, 2)
    cache = model.decoder.new_cache()
    prefill(model.decoder, cache, torch.tensor([doc]), torch.arange(20)[None])
    prompt_cache.save(tmp_path / "a.kv", cache.snapshot(0, doc), model.decoder)
    twin = tmp_path / "twin"  # the same shape, other weights
    build_gemma4(twin, "moe_kv", seed=11)
    with pytest.raises(ValueError, match="another model"):
        prompt_cache.load(tmp_path / "a.kv", gemma4.load(twin).decoder)
    with pytest.raises(ValueError, match="another model"):
        prompt_cache.load(tmp_path / "a.kv", gemma4.load(gemma4_models["dense_kv"][0]).decoder)
    with pytest.raises(ValueError, match="int8"):
        prompt_cache.load(tmp_path / "a.kv", model.decoder, kv_dtype="int8")
    (tmp_path / "junk.kv").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable prompt-cache file"):
        prompt_cache.load(tmp_path / "junk.kv", model.decoder)


def cli(*args, input=None):
    return commands.cli(*args, input=input, timeout=300)  # a document's prefill in a subprocess


def test_cli_file_and_prompt_cache_end_to_end(tiny_gguf, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(["the cat is a dog of the man and the"] * 60))  # > 512 tokens: windows of 8
    kv = tmp_path / "doc.kv"
    common = ["run", "-m", str(tiny_gguf), "--raw", "--temperature", "0", "-n", "6", "--file", str(doc)]
    plain = cli(*common, "is the")
    assert plain.returncode == 0, plain.stderr
    model = gemma4.load(tiny_gguf)
    expected = model.generate(doc.read_text() + "\n\nis the", max_tokens=6, temperature=0).text
    assert plain.stdout == "is the" + expected + "\n"  # the document is context, not echoed

    first = cli(*common, "--prompt-cache", str(kv), "is the")
    assert first.returncode == 0 and "saved" in first.stderr and kv.exists(), first.stderr
    second = cli(*common, "--prompt-cache", str(kv), "is the")
    assert second.returncode == 0 and "reused" in second.stderr and "saved" not in second.stderr
    assert first.stdout == second.stdout == plain.stdout
    other = cli(*common, "--prompt-cache", str(kv), "of a cat")  # another question on the same document
    expected = model.generate(doc.read_text() + "\n\nof a cat", max_tokens=6, temperature=0).text
    assert other.returncode == 0 and "reused" in other.stderr and other.stdout == "of a cat" + expected + "\n"

    stdin = cli(*common[:-1], "-", "--prompt-cache", str(kv), "is the", input=doc.read_text())
    assert stdin.returncode == 0 and stdin.stdout == plain.stdout


def test_cli_refuses_a_foreign_cache_and_a_too_long_document(tiny_gguf, tmp_path):
    junk = tmp_path / "junk.kv"
    junk.write_text("not a cache")
    doc = tmp_path / "doc.txt"
    doc.write_text("the cat is a dog")
    r = cli("run", "-m", str(tiny_gguf), "--raw", "-n", "2", "--file", str(doc), "--prompt-cache", str(junk), "x")
    assert r.returncode == 2 and r.stderr.startswith("error: prompt cache") and r.stderr.count("\n") == 1, r.stderr
    doc.write_text("the " * 5000)  # the tiny model's context is 4096 tokens
    r = cli("run", "-m", str(tiny_gguf), "--raw", "-n", "2", "--file", str(doc), "what")
    assert r.returncode == 2 and "exceeds the model's context of 4096 tokens" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    r = cli("run", "-m", str(tiny_gguf), "--file", str(tmp_path / "missing.txt"), "x")
    assert r.returncode == 2 and "--file" in r.stderr and r.stderr.count("\n") == 1

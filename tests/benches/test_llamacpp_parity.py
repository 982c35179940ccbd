"""The embedded model against llama.cpp on the same GGUF (`make parity`; needs llama-cpp-python).

What agreeing can mean is argued in bench/parity_llamacpp.py: llama.cpp rounds activations to 8 bits
in its quantized matmuls, so greedy runs may part where its top two logits are within NEAR_TIE."""

import sys
from pathlib import Path

import pytest
from paths import BENCH

pytestmark = pytest.mark.llamacpp
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("llama_cpp")
    import parity_llamacpp as p

    import gemma4
    from gemma4.store import embedded_path

    path = embedded_path()
    return p, gemma4.load(path), p._llama(path)


def test_greedy_runs(pair):
    p, model, llm = pair
    rows = p.compare_greedy(model, llm)
    assert len(rows) >= 5
    for r in rows:
        assert r["ids_equal"], r["prompt"]
        if not r["same_tokens"]:
            assert r["llama_margin"] < p.NEAR_TIE, r
    assert sum(r["same_tokens"] for r in rows) >= len(rows) // 2


def test_teacher_forced(pair):
    p, model, llm = pair
    tf = p.teacher_forced(model, llm, (Path(p.__file__).parent / "data" / "english.txt").read_text())
    assert tf["tokens"] >= 512
    # the exact dequantized model's agreement with llama.cpp measured on such text: ~95%, KL ~0.004
    assert tf["top1_agreement"] >= 0.93 and tf["mean_kl_top40"] <= 0.01

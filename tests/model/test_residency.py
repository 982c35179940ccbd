"""Experts beyond RAM: under max_memory a quarter of the experts stay resident and the rest are read from the
mapped file when routed to; the bytes multiplied are the same, so the logits must be the same bits."""

import pytest
import torch

import gemma4
import gemma4.native
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.engine import prefill
from gemma4.model import residency
from commands import cli
from reference import build_gemma4, tiny_vocab_metadata

pytestmark = pytest.mark.skipif(gemma4.native.compiled() is None, reason="no native kernel on this machine")

EXPERTS = 8


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    """A tiny Gemma 4 MoE (8 experts, top 2) in Q8_0 blocks: its experts mapped from the converted cache."""
    d = tmp_path_factory.mktemp("moe")
    build_gemma4(d / "hf", "blocks", seed=7, num_experts=EXPERTS)
    return write_gguf(open_checkpoint(d / "hf"), d / "m.gguf", "Q8_0", tiny_vocab_metadata())


def _logits(decoder, steps: int) -> list[torch.Tensor]:
    """A prompt, then `steps` greedy decode steps (past a rebalance of the hot set): each call's logits."""
    ids = torch.randint(3, 250, (1, 11), generator=torch.Generator().manual_seed(3))
    t = ids.shape[1]
    out = []
    with torch.inference_mode():
        cache = decoder.new_cache(batch=1, capacity=t + steps + 4)
        out.append(decoder.logits(prefill(decoder, cache, ids, torch.arange(t)[None]))[:, -1])
        for i in range(steps):
            h = decoder(out[-1].argmax(-1).view(1, 1), torch.tensor([[t + i]]), cache)
            out.append(decoder.logits(h[:, -1]))
    return out


def test_a_quarter_of_the_experts_resident_gives_the_same_logits(moe_gguf):
    resident = _logits(gemma4.load(moe_gguf, progress=False).decoder, steps=residency.REBALANCE_EVERY + 4)

    probe = gemma4.load(moe_gguf, progress=False, max_memory=1).decoder.residency.stats  # the sizes
    total = probe.total_experts
    budget = probe.dense_bytes + total // 4 * probe.expert_bytes
    decoder = gemma4.load(moe_gguf, progress=False, max_memory=budget).decoder
    stats = decoder.residency.stats
    assert stats.hot_slots == total // 4 and stats.locked
    streamed = _logits(decoder, steps=residency.REBALANCE_EVERY + 4)

    assert int(decoder.residency.hot.sum()) == total // 4
    assert 0 < stats.hits < stats.uses  # some routed experts were hot, others read on demand
    for a, b in zip(streamed, resident):
        assert torch.equal(a, b), (a - b).abs().max()


def test_the_hot_set_follows_the_routing_counts(moe_gguf):
    decoder = gemma4.load(moe_gguf, progress=False, max_memory=1).decoder
    r = decoder.residency
    r.stats.hot_slots = 3
    r.counts.zero_()
    r.counts[0, 5], r.counts[1, 2], r.counts[2, 7], r.counts[1, 1] = 9, 8, 7, 1
    r.rebalance()
    assert sorted(map(tuple, r.hot.nonzero().tolist())) == [(0, 5), (1, 2), (2, 7)]


def test_max_memory_on_the_command_line(moe_gguf):
    done = cli("run", "-m", str(moe_gguf), "--raw", "-n", "6", "--temperature", "0", "--max-memory", "64KiB",
               "--verbose", "hello")
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stderr and "hit rate" in done.stderr


@pytest.mark.parametrize("size, message", [("lots", "--max-memory: not a size"),
                                           ("0", "--max-memory: must be positive")])
def test_a_bad_max_memory_is_one_line(moe_gguf, size, message):
    done = cli("run", "-m", str(moe_gguf), "--raw", "-n", "2", "--max-memory", size, "hello")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_max_memory_needs_experts(tmp_path):
    build_gemma4(tmp_path / "hf", "dense_kv_off", seed=1)
    with pytest.raises(ValueError, match="max_memory: this model has no routed experts"):
        gemma4.load(tmp_path / "hf", progress=False, max_memory="1GiB")

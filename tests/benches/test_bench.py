"""`make bench` in smoke mode: preparation and the runner on a tiny model in the 26B-A4B pattern, peers
skipped, one repetition. Proves the bench still runs and that what it prepares is a valid Gemma 4; no
timing is asserted (speed is shown in bench/RESULTS.md, never tested)."""

import json
import sys

import pytest
import torch

import gemma4
from paths import BENCH

sys.path.insert(0, str(BENCH))

import measure  # noqa: E402
import prepare  # noqa: E402
import run  # noqa: E402

LAYERS = 2  # one sliding and one full (K=V) layer: both kinds of attention in the files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench-cache")
    return prepare.shape_model(LAYERS, formats=("Q8_0",), tiny=True, cache=cache), cache


def test_prepared_folder_is_what_transformers_expects(tiny, float_products):
    from transformers import Gemma4ForCausalLM

    model, _ = tiny
    ref, info = Gemma4ForCausalLM.from_pretrained(model.hf, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert ref.config.layer_types == ["sliding_attention", "full_attention"]
    ours = gemma4.load(model.hf)
    ids = torch.tensor(ours.tokenizer.encode((BENCH / "data" / "english.txt").read_text())[:48])
    with torch.no_grad():
        theirs = ref(ids[None]).logits[0]
    logits = ours.forward(ids)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # random weights scaled so activations neither vanish nor blow up
    assert (logits - theirs).abs().max().item() <= 1e-4  # same bf16 weights, both in float32 (as test_decoder_parity)


def test_router_spreads_tokens_over_experts(tiny):
    model, _ = tiny
    ours = gemma4.load(model.hf)
    picked = []
    hook = ours.decoder.layers[0].router.register_forward_hook(lambda m, i, out: picked.append(out[1]))
    ours.forward(torch.arange(3, 67))
    hook.remove()
    used = torch.cat(picked).flatten().bincount(minlength=ours.config.num_experts)
    # 64 tokens x top-2 of 8 experts: a router that spreads tokens leaves none idle (a uniform one
    # would miss an expert with probability ~8 * 0.75^64 < 1e-7); one that collapses leaves most idle
    assert (used > 0).all(), used.tolist()


def test_gguf_twin_has_the_same_architecture(tiny):
    model, _ = tiny
    hf, gguf = gemma4.load(model.hf).config, gemma4.load(model.gguf["Q8_0"]).config
    for fact in ("head_dim_of", "kv_heads_of", "k_eq_v", "is_sliding"):
        assert [getattr(gguf, fact)(i) for i in range(LAYERS)] == [getattr(hf, fact)(i) for i in range(LAYERS)], fact
    assert (gguf.num_experts, gguf.top_k_experts, gguf.vocab_size) == (hf.num_experts, hf.top_k_experts, hf.vocab_size)


def test_preparation_is_cached(tiny):
    model, cache = tiny
    stamp = {p: p.stat().st_mtime_ns for p in model.folder.rglob("*") if p.is_file()}
    again = prepare.shape_model(LAYERS, formats=("Q8_0",), tiny=True, cache=cache)
    assert not again.seconds  # no step ran
    assert {p: p.stat().st_mtime_ns for p in model.folder.rglob("*") if p.is_file()} == stamp


def test_active_bytes_count_top_k_experts_and_the_whole_lm_head():
    class Cfg:
        enable_moe_block, num_experts, top_k_experts, vocab_size = True, 8, 2, 100

    sizes = {"embed_tokens.weight": 1000, "layers.0.experts.gate_up_proj": 800, "layers.0.experts.down_proj": 400,
             "layers.0.self_attn.q_proj.weight": 50, "layers.0.router.proj.weight": 16}
    assert measure._active_bytes(sizes, Cfg) == 1000 + (800 + 400) * 2 // 8 + 50 + 16
    untied = dict(sizes, **{"lm_head.weight": 1000})
    assert measure._active_bytes(untied, Cfg) == 1000 // 100 + (800 + 400) * 2 // 8 + 50 + 16 + 1000


def test_runner_smoke(tiny, tmp_path):
    _, cache = tiny
    out = tmp_path / "RESULTS.md"
    ctx = run.main(["--cache", str(cache), "--models", "shape", "--tiny", "--layers", str(LAYERS),
                    "--formats", "Q8_0", "--skip-peers", "--reps", "1", "--prompt-tokens", "24",
                    "--decode-tokens", "4", "--bandwidth-mib", "64", "--results", str(out)])
    text = out.read_text()
    assert "## Speed" in text and "read bandwidth:" in text and "failed" not in text, text
    (c,) = ctx.comparisons
    assert len(c.ours["prefill_s"]) == 1 and c.ours["prefill_s"][0] > 0 and c.ours["decode_s"][0] > 0
    row = next(line for line in text.splitlines() if line.startswith("| tiny test shape"))
    assert row.split("|")[4].strip() != "—"  # gemma4's prefill figure is in the table
    assert json.dumps(c.weights)  # the file's sizes were read
    assert 0 < c.weights["active_bytes"] < c.weights["total_bytes"]


def test_vision_bench_tower_round_trips_through_mmproj(tmp_path, float_products):
    """bench/vision.py's random tower has every tensor the tower needs, and the mmproj it writes (the file
    both engines read) gives them back (float32 as written: the float32 mode keeps the tower's own dtype)."""
    import vision
    from gemma4.checkpoint.vision import MmprojCheckpoint, write_mmproj
    from gemma4.config.vision import VisionConfig
    from gemma4.model.vision import load_vision

    cfg = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3,
                       position_embedding_size=64, text_hidden_size=48, standardize=True)
    src = vision.RandomVision(cfg)
    write_mmproj(src, tmp_path / "mmproj.gguf", "F32")
    back = MmprojCheckpoint(tmp_path / "mmproj.gguf", cfg.text_hidden_size)
    tower = load_vision(back, torch.float32, torch.device("cpu"))
    for name, value in tower.state_dict().items():
        assert torch.equal(value, src.tensor(name).float()), name


def test_long_prefill_bench_measures_ours_on_the_prepared_file(tiny):
    """bench/long_prefill.py's own side on the tiny shape (llama.cpp is not built by make test): both
    engines get the same prompts, one rate per length."""
    import long_prefill

    model, _ = tiny
    assert long_prefill.prompts([7, 30], 8192) == long_prefill.prompts([7, 30], 8192)  # the same ids in each process
    rates = long_prefill.ours(str(model.gguf["Q8_0"]), [7, 30])
    assert len(rates) == 2 and all(r > 0 for r in rates)

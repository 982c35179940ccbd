"""Gemma 4 E2B/E4B-shaped decoders (per-layer embeddings, KV-shared layers, the double-wide MLP) against
transformers' on tiny random configs (tests/reference.py PLE_CONFIGS), float32.

Bound: max |logit difference| from the reference run in float64 <= 1e-4, or twice the reference's own
float32 error where that is larger. Our float32 logits differ from exact ones by rounding only, which these
unit-variance random weights amplify through the layers to several 1e-5 (the reference's float32 run lands
as far from its float64 one); a real error (a missing scale, a layer reading the wrong layer's KV) moves
them by 1e-2 or more.
"""

import pytest
import torch

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.engine import prefill, resume_points
from gemma4.engine.prompt_cache import PromptCache
from gemma4.kv import files as prompt_cache
from gemma4.kv import kv_bytes_per_token
from gemma4.info import count
from reference import PLE_CONFIGS, VOCAB, build_gemma4, tiny_vocab_metadata

TOL = 1e-4
GREEDY = dict(temperature=0, ignore_eos=True)


def _ids(n, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ple(tmp_path_factory):
    """name -> (folder, transformers model in float32, our model)."""
    built = {}
    for i, name in enumerate(PLE_CONFIGS):
        path = tmp_path_factory.mktemp(name)
        ref = build_gemma4(path, name, seed=1)
        built[name] = (path, ref, gemma4.load(path))
    return built


def _exact(ref, **inputs):
    """The reference's logits in float64, and the bound for ours (see the module's docstring)."""
    import copy

    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(**{k: v.double() if v.is_floating_point() else v
                                               for k, v in inputs.items()}).logits[0]
        own = ref(**inputs).logits[0].double()
    return exact, max(TOL, 2 * (own - exact).abs().max().item())


@pytest.mark.parametrize("name", list(PLE_CONFIGS))
def test_logits_match_reference(ple, name, float_products):
    _, ref, model = ple[name]
    ids = _ids(45)  # several times every config's sliding window
    expected, bound = _exact(ref, input_ids=ids[None])
    got = model.forward(ids)
    assert got.shape == expected.shape
    assert (got.double() - expected).abs().max().item() <= bound
    assert (model.forward(ids, chunk=3).double() - expected).abs().max().item() <= bound  # chunks below the window


@pytest.mark.parametrize("name", list(PLE_CONFIGS))
def test_greedy_tokens_match_reference(ple, name):
    _, ref, model = ple[name]
    ids = _ids(9, seed=1)
    with torch.no_grad():
        want = ref.generate(ids[None], max_new_tokens=24, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(ids):].tolist()
    assert model.generate(ids.tolist(), max_tokens=24, **GREEDY).token_ids == want


@pytest.mark.parametrize("name", ["ple_shared", "ple_shared_keqv"])
def test_cached_decode_equals_a_full_forward(ple, name, float_products):
    """Decode steps over the rings' wraps: the shared layers read their source's ring and pool at each step."""
    model = ple[name][2]
    dec = model.decoder
    total = 4 * model.config.sliding_window + 3
    ids = _ids(total, seed=7)
    full = model.forward(ids)
    cache = dec.new_cache(batch=1, capacity=4)
    pos = torch.arange(total)[None]
    steps = [dec.logits(prefill(dec, cache, ids[None, :5], pos[:, :5], chunk=4))[0]]
    for t in range(5, total):
        with torch.inference_mode():
            steps.append(dec.logits(dec(ids[None, t:t + 1], pos[:, t:t + 1], cache)[:, -1])[0])
    assert (torch.stack(steps) - full[4:]).abs().max().item() <= TOL


def test_batch_equals_alone(ple):
    model = ple["ple_shared"][2]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 9)]
    batch = model.generate(prompts, max_tokens=16, **GREEDY)
    for prompt, got in zip(prompts, batch):
        assert got.token_ids == model.generate(prompt, max_tokens=16, **GREEDY).token_ids


def test_kv_shared_layers_store_nothing_as_in_the_reference(ple):
    """Which layers hold KV, and the bytes per token of the full layers' pool, as transformers' cache holds them."""
    _, ref, model = ple["ple_shared"]
    cfg = model.config
    with torch.no_grad():
        past = ref(_ids(12)[None], use_cache=True).past_key_values
    cache = model.decoder.new_cache(capacity=16)
    prefill(model.decoder, cache, _ids(12)[None], torch.arange(12)[None])
    for i, layer in enumerate(past.layers):
        assert (layer.keys is None) == cfg.kv_shared(i) == (cache.layers[i].nbytes() == 0), i
    ref_full = sum((layer.keys.numel() + layer.values.numel()) * 4 // 12
                   for i, layer in enumerate(past.layers) if layer.keys is not None and not cfg.is_sliding(i))
    assert cache.pool_bytes_per_token() == ref_full == sum(
        kv_bytes_per_token(cfg, i, dtype=torch.float32) for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))
    modes, types = ref.config.kv_sharing_modes, ref.config.layer_types  # the reference's "store" / "reuse"
    assert [cfg.kv_source_layer(i) for i in range(cfg.num_hidden_layers)] == [
        i if m != "reuse" else next(j for j, n in enumerate(modes) if n == "store" and types[j] == types[i])
        for i, m in enumerate(modes)]
    assert [cfg.intermediate_size_of(i) for i in range(cfg.num_hidden_layers)] == [
        layer.mlp.intermediate_size for layer in ref.model.layers]
    assert cfg.intermediate_size_of(6) == 2 * cfg.intermediate_size_of(0)  # the double-wide MLP is there
    snap = cache.snapshot(0, _ids(12).tolist())
    assert [bool(s) for s in snap.layers] == [not cfg.kv_shared(i) for i in range(cfg.num_hidden_layers)]


@pytest.mark.parametrize("chunk", [3, 70])  # 70: past 64, a chunk joined to the ring's old slots
def test_prefix_reuse_equals_a_fresh_prefill_bit_for_bit(ple, chunk):
    model = ple["ple_shared"][2]
    dec = model.decoder
    w = model.config.sliding_window
    doc = _ids(max(5 * w, 2 * chunk) + 3, 1).tolist()
    c = resume_points(len(doc) + 1, chunk, None, most=len(doc))[-1]
    cache = dec.new_cache(batch=2, capacity=4)
    snaps = {}
    prefill(dec, cache.view([1]), torch.tensor([doc]), torch.arange(len(doc))[None], chunk,
            on_hidden=lambda start, h: snaps.setdefault(start + h.shape[1], cache.snapshot(1, doc[:start + h.shape[1]])))
    question = doc[:c] + _ids(2 * w + 1, 5).tolist()
    full = model.forward(question, chunk=chunk)[c:]
    resumed = dec.new_cache(batch=1, capacity=8)
    resumed.restore(0, snaps[c], c)
    out = []
    prefill(dec, resumed, torch.tensor([question]), torch.arange(len(question))[None], chunk, start=c,
            on_hidden=lambda _, h: out.append(dec.logits(h)[0]))
    assert torch.equal(torch.cat(out), full)


def test_prompt_cache_save_reload_equals_a_fresh_prefill(ple, tmp_path):
    path = ple["ple_shared_keqv"][0]
    writer = gemma4.load(path)
    w = writer.config.sliding_window
    chunk = w + 1
    doc, question = _ids(5 * w + 2, 1).tolist(), _ids(2 * w + 3, 5).tolist()
    pc = PromptCache(tmp_path / "doc.kv", prefix_len=len(doc))
    pc.prefill(writer.decoder, doc + question, capacity=4, chunk=chunk)
    assert pc.saved > 0
    reader = gemma4.load(path)  # a fresh model, as a later run has
    assert prompt_cache.load(tmp_path / "doc.kv", reader.decoder).tokens == doc[:pc.saved]
    pc = PromptCache(tmp_path / "doc.kv", prefix_len=len(doc))
    _, hidden = pc.prefill(reader.decoder, doc + question, capacity=4, chunk=chunk)
    assert pc.reused > 0
    ids = doc + question
    fresh = prefill(reader.decoder, reader.decoder.new_cache(), torch.tensor([ids]), torch.arange(len(ids))[None], chunk)
    assert torch.equal(hidden, fresh)


def test_speculative_rollback_is_token_identical(ple):
    """Drafts of another model (mostly rejected: rolled back over the rings' wraps) and of the model itself
    (all kept), and prompt lookup: the plain greedy tokens."""
    from gemma4 import speculative as spec

    model = ple["ple_shared"][2]
    prompt = _ids(4, 2).tolist() * 3
    n = 4 * model.config.sliding_window  # round the rings several times
    want = model.generate(prompt, max_tokens=n, **GREEDY).token_ids
    stranger = model.generate(prompt, max_tokens=n, speculative=3,
                              drafter=spec.DraftModel(ple["ple_plain"][2], model), **GREEDY)
    itself = model.generate(prompt, max_tokens=n, speculative=3, drafter=spec.DraftModel(model, model), **GREEDY)
    lookup = model.generate(prompt, max_tokens=n, speculative=3, **GREEDY)
    assert stranger.token_ids == itself.token_ids == lookup.token_ids == want
    assert stranger.accepted_tokens < stranger.drafted_tokens and itself.accepted_tokens == itself.drafted_tokens > 0


@pytest.mark.parametrize("name", ["ple_shared", "ple_shared_keqv"])
def test_gguf_twin_gives_the_safetensors_logits(ple, tmp_path, name):
    path, _, model = ple[name]
    f = write_gguf(open_checkpoint(path), tmp_path / "m.gguf", "F32", tiny_vocab_metadata())
    twin = gemma4.load(f)
    fields = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers", "use_double_wide_mlp",
              "intermediate_size", "layer_types", "attention_k_eq_v")
    assert [getattr(twin.config, k) for k in fields] == [getattr(model.config, k) for k in fields]
    ids = _ids(30, 3)
    # the same float32 weights and code; GGUF keeps rms_norm_eps as float32 (a 3e-9 relative change of eps)
    assert (twin.forward(ids) - model.forward(ids)).abs().max().item() <= 1e-5


def test_published_checkpoints_kv_tensors_of_shared_layers_are_ignored(ple, tmp_path):
    """Published E2B/E4B checkpoints keep k/v projections and norms for the KV-shared layers, which the
    reference ignores at load; so do we."""
    from safetensors.torch import load_file, save_file

    path, _, model = ple["ple_shared"]
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    h, kv, d = model.config.hidden_size, model.config.kv_heads_of(5), model.config.head_dim_of(5)
    tensors["model.layers.5.self_attn.k_proj.weight"] = torch.randn(kv * d, h)
    tensors["model.layers.5.self_attn.k_norm.weight"] = torch.randn(d)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = _ids(20, 4)
    assert torch.equal(gemma4.load(tmp_path).forward(ids), model.forward(ids))


def test_an_e2b_shaped_draft_gives_a_26b_shaped_targets_greedy_tokens(ple, tmp_path):
    from gemma4 import speculative as spec

    build_gemma4(tmp_path, "moe_kv", seed=40)  # the 26B-A4B's shape: MoE, K=V full layers; the same vocabulary
    target = gemma4.load(tmp_path)
    prompt = _ids(5, 4).tolist() * 2
    n = 3 * target.config.sliding_window + 2
    want = target.generate(prompt, max_tokens=n, **GREEDY)
    for draft in (ple["ple_shared"][2], ple["ple_plain"][2]):
        got = target.generate(prompt, max_tokens=n, speculative=4, drafter=spec.DraftModel(draft, target), **GREEDY)
        assert got.token_ids == want.token_ids and got.drafted_tokens > 0


def test_parameter_counts_and_info(ple, tmp_path, capsys):
    """`gemma4 info` of an E-model GGUF: the per-layer table, the shared layers, and the parameter total of
    the reference model (the table counts in the total, not as active: a token reads one row of it)."""
    from gemma4 import cli

    path, ref, model = ple["ple_shared"]
    cfg = model.config
    total, active = cfg.parameter_counts()
    assert total == sum(p.numel() for p in ref.parameters())
    assert total - active == cfg.vocab_size_per_layer_input * cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
    f = write_gguf(open_checkpoint(path), tmp_path / "e.gguf", "F32", tiny_vocab_metadata())
    assert cli.main(["info", str(f), "--ctx", "100"]) == 0
    out = capsys.readouterr().out
    assert f"per-layer emb  {VOCAB} x 7 x 6 = {VOCAB * 42 / 1e3:.2f}K parameters" in out
    assert "shared KV      the last 3 layers read earlier layers' KV (layers 4-6; they store none); their MLP 56" in out
    assert f"parameters     {count(total)} total, {count(active)} active per token" in out


def test_info_kv_counts_only_the_layers_that_store_it(ple, tmp_path, capsys):
    """`gemma4 info`'s KV at a context of an E-model GGUF: what a bf16 cache allocates (its rings without their
    positions, a context's worth of its pool), where the KV-shared layers allocate nothing."""
    from gemma4 import cli
    from gemma4.kv import KVBudget, KVCache

    path, _, model = ple["ple_shared"]
    cfg = model.config
    f = write_gguf(open_checkpoint(path), tmp_path / "e.gguf", "F32", tiny_vocab_metadata())
    ctx = 300
    assert cli.main(["info", str(f), "--ctx", str(ctx)]) == 0
    bf16 = KVCache(cfg, dtype=torch.bfloat16)  # one row, no tail: the rings info counts
    assert all(layer.nbytes() == 0 for i, layer in enumerate(bf16.layers) if cfg.kv_shared(i))
    positions = sum(layer.pos.numel() * layer.pos.element_size() for layer in bf16.layers if layer.ring)
    kv = bf16.ring_nbytes() - positions + ctx * KVBudget(10**12, bf16).per_token
    assert f"KV at {ctx:>6}   {kv / 1024:.1f} KiB (bf16)" in capsys.readouterr().out


def test_native_fused_layers_carry_the_per_layer_inputs(tmp_path):
    """Quantised E-model layers: the fused native layers (a shared layer's queries on the module path, as it
    has no K/V of its own) give the module path's bits, prefill and decode."""
    import gemma4.native

    if gemma4.native.compiled() is None:
        pytest.skip("no native kernels on this machine")
    build_gemma4(tmp_path / "hf", "ple_shared", seed=41, hidden_size=64, intermediate_size=64, head_dim=32,
                 global_head_dim=64, hidden_size_per_layer_input=32)
    decoder = gemma4.load(write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "Q8_0",
                                     tiny_vocab_metadata()), progress=False).decoder
    ids = _ids(9, 6)[None]

    def run(native):
        for layer in decoder.layers:
            layer._native_plan = None if native else False
        with torch.inference_mode():
            cache = decoder.new_cache(batch=1, capacity=16)
            out = [decoder.logits(prefill(decoder, cache, ids, torch.arange(9)[None]))]
            for i in range(3):
                out.append(decoder.logits(decoder(torch.tensor([[5 + i]]), torch.tensor([[9 + i]]), cache)[:, -1]))
        return out

    native = run(True)
    plans = [layer._native_plan for layer in decoder.layers]
    for a, b in zip(native, run(False)):
        assert torch.equal(a, b)
    assert all(plans), "the native path was not taken"
    assert [plan[1] is None for plan in plans] == [decoder.config.kv_shared(i) for i in range(7)]


def test_image_soft_tokens_in_an_e_model(tmp_path, float_products):
    """Images in a PLE model (the audio worker's soft tokens go the same way): the soft positions take the pad
    token's row of the per-layer table, and their embeddings feed the per-layer projection, as the reference
    (Gemma4ForConditionalGeneration) combines them."""
    import base64

    from vision_reference import TOKEN_IDS, build_multimodal, encoded, image_processor, picture

    ref = build_multimodal(tmp_path, "ple_shared", seed=5, bidirectional=None)
    model = gemma4.load(tmp_path)
    a = picture(40, 30, seed=1)
    url = "data:image/png;base64," + base64.b64encode(encoded(a, "PNG")).decode()
    prompt = model.chat_input([{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "ok"}]}])
    out = image_processor()([a], return_tensors="pt")
    ids = torch.tensor([prompt.ids])
    expected, bound = _exact(ref, input_ids=ids, pixel_values=out["pixel_values"],
                             image_position_ids=out["image_position_ids"],
                             mm_token_type_ids=(ids == TOKEN_IDS["<|image|>"]).long())
    assert (model.forward(prompt).double() - expected).abs().max().item() <= bound


def test_the_engine_under_a_kv_budget_with_prefix_reuse(ple):
    """The continuous-batching engine on an E-model: a KV budget sized without the shared layers, two rows,
    prefix reuse of a shared document: each answer is the one generate() gives alone."""
    from gemma4.engine import Engine, Request
    from gemma4.kv import PrefixStore
    from gemma4.sampling import SamplingParams
    from collect import Collector

    model = ple["ple_shared"][2]
    w = model.config.sliding_window
    store = PrefixStore(max_bytes=10**8, block_tokens=4, min_tokens=8)
    engine = Engine(model, max_batch=2, prefill_chunk=5, prefix_store=store, kv_budget=2**20).start()
    doc = _ids(4 * w + 1, 8).tolist()
    prompts = [doc + _ids(q, 10 + q).tolist() for q in (1, 7, 3)]
    try:
        outs = []
        for prompt in prompts:
            c = Collector()
            engine.submit(Request(prompt, SamplingParams(max_tokens=2 * w + 1, **GREEDY), c))
            outs.append(c)
        assert all(c.done.wait(120) for c in outs)
    finally:
        engine.stop()
    assert store.hits > 0
    for prompt, c in zip(prompts, outs):
        assert c.token_ids == model.generate(prompt, max_tokens=2 * w + 1, **GREEDY).token_ids

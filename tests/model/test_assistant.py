"""The Gemma 4 assistant (MTP drafter) against transformers' Gemma4AssistantForCausalLM, float32.

Bound: max |difference| <= 1e-4 on logits and on the projected hidden state. Both sides compute in
float32 and differ only in summation order (fused attention vs sdpa with an explicit mask), which moves
values of magnitude ~10 by ~1e-6; any real error (a mask off by one key, a RoPE position, the wrong
embedding scale) moves them by 1e-2 or more.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch

import gemma4
from assistant_reference import ASSISTANT_CONFIGS, build_pair
from gemma4.speculative.drafters import AssistantDrafter, load_drafter, target_shared_kv
from gemma4.checkpoint.assistant import open_assistant
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.errors import ModelLoadError
from gemma4.model.assistant import build_assistant
from reference import VOCAB

TOL = 1e-4


try:  # the speculative step's types, once they exist; the same fields otherwise
    from gemma4.speculative import DraftContext
except ImportError:
    @dataclass
    class DraftContext:
        tokens: list[int]
        position: int
        hidden: torch.Tensor
        decoder: object
        cache: object
        row: int


@pytest.fixture(scope="module", params=list(ASSISTANT_CONFIGS))
def pair(request, tmp_path_factory):
    """(name, target folder, transformers target, assistant folder, transformers assistant)."""
    tmp = tmp_path_factory.mktemp(request.param)
    return (request.param, *build_pair(tmp, request.param, seed=3))


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


def _reference_states(target, ids):
    """transformers' target over `ids`: the last final-normed hidden state and the shared KV."""
    with torch.no_grad():
        out = target(ids[None], output_hidden_states=True, return_shared_kv_states=True, use_cache=True)
    return out.hidden_states[-1][:, -1:], dict(out.shared_kv_states)


def _reference_step(assistant, target, token, hidden, position, shared):
    embeds = target.get_input_embeddings()(torch.tensor([[token]]))
    with torch.no_grad():
        out = assistant(inputs_embeds=torch.cat([embeds, hidden], dim=-1), position_ids=torch.tensor([[position]]),
                        shared_kv_states=shared, use_cache=False)
    return out.logits[0, 0], out.last_hidden_state[0, 0]


@pytest.mark.parametrize("length", [4, 20])  # inside the sliding window, and well past it
def test_step_matches_reference_given_target_states(pair, length):
    """Same target states on both sides: the reference's hidden state and its shared K and V."""
    name, _, target, assistant_path, ref = pair
    ours = build_assistant(open_assistant(assistant_path), torch.float32)
    ids = _prompt(length, seed=length)
    hidden, shared = _reference_states(target, ids)
    token = 7  # the token sampled after the prompt, at position `length`
    expected_logits, expected_next = _reference_step(ref, target, token, hidden, length, shared)

    kv = {kind: (k, v, torch.arange(k.shape[2])[None]) for kind, (k, v) in shared.items()}
    embeds = target.get_input_embeddings()(torch.tensor([token]))
    logits, nxt = ours(embeds, hidden[0], torch.tensor([length]), kv)
    assert logits.shape == (1, VOCAB) and nxt.shape == expected_next[None].shape
    assert (logits[0] - expected_logits).abs().max().item() <= TOL
    assert (nxt[0] - expected_next).abs().max().item() <= TOL
    if ours.config.use_ordered_embeddings:
        # the masked head scores top_k clusters of 30 tokens; the rest share the fill value
        top = ours.config.centroid_intermediate_top_k * VOCAB // ours.config.num_centroids
        assert (logits[0] > logits[0].min()).sum().item() == top


def test_shared_kv_from_our_cache_matches_reference(pair):
    """The accessor gives the reference's rotated K and V of the target's last layer of each type
    (K=V layers rebuilt from the one stored tensor), at the positions the cache holds."""
    _, target_path, target, _, _ = pair
    model = gemma4.load(target_path, progress=False)
    ids = _prompt(20, seed=2)
    _, shared = _reference_states(target, ids)
    cache = model.decoder.new_cache(1, 32)
    model.decoder(ids[None], torch.arange(20)[None], cache)
    ours = target_shared_kv(model.decoder, cache, 0)
    for kind, (k_ref, v_ref) in shared.items():
        k, v, pos = ours[kind]
        held = pos[0] >= 0
        order = pos[0][held].argsort()
        positions = pos[0][held][order]
        assert positions.tolist() == list(range(20 - len(positions), 20))
        assert (k[0][:, held][:, order] - k_ref[0][:, positions]).abs().max().item() <= TOL
        assert (v[0][:, held][:, order] - v_ref[0][:, positions]).abs().max().item() <= TOL


def _reference_drafts(target, assistant, ids, first_token, k):
    """transformers' candidate generator after a prefill of `ids` (the target sampled `first_token`)."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    assistant.generation_config.num_assistant_tokens = k
    generator = SinglePositionMultiTokenCandidateGenerator(
        assistant_model=assistant, target_model_input_embeddings=target.get_input_embeddings(),
        generation_config=GenerationConfig(max_length=1000, do_sample=False))
    with torch.no_grad():
        outputs = target(ids[None], output_hidden_states=True, return_shared_kv_states=True, use_cache=True)
    input_ids = torch.cat([ids, torch.tensor([first_token])])[None]
    candidates, _ = generator.get_candidates(input_ids, {}, outputs, is_first_iteration=False, n_last_matches=0)
    return candidates[0, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("length", [6, 23])
def test_drafts_match_reference_candidate_generator(pair, length):
    _, target_path, target, assistant_path, ref = pair
    model = gemma4.load(target_path, progress=False)
    drafter = load_drafter(assistant_path, model)
    ids = _prompt(length, seed=10 + length)
    # The reference's sliding layers see W+1 keys below the drafting position; a ring of W slots holds W.
    cache = model.decoder.new_cache(1, 64, tail=1)
    hidden = model.decoder(ids[None], torch.arange(length)[None], cache)[0, -1]
    first = int(model.decoder.logits(hidden).argmax())
    ctx = DraftContext(tokens=ids.tolist() + [first], position=length, hidden=hidden, decoder=model.decoder,
                       cache=cache, row=0)
    drafts, probs = drafter.propose(ctx, 5)
    assert probs is None  # greedy drafts: one-hot
    assert drafts == _reference_drafts(target, ref, ids, first, 5)
    assert len(set(drafts)) > 1  # the drafts depend on the step (the next hidden and token are fed back)
    # the cache is only read
    assert drafter.propose(ctx, 5)[0] == drafts and drafter.propose(ctx, 2)[0] == drafts[:2]


def test_hf_and_gguf_give_the_same_logits(pair, tmp_path):
    name, _, target, assistant_path, _ = pair
    hf = open_assistant(assistant_path)
    path = write_gguf(hf, tmp_path / "assistant.gguf")
    gg = open_assistant(path)
    # the same model; the GGUF has no tokenizer (token ids) and stores eps as float32; it spells the full
    # layers' shapes per layer (layer_overrides) where config.json may leave KV heads to the default
    skip = {"bos_token_id", "eos_token_ids", "pad_token_id", "rms_norm_eps", "layer_overrides", "attention_k_eq_v"}
    n = hf.config.text.num_hidden_layers
    assert [(gg.config.text.head_dim_of(i), gg.config.text.kv_heads_of(i)) for i in range(n)] == \
        [(hf.config.text.head_dim_of(i), hf.config.text.kv_heads_of(i)) for i in range(n)]
    assert {k: v for k, v in vars(gg.config.text).items() if k not in skip} == \
        {k: v for k, v in vars(hf.config.text).items() if k not in skip}
    assert gg.config.text.rms_norm_eps == pytest.approx(hf.config.text.rms_norm_eps, rel=1e-6)
    assert (gg.config.backbone_hidden_size, gg.config.use_ordered_embeddings, gg.config.num_centroids,
            gg.config.centroid_intermediate_top_k) == (hf.config.backbone_hidden_size, hf.config.use_ordered_embeddings,
                                                       hf.config.num_centroids, hf.config.centroid_intermediate_top_k)
    a, b = build_assistant(hf, torch.float32), build_assistant(gg, torch.float32)
    hidden, shared = _reference_states(target, _prompt(12, seed=4))
    kv = {kind: (k, v, torch.arange(k.shape[2])[None]) for kind, (k, v) in shared.items()}
    embeds = target.get_input_embeddings()(torch.tensor([5]))
    for name_, t in a.state_dict().items():  # F32 GGUF: the very same weights
        assert torch.equal(t, b.state_dict()[name_]), name_
    # Memory-mapped safetensors weights sit at unaligned addresses, which changes the matmul kernels'
    # summation order by a few ulps; in owned (aligned) memory the two models compute the same bits.
    for model_ in (a, b):
        for p in model_.parameters():
            p.data = p.data.clone()
    with torch.no_grad():
        la, ha = a(embeds, hidden[0], torch.tensor([12]), kv)
        lb, hb = b(embeds, hidden[0], torch.tensor([12]), kv)
    assert torch.equal(la, lb) and torch.equal(ha, hb)


class _WithoutMaskedHead:
    """A reader of `checkpoint` without the masked-head tensors, as llama.cpp's converter writes it."""

    def __init__(self, checkpoint):
        import dataclasses

        self.inner = checkpoint
        self.config = dataclasses.replace(checkpoint.config, use_ordered_embeddings=False)

    def names(self):
        return [n for n in self.inner.names() if not n.startswith("masked_embedding.")]

    def shape(self, name):
        return self.inner.shape(name)

    def tensor(self, name):
        return self.inner.tensor(name)


def test_gguf_without_masked_head_scores_the_whole_vocabulary(pair, tmp_path):
    name, _, _, assistant_path, _ = pair
    hf = open_assistant(assistant_path)
    gg = open_assistant(write_gguf(_WithoutMaskedHead(hf), tmp_path / "no_masked_head.gguf"))
    assert not gg.config.use_ordered_embeddings
    full = build_assistant(gg, torch.float32)
    masked = build_assistant(hf, torch.float32)
    g = torch.Generator().manual_seed(0)
    e, h = torch.randn(2, 1, hf.config.backbone_hidden_size, generator=g)
    shared = {layer.kind: (torch.randn(1, 1, 6, layer.self_attn.head_dim, generator=g),
                           torch.randn(1, 1, 6, layer.self_attn.head_dim, generator=g), torch.arange(6)[None])
              for layer in masked.layers}
    with torch.no_grad():
        logits, _ = full(e, h, torch.tensor([6]), shared)
        masked_logits, _ = masked(e, h, torch.tensor([6]), shared)
    assert logits.shape == (1, VOCAB) and logits[0].unique().numel() == VOCAB  # every token scored
    # the masked head scores some clusters only, and those as the full head does (a plain head: all);
    # same weights, so only the memory alignment of the mapped files changes the last bits
    kept = torch.ones(VOCAB, dtype=torch.bool)
    if masked.config.use_ordered_embeddings:
        kept = masked_logits[0] > masked_logits[0].min()
        assert kept.sum() < VOCAB
    assert (logits[0][kept] - masked_logits[0][kept]).abs().max().item() <= TOL


def test_not_an_assistant(pair, tmp_path):
    _, target_path, *_ = pair
    model = gemma4.load(target_path, progress=False)
    with pytest.raises(ValueError, match="model_type: 'gemma4_text' is not a Gemma 4 assistant"):
        load_drafter(target_path, model)
    gguf_target = write_gguf(model.checkpoint, tmp_path / "target.gguf")
    with pytest.raises(ValueError, match="general.architecture: 'gemma4' is not a Gemma 4 assistant"):
        load_drafter(gguf_target, model)


def test_mismatched_target(tmp_path, pair):
    name, _, _, assistant_path, _ = pair
    other = next(n for n in ASSISTANT_CONFIGS if n != name)
    other_target, *_ = build_pair(tmp_path, other, seed=1)
    model = gemma4.load(other_target, progress=False)
    with pytest.raises(ValueError, match="backbone_hidden_size: the assistant was trained for a target of hidden"):
        load_drafter(assistant_path, model)

    bad = tmp_path / "bad_vocab"
    shutil.copytree(assistant_path, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["backbone_hidden_size"] = model.config.hidden_size
    raw["text_config"]["vocab_size"] = 280
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="vocab_size: the assistant has 280 tokens, the target 300"):
        load_drafter(bad, model)


def test_drafter_checks_its_target(pair):
    _, _, _, assistant_path, _ = pair
    assistant = build_assistant(open_assistant(assistant_path), torch.float32)
    target_config = gemma4.config.ModelConfig.from_hf(
        json.loads((assistant_path.parent / "target" / "config.json").read_text()))
    target_config.hidden_size += 1
    with pytest.raises(ValueError, match="backbone_hidden_size"):
        AssistantDrafter(assistant, type("T", (), {"config": target_config})())


def test_bad_checkpoints(pair, tmp_path):
    _, _, _, assistant_path, _ = pair
    bad = tmp_path / "bad"
    shutil.copytree(assistant_path, bad)
    raw = json.loads((bad / "config.json").read_text())
    del raw["backbone_hidden_size"]
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="backbone_hidden_size: missing"):
        open_assistant(bad)
    raw["backbone_hidden_size"] = 12
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"pre_projection.weight: shape \[\d+, \d+\] in checkpoint"):
        build_assistant(open_assistant(bad), torch.float32)
    with pytest.raises(ModelLoadError, match="no such file"):
        open_assistant(tmp_path / "nowhere")


def assert_assistant_keeps_greedy(model, assistant_path, prompt: list[int]) -> None:
    """The assistant drafting in the speculative loop (chosen by drafter_for, as --draft-model does):
    greedy output equals plain greedy output, across the sliding window and ring wraps."""
    from gemma4 import speculative

    drafter = speculative.drafter_for(assistant_path, model)
    assert isinstance(drafter, AssistantDrafter)
    n = 4 * model.config.sliding_window + 3
    want = model.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
    got = model.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True, speculative=3, drafter=drafter)
    assert got.token_ids == want.token_ids
    assert got.drafted_tokens > 0


def test_greedy_with_the_assistant_is_token_identical(pair):
    from gemma4 import speculative

    _, target_path, _, assistant_path, _ = pair
    model = gemma4.load(target_path)
    assert_assistant_keeps_greedy(model, assistant_path, _prompt(9, seed=5).tolist())
    # a target folder given as --draft-model is a draft model, not an assistant
    assert not isinstance(speculative.drafter_for(target_path, model), AssistantDrafter)

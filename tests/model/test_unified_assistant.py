"""gemma4_unified_assistant as the drafter of the unified model, against transformers'
Gemma4UnifiedAssistantForCausalLM (its candidate generator) and against plain greedy decoding."""

import pytest
import torch

import gemma4
from gemma4.checkpoint.assistant import is_assistant, open_assistant
from gemma4.speculative.drafters import load_drafter
from test_assistant import DraftContext, _reference_drafts, assert_assistant_keeps_greedy
from unified_reference import build_unified, build_unified_assistant, mark_unified_producers


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unified_pair")
    target_path, assistant_path = tmp / "target", tmp / "assistant"
    target_path.mkdir()
    assistant_path.mkdir()
    target = build_unified(target_path, seed=5, vision=False, audio=False)
    mark_unified_producers(target)
    assistant = build_unified_assistant(assistant_path, target.config.text_config.hidden_size, seed=6)
    return target_path, target, assistant_path, assistant


def _ids(n, seed=0):
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed))


def test_it_is_read_as_an_assistant(pair):
    _, _, assistant_path, _ = pair
    assert is_assistant(assistant_path)
    config = open_assistant(assistant_path).config
    assert config.text.model_type == "gemma4_unified_text" and config.text.bidirectional_vision_layers == "all"
    assert config.backbone_hidden_size == 44 and not config.use_ordered_embeddings


@pytest.mark.parametrize("length", [6, 23])  # inside the window of 7, and past it
def test_drafts_match_the_reference_candidate_generator(pair, length):
    target_path, target, assistant_path, ref = pair
    model = gemma4.load(target_path, progress=False)
    drafter = load_drafter(assistant_path, model)
    ids = _ids(length, seed=length)
    cache = model.decoder.new_cache(1, 64, tail=1)  # the reference's sliding layers see W+1 keys: see test_assistant
    hidden = model.decoder(ids[None], torch.arange(length)[None], cache)[0, -1]
    first = int(model.decoder.logits(hidden).argmax())
    ctx = DraftContext(tokens=ids.tolist() + [first], position=length, hidden=hidden, decoder=model.decoder,
                       cache=cache, row=0)
    drafts, _ = drafter.propose(ctx, 5)
    assert drafts == _reference_drafts(target, ref, ids, first, 5)


def test_greedy_with_the_unified_assistant_is_token_identical(pair):
    target_path, _, assistant_path, _ = pair
    assert_assistant_keeps_greedy(gemma4.load(target_path, progress=False), assistant_path, _ids(9, seed=5).tolist())

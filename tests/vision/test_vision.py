"""The vision tower, the multimodal embedder and image prompts against transformers' Gemma 4
(Gemma4ForConditionalGeneration, float32, tiny random weights)."""

import base64

import pytest
import torch

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.vision import HFVisionCheckpoint
from gemma4.images import decode_image, preprocess
from gemma4.model.vision import load_vision
from vision_reference import (MAX_SOFT_TOKENS, TOKEN_IDS, VISION, build_multimodal, encoded, image_processor,
                              picture)

# float32 on both sides, same math in a different order (SDPA vs eager attention, pooling by
# avg_pool2d vs a one-hot matmul): observed differences are ~3e-6 on values of size ~3. A wrong weight,
# position or mask moves outputs by 0.1 or more.
ATOL = 1e-4

CASES = {
    # bidirectional image attention on sliding layers (the 26B/31B setting), window 7 << image runs
    "bidir": dict(name="dense_kv", bidirectional="vision"),
    # causal image attention (E2B/E4B setting), MoE decoder, K=V
    "causal_moe": dict(name="moe_kv", bidirectional=None),
}


@pytest.fixture(scope="module", params=list(CASES))
def mm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = build_multimodal(path, seed=3, **CASES[request.param])
    return request.param, path, ref, gemma4.load(path)


def _data_url(img, fmt="PNG"):
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(encoded(img, fmt)).decode()


def _reference_logits(ref, prompt, images):
    """transformers' logits for our prompt ids and the images, preprocessed by its own processor."""
    out = image_processor()(images, return_tensors="pt")
    ids = torch.tensor([prompt.ids])
    types = (ids == TOKEN_IDS["<|image|>"]).long() + 2 * (ids == TOKEN_IDS["<|video|>"]).long()
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"],
                   mm_token_type_ids=types).logits[0]


@pytest.mark.parametrize("size", [(50, 37), (20, 90), (12, 12), (300, 7), (160, 160)])
def test_tower_and_embedder_match_the_reference(mm, size):
    _, path, ref, _ = mm
    vision = load_vision(HFVisionCheckpoint(open_checkpoint(path)), torch.float32, torch.device("cpu"))
    img = picture(*size, seed=sum(size))
    out = image_processor()([img], return_tensors="pt")
    with torch.no_grad():
        expected = ref.model.get_image_features(out["pixel_values"], out["image_position_ids"]).pooler_output[0]
    p = preprocess(decode_image(encoded(img, "PNG")), VISION["patch_size"], VISION["pooling_kernel_size"],
                   MAX_SOFT_TOKENS)
    got = vision.encode(p.pixel_values, p.positions)
    assert got.shape == expected.shape == (out["num_soft_tokens_per_image"][0], ref.config.text_config.hidden_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _two_image_messages(tmp_path):
    a, b = picture(50, 37, seed=1), picture(23, 61, seed=2)
    b_path = tmp_path / "b.jpg"
    b_path.write_bytes(encoded(b, "JPEG", quality=90))
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": _data_url(a)}},
        {"type": "text", "text": "with"},
        {"type": "image", "image": str(b_path)},
        {"type": "text", "text": "please"}]}]
    from PIL import Image

    with Image.open(b_path) as f:
        b_decoded = f.convert("RGB")
    return messages, [a, b_decoded]


def test_text_and_two_images_give_the_reference_logits(mm, tmp_path):
    case, _, ref, model = mm
    messages, images = _two_image_messages(tmp_path)
    prompt = model.chat_input(messages)
    n = [p.soft_tokens for p in prompt.patches]
    assert len(n) == 2 and prompt.ids.count(TOKEN_IDS["<|image|>"]) == sum(n)
    for offset, count in zip(prompt.offsets, n):  # begin-of-image, N soft tokens, end-of-image
        assert prompt.ids[offset - 1] == TOKEN_IDS["<|image>"] and prompt.ids[offset + count] == TOKEN_IDS["<image|>"]
    expected = _reference_logits(ref, prompt, images)
    torch.testing.assert_close(model.forward(prompt), expected, atol=ATOL, rtol=0)
    # chunks far smaller than an image: chunk borders are moved so that no image is cut
    torch.testing.assert_close(model.forward(prompt, chunk=5), expected, atol=ATOL, rtol=0)
    if case == "bidir":  # the mask matters: causal attention over the images gives other logits
        model.config.use_bidirectional_attention = None
        try:
            assert (model.forward(prompt) - expected).abs().max() > 1e-2
        finally:
            model.config.use_bidirectional_attention = "vision"


def test_generation_with_images_continues_the_reference(mm, tmp_path):
    _, _, ref, model = mm
    messages, images = _two_image_messages(tmp_path)
    prompt = model.chat_input(messages)
    reply = model.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True)
    out = image_processor()(images, return_tensors="pt")
    ids = torch.tensor([prompt.ids])
    types = (ids == TOKEN_IDS["<|image|>"]).long()
    with torch.no_grad():
        greedy = ref.generate(input_ids=ids, pixel_values=out["pixel_values"], mm_token_type_ids=types,
                              image_position_ids=out["image_position_ids"], max_new_tokens=4, do_sample=False)
    assert reply.token_ids == greedy[0, len(prompt.ids):].tolist()
    assert reply.prompt_tokens == len(prompt.ids)


def test_a_repeated_image_is_encoded_once_and_reuses_nothing_across_images(mm, monkeypatch):
    _, _, _, model = mm
    a, b = picture(30, 30, seed=7), picture(30, 30, seed=8)
    calls = []
    real = model.vision.encode
    monkeypatch.setattr(model.vision, "encode", lambda *args: calls.append(1) or real(*args))
    parts = [{"type": "image_url", "image_url": {"url": _data_url(x)}} for x in (a, a, b)]
    prompt = model.chat_input([{"role": "user", "content": parts}])
    soft = model.media_embeddings(prompt)
    assert len(calls) == 2 and len(soft) == 3
    assert prompt.digests[0] == prompt.digests[1] != prompt.digests[2]
    assert soft[0][1] is soft[1][1] and not torch.equal(soft[0][1], soft[2][1])


def test_image_count_must_match_placeholders_and_text_models_refuse_images(mm, gemma4_models):
    _, _, _, model = mm
    with pytest.raises(ValueError, match="placeholders"):
        model.multimodal_prompt("<|image|> and <|image|>", [decode_image(encoded(picture(9, 9), "PNG"))])
    text_only = gemma4.load(gemma4_models["dense_kv"][0])
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])


def test_image_token_budget(mm):
    _, _, _, model = mm
    img = decode_image(encoded(picture(400, 300, seed=4), "PNG"))
    small = model.multimodal_prompt("<|image|>", [img], image_tokens=70)
    large = model.multimodal_prompt("<|image|>", [img], image_tokens=140)
    assert small.patches[0].soft_tokens <= 70 < large.patches[0].soft_tokens <= 140
    with pytest.raises(ValueError, match="image_tokens"):
        model.multimodal_prompt("<|image|>", [img], image_tokens=100)


def test_a_batch_mixing_image_and_text_prompts_matches_single_runs(mm, tmp_path):
    _, _, _, model = mm
    messages, _ = _two_image_messages(tmp_path)
    image_prompt = model.chat_input(messages)
    text_prompt = model.chat_input([{"role": "user", "content": "just text"}])
    batch = model.generate([text_prompt, image_prompt], max_tokens=3, temperature=0, ignore_eos=True)
    for prompt, got in zip((text_prompt, image_prompt), batch):
        alone = model.generate(prompt, max_tokens=3, temperature=0, ignore_eos=True)
        assert got.token_ids == alone.token_ids  # left padding moves the image; its embeddings move with it


def test_bfloat16_tower_stays_near_float32(mm):
    _, path, _, _ = mm
    reader = HFVisionCheckpoint(open_checkpoint(path))
    p = preprocess(decode_image(encoded(picture(40, 30, seed=5), "PNG")), VISION["patch_size"],
                   VISION["pooling_kernel_size"], MAX_SOFT_TOKENS)
    exact = load_vision(reader, torch.float32, torch.device("cpu")).encode(p.pixel_values, p.positions)
    half = load_vision(reader, torch.bfloat16, torch.device("cpu")).encode(p.pixel_values, p.positions)
    assert half.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding, a few percent after two layers and the projection
    assert (half.float() - exact).abs().max() < 0.1 * exact.abs().max()


def test_requests_from_a_network_cannot_name_local_files(mm, tmp_path):
    _, _, _, model = mm
    path = tmp_path / "secret.png"
    path.write_bytes(encoded(picture(9, 9), "PNG"))
    parts = [{"type": "image", "image": str(path)}, {"type": "text", "text": "x"}]
    assert len(model.chat_input([{"role": "user", "content": parts}]).patches) == 1
    with pytest.raises(ValueError, match="scheme|not fetched"):
        model.chat_input([{"role": "user", "content": parts}], local_files=False)
    with pytest.raises(ValueError, match="not accepted"):
        model.chat_input([{"role": "user", "content": [{"type": "video", "video": str(tmp_path)}]}], local_files=False)


def test_a_prompt_cache_keys_images_by_their_pixels(mm, tmp_path):
    """A saved prompt with an image is reused by a later question on the same image (logits equal a plain
    forward); an image of the same size but other pixels reuses nothing from the image on."""
    from gemma4.kv import common_prefix
    from gemma4.engine.prompt_cache import PromptCache

    _, _, _, model = mm
    path = tmp_path / "page.kv"

    def run(image, question):
        def messages(text):
            return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]

        prompt, head = model.chat_input(messages(question)), model.chat_input(messages(""))
        pc = PromptCache(path, common_prefix(prompt.ids, head.ids))
        _, hidden = pc.prefill(model.decoder, prompt.ids, len(prompt) + 1, 16, soft=model.media_embeddings(prompt))
        torch.testing.assert_close(model.decoder.logits(hidden)[0], model.forward(prompt)[-1], atol=ATOL, rtol=0)
        return pc, prompt.offsets[0], prompt.offsets[0] + prompt.patches[0].soft_tokens  # the image's run

    a, b = picture(40, 30, seed=1), picture(40, 30, seed=2)
    pc, image_start, image_end = run(a, "what is this?")
    assert pc.reused == 0 and pc.saved >= image_end  # up to a chunk end: the image's, or a later grid point
    pc, _, _ = run(a, "and its colour?")
    assert pc.reused >= image_end  # the image's KV came from the file
    pc, _, _ = run(b, "what is this?")
    assert pc.reused == 0  # the file resumes at its end only, past the other picture: nothing of it is reused

"""The 12B unified model (gemma4_unified) against transformers' Gemma4UnifiedForConditionalGeneration, float32,
tiny random weights: text, text + image (encoder-free patch embedder), text + raw-waveform audio.

Bound: max |logit difference| <= 1e-4, argued as in test_decoder_parity.py: both sides compute in float32 and
differ in summation order only (~1e-5 seen on logits of size ~10); a wrong mask (an image seen causally, on
sliding layers only, or cut by the window; audio seen both ways), a wrong LayerNorm or a wrong patch order
moves logits by 0.1 or more.
"""

import numpy as np
import pytest
import torch

import gemma4
from gemma4.images import from_pil
from gemma4.audio_io import Audio
from gemma4.info import count
from unified_reference import (SAMPLES_PER_TOKEN, UNIFIED_TOKEN_IDS, build_unified, mm_token_type_ids,
                               reference_audio_inputs, reference_audio_placeholder, reference_image_inputs)
from vision_reference import picture

TOL = 1e-4


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    path = tmp_path_factory.mktemp("unified")
    ref = build_unified(path, seed=3)
    return path, ref, gemma4.load(path, progress=False)


def _ids(n, seed=0):
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed))  # byte tokens only


def _wave(n, seed=0):
    return (0.4 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def _media_prompt(model, image=True, audio=True):
    """Text around an image (63 soft tokens, nine times the window of 7) and a clip of 150 samples."""
    img, wave = picture(50, 37, seed=1), _wave(150)
    text = "look " + ("<|image|> and " if image else "") + ("listen <|audio|>" if audio else "") + " then answer"
    media = ([from_pil(img)] if image else []) + ([Audio.from_array(wave)] if audio else [])
    return model.multimodal_prompt(text, media), img, wave


def _reference_logits(ref, prompt, img=None, wave=None):
    ids = torch.tensor([prompt.ids])
    kwargs = {}
    if img is not None:
        pixels, positions, _ = reference_image_inputs([img])
        kwargs.update(pixel_values=pixels, image_position_ids=positions)
    if wave is not None:
        features, mask = reference_audio_inputs([wave])
        kwargs.update(input_features=features, input_features_mask=mask)
    with torch.no_grad():
        return ref(input_ids=ids, mm_token_type_ids=mm_token_type_ids(ids), **kwargs).logits[0]


def test_config_is_the_unified_decoder(unified):
    _, _, model = unified
    cfg = model.config
    assert cfg.model_type == "gemma4_unified" and not cfg.enable_moe_block
    assert cfg.use_bidirectional_attention == "vision" and cfg.bidirectional_vision_layers == "all"
    assert cfg.audio_token_id == UNIFIED_TOKEN_IDS["<|audio|>"]  # its runs stay causal (Decoder.forward)


def test_text_logits_match_the_reference(unified):
    _, ref, model = unified
    ids = _ids(40)  # past the window of 7 several times
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0]
    assert (model.forward(ids) - expected).abs().max().item() <= TOL
    assert (model.forward(ids, chunk=3) - expected).abs().max().item() <= TOL


def test_image_embedder_and_logits_match_the_reference(unified, float_products):
    _, ref, model = unified
    prompt, img, _ = _media_prompt(model, audio=False)
    pixels, positions, counts = reference_image_inputs([img])
    with torch.no_grad():
        expected_soft = ref.model.get_image_features(pixels, positions).pooler_output[0]
    p = prompt.patches[0]
    assert p.soft_tokens == counts[0] == prompt.ids.count(UNIFIED_TOKEN_IDS["<|image|>"])
    torch.testing.assert_close(model.vision.encode(p.pixel_values, p.positions), expected_soft, atol=TOL, rtol=0)
    expected = _reference_logits(ref, prompt, img=img)
    assert (model.forward(prompt) - expected).abs().max().item() <= TOL
    assert (model.forward(prompt, chunk=5) - expected).abs().max().item() <= TOL  # chunks never cut the image
    # Gemma 4's rule (both ways on sliding layers only, inside the window) is not the unified model's
    model.config.bidirectional_vision_layers = "sliding"
    try:
        assert (model.forward(prompt) - expected).abs().max().item() > 1e-2
    finally:
        model.config.bidirectional_vision_layers = "all"


def test_audio_placement_and_logits_match_the_reference(unified):
    _, ref, model = unified
    prompt, _, wave = _media_prompt(model, image=False)
    features, mask = reference_audio_inputs([wave])
    placeholder = reference_audio_placeholder(mask)  # <|audio> + ceil(150 / 16) soft tokens + <audio|>
    assert prompt.ids == model.tokenizer.encode(f"look listen {placeholder} then answer", add_special_tokens=False)
    assert prompt.patches[0].soft_tokens == -(-150 // SAMPLES_PER_TOKEN)
    expected = _reference_logits(ref, prompt, wave=wave)
    assert (model.forward(prompt) - expected).abs().max().item() <= TOL
    # audio soft tokens attend causally: seeing them both ways (as images are) gives other logits
    saved, model.config.audio_token_id = model.config.audio_token_id, None
    try:
        assert (model.forward(prompt) - expected).abs().max().item() > 1e-2
    finally:
        model.config.audio_token_id = saved


def test_image_and_audio_in_one_prompt(unified, float_products):
    _, ref, model = unified
    prompt, img, wave = _media_prompt(model)
    assert (model.forward(prompt) - _reference_logits(ref, prompt, img, wave)).abs().max().item() <= TOL


def test_greedy_tokens_and_cached_decode(unified, float_products):
    """24 greedy tokens as the reference's generate; our cached decode (ring of 7 slots wrapped several
    times) gives the logits a full forward over prompt + output gives."""
    _, ref, model = unified
    prompt, img, wave = _media_prompt(model)
    pixels, positions, _ = reference_image_inputs([img])
    features, mask = reference_audio_inputs([wave])
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        greedy = ref.generate(input_ids=ids, pixel_values=pixels, image_position_ids=positions,
                              input_features=features, input_features_mask=mask,
                              mm_token_type_ids=mm_token_type_ids(ids), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    reply = model.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    assert reply.token_ids == greedy
    prompt.ids = prompt.ids + reply.token_ids  # the same soft-token runs, the answer appended
    full = torch.log_softmax(model.forward(prompt), dim=-1)
    n = len(prompt.ids) - 24
    for i, (token, lp) in enumerate(zip(reply.token_ids, reply.logprobs)):
        assert abs(lp.logprob - full[n - 1 + i, token].item()) <= TOL


def test_a_batch_equals_each_prompt_alone(unified):
    _, _, model = unified
    media, _, _ = _media_prompt(model)
    text = _ids(17, seed=4).tolist()
    batch = model.generate([text, media], max_tokens=12, temperature=0, ignore_eos=True)
    for prompt, got in zip((text, media), batch):
        assert got.token_ids == model.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).token_ids


def test_audio_parts_and_refusals(unified):
    _, _, model = unified
    wave = _wave(100, seed=2)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": "hi"}]}]
    prompt = model.chat_input(messages)
    assert prompt.ids.count(UNIFIED_TOKEN_IDS["<|audio|>"]) == prompt.patches[0].soft_tokens == -(-100 // 16)
    with pytest.raises(ValueError, match="16000 Hz"):
        model.multimodal_prompt("<|audio|>", [Audio.from_array(wave, 8000)])
    with pytest.raises(ValueError, match="NaN"):
        model.chat_input([{"role": "user", "content": [{"type": "audio", "audio": np.array([0.0, np.nan])}]}])
    with pytest.raises(ValueError, match="placeholder"):
        model.multimodal_prompt("<|image|>", [Audio.from_array(wave)])
    saved, model.audio_checkpoint = model.audio_checkpoint, None
    try:
        with pytest.raises(ValueError, match="no audio tower"):
            model.chat_input(messages)
    finally:
        model.audio_checkpoint = saved


def test_info_describes_it(unified, capsys):
    from gemma4 import cli

    path, ref, model = unified
    assert cli.main(["info", str(path), "--ctx", "64"]) == 0
    out = capsys.readouterr().out
    text_params = sum(p.numel() for p in ref.model.language_model.parameters())
    image_params = sum(p.numel() for p in ref.model.embed_vision.parameters())
    audio_params = sum(p.numel() for p in ref.model.embed_audio.parameters())
    assert model.config.parameter_counts() == (text_params, text_params)  # dense: all active
    assert "(gemma4_unified), 6 layers (5 sliding, window 7; 1 full), hidden 44" in out
    assert f"12x12 px patches -> 24 -> text, one soft token each (70 per image by default); " \
           f"{count(image_params)} parameters" in out
    assert f"raw waveform: 16 samples (1 ms at 16000 Hz) per soft token; {count(audio_params)} parameters" in out


def test_chat_with_an_audio_file_answers_as_the_reference(unified, tmp_path):
    """An audio part (a WAV file) goes through the audio loader at 16 kHz into waveform frames (no log-mel
    tower): the prompt is the reference processor's and the greedy answer and its logprobs are the
    reference's (bound TOL on log-softmaxed logits, as above)."""
    import soundfile
    from transformers.audio_utils import load_audio

    _, ref, model = unified
    soundfile.write(tmp_path / "a.wav", _wave(300, seed=5), 16000, subtype="FLOAT")
    messages = [{"role": "user", "content": [{"type": "text", "text": "hear "},
                                             {"type": "audio", "audio": str(tmp_path / "a.wav")}]}]
    wave = load_audio(str(tmp_path / "a.wav"), sampling_rate=16000, backend="soundfile")  # the reference's loader
    features, mask = reference_audio_inputs([wave])
    text = model.chat_prompt([{"role": "user", "content": [{"type": "text", "text": "hear "}, {"type": "audio"}]}])
    ids = torch.tensor([model.tokenizer.encode(text.replace("<|audio|>", reference_audio_placeholder(mask)),
                                               add_special_tokens=False)])
    assert model.chat_input(messages).ids == ids[0].tolist()
    reply = model.chat(messages, max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, input_features=features, input_features_mask=mask,
                           mm_token_type_ids=mm_token_type_ids(ids), max_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert [lp.token_id for lp in reply.logprobs] == out.sequences[0, ids.shape[1]:].tolist()
    for lp, logits in zip(reply.logprobs, out.logits):
        assert abs(lp.logprob - torch.log_softmax(logits[0], -1)[lp.token_id].item()) <= TOL

"""The vision tower as llama.cpp ships it for GGUF users: an mmproj GGUF beside the text GGUF."""

import base64

import numpy as np
import pytest
import torch

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_file import GGUFFile
from gemma4.checkpoint.vision import HFVisionCheckpoint, MmprojCheckpoint, write_mmproj
from gemma4.errors import ModelLoadError
from gemma4.model.vision import load_vision
from gguf_media import assert_mmproj_refusals, convert_mmproj, needs_converter, vision_gguf_pair
from vision_reference import TOKEN_IDS, encoded, picture


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmproj")
    return d, *vision_gguf_pair(d)


def _messages():
    url = "data:image/png;base64," + base64.b64encode(encoded(picture(45, 31, seed=3), "PNG")).decode()
    url2 = "data:image/png;base64," + base64.b64encode(encoded(picture(17, 40, seed=4), "PNG")).decode()
    return [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "image_url", "image_url": {"url": url2}}, {"type": "text", "text": "b"}]}]


def test_text_gguf_with_mmproj_gives_the_safetensors_logits(files):
    d, text, mmproj = files
    from_gguf = gemma4.load(text, mmproj=mmproj)
    from_hf = gemma4.load(d / "hf")
    assert from_gguf.config.use_bidirectional_attention == "vision"  # llama.cpp's rule for this width
    prompt = from_gguf.chat_input(_messages())
    # the media tokens are found by their text in the GGUF vocabulary, at the ids config.json gives
    assert [prompt.ids[o - 1] for o in prompt.offsets] == [TOKEN_IDS["<|image>"]] * 2
    assert prompt.ids.count(TOKEN_IDS["<|image|>"]) == sum(p.soft_tokens for p in prompt.patches) > 0
    # Both float32 with the same weights (F32 GGUF): only summation order may differ.
    torch.testing.assert_close(from_gguf.forward(prompt), from_hf.forward(prompt), atol=1e-5, rtol=0)


def test_mmproj_config_round_trips(files):
    d, _, mmproj = files
    hf = HFVisionCheckpoint(open_checkpoint(d / "hf")).config
    got = MmprojCheckpoint(mmproj).config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "patch_size", "pooling_kernel_size", "position_embedding_size", "text_hidden_size",
                "rope_theta", "standardize", "use_clipped_linears"):
        assert getattr(got, key) == getattr(hf, key), key
    assert got.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)  # stored as float32


def test_a_quantised_mmproj_stays_close(files):
    d, _, _ = files
    q8 = write_mmproj(HFVisionCheckpoint(open_checkpoint(d / "hf")), d / "mmproj-q8.gguf", "Q8_0")
    exact = load_vision(HFVisionCheckpoint(open_checkpoint(d / "hf")), torch.float32, torch.device("cpu"))
    quant = load_vision(MmprojCheckpoint(q8), torch.float32, torch.device("cpu"))
    patches = torch.rand(36, 48)
    pos = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"), -1).reshape(-1, 2)
    a, b = exact.encode(patches, pos), quant.encode(patches, pos)
    # 8-bit blocks: relative error of a matmul ~1e-2; the standardised features are O(1)
    assert (a - b).abs().max() < 0.1 * a.abs().max() and not torch.equal(a, b)


def test_mmproj_errors(files, tmp_path):
    _, text, mmproj = files
    assert_mmproj_refusals(MmprojCheckpoint, mmproj, text)
    with pytest.raises(ModelLoadError, match="no such mmproj"):
        gemma4.load(text, mmproj=tmp_path / "missing.gguf")


@needs_converter
def test_llamacpp_converter_writes_what_we_write(files, tmp_path):
    """llama.cpp's own `convert_hf_to_gguf.py --mmproj`: same tensors and numbers as write_mmproj, and
    our reader loads its file into the same tower."""
    d, _, ours = files
    out = convert_mmproj(d / "hf", tmp_path / "mmproj-llamacpp.gguf")
    theirs, mine = GGUFFile(out), GGUFFile(ours)
    assert set(theirs.tensors) == set(mine.tensors)
    for name, info in theirs.tensors.items():
        assert info.shape == mine.tensors[name].shape, name
        assert np.array_equal(theirs.raw(name), mine.raw(name)), name
    for key in ("clip.vision.projector_type", "clip.vision.embedding_length", "clip.vision.feed_forward_length",
                "clip.vision.block_count", "clip.vision.attention.head_count", "clip.vision.patch_size",
                "clip.vision.projection_dim", "clip.vision.attention.layer_norm_epsilon", "general.type"):
        assert theirs.metadata.get(key) == mine.metadata.get(key), key
    a = load_vision(MmprojCheckpoint(out), torch.float32, torch.device("cpu"))
    b = load_vision(HFVisionCheckpoint(open_checkpoint(d / "hf")), torch.float32, torch.device("cpu"))
    patches = torch.rand(81, 48)
    pos = torch.stack(torch.meshgrid(torch.arange(9), torch.arange(9), indexing="xy"), -1).reshape(-1, 2)
    assert torch.equal(a.encode(patches, pos), b.encode(patches, pos))

"""The audio tower and its embedder against transformers' Gemma4AudioModel + Gemma4MultimodalEmbedder."""

import numpy as np
import pytest
import torch

from audio_reference import build_audio_model, sweep
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.audio import HFAudioCheckpoint
from gemma4.errors import ModelLoadError
from gemma4.model.audio import load_audio_tower


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio_tower")
    ref = build_audio_model(path, seed=7)
    ours = load_audio_tower(HFAudioCheckpoint(open_checkpoint(path)), torch.float32, torch.device("cpu"))
    return path, ref, ours


def reference_embeddings(ref, waveforms):
    """The reference's soft tokens of each waveform, run as a padded batch through the processor's
    features and Gemma4Model.get_audio_features, padding dropped as Gemma4Model.forward drops it."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    batch = Gemma4AudioFeatureExtractor()(waveforms, return_tensors="pt")
    with torch.no_grad():
        out = ref.model.get_audio_features(batch["input_features"], batch["input_features_mask"], return_dict=True)
    return [e[m] for e, m in zip(out.pooler_output, out.attention_mask)], batch


def test_tower_equals_the_reference(built):
    from gemma4.audio_features import FeatureExtractor

    _, ref, ours = built
    rng = np.random.default_rng(3)
    # a random waveform, a sweep, and lengths that leave blocks of 12 frames part-filled
    waves = [(rng.standard_normal(23_456) * 0.2).astype(np.float32), sweep(1.0), sweep(0.35, f0=300)]
    expected, _ = reference_embeddings(ref, waves)
    for wave, want in zip(waves, expected):
        f = FeatureExtractor()(wave)
        got = ours.encode(torch.from_numpy(f.values[f.mask]))
        assert got.shape == want.shape and got.shape[0] == f.soft_tokens
        # float32 both ways; 2 conformer layers of O(1) activations: differences are rounding, ~1e-6
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_config_and_errors(built, tmp_path):
    path, ref, _ = built
    cfg = HFAudioCheckpoint(open_checkpoint(path)).config
    rc = ref.config.audio_config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, list(cfg.subsampling_conv_channels),
            cfg.output_proj_dims, cfg.text_hidden_size) == (rc.hidden_size, rc.num_hidden_layers,
                                                           rc.num_attention_heads, rc.subsampling_conv_channels,
                                                           rc.output_proj_dims, ref.config.text_config.hidden_size)
    from gemma4.model.audio import AudioModel

    with pytest.raises(ValueError, match="audio features"):
        AudioModel(cfg).encode(torch.zeros(0, 128))

    class Missing:  # a reader that lost one tensor
        config = cfg

        def __init__(self):
            self.inner = HFAudioCheckpoint(open_checkpoint(path))

        def names(self):
            return [n for n in self.inner.names() if n != "output_proj.bias"]

        def shape(self, name):
            return self.inner.shape(name)

        def tensor(self, name):
            return self.inner.tensor(name)

    with pytest.raises(ModelLoadError, match="output_proj.bias: missing"):
        load_audio_tower(Missing(), torch.float32, torch.device("cpu"))


def test_bfloat16_tower_stays_near_float32(built):
    from gemma4.audio_features import FeatureExtractor

    path, _, exact = built
    half = load_audio_tower(HFAudioCheckpoint(open_checkpoint(path)), torch.bfloat16, torch.device("cpu"))
    f = FeatureExtractor()(sweep(0.8))
    a = exact.encode(torch.from_numpy(f.values[f.mask]))
    b = half.encode(torch.from_numpy(f.values[f.mask]))
    assert b.dtype == torch.bfloat16
    b = b.float()
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 ~ 0.4%); through ~10 matmuls and norms the error
    # grows to a few percent of the output's scale, far below what a wrong weight or layout gives (~100%)
    assert (a - b).abs().max() < 0.1 * a.abs().max()

"""Broken checkpoints fail with one line naming the tensor or field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4
from gemma4.errors import ModelLoadError


@pytest.fixture
def ckpt(tmp_path, gemma4_models):
    src, _ = gemma4_models["moe_kv"]
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert "layers.1.mlp.up_proj.weight" in _one_line(e) and "missing" in str(e.value)


def test_wrong_shape(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:-1]
    _edit_tensors(ckpt, shrink)
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert "layers.0.self_attn.q_proj.weight" in _one_line(e) and "shape" in str(e.value)


def test_unexpected_tensor(ckpt):
    def add(t):
        t["model.layers.2.self_attn.v_proj.weight"] = torch.zeros(32, 48)
    _edit_tensors(ckpt, add)
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert "layers.2.self_attn.v_proj.weight" in _one_line(e)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="llama")
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert "model_type" in _one_line(e) and "llama" in str(e.value)


@pytest.mark.parametrize("field,value", [("hidden_size_per_layer_input", -1), ("num_kv_shared_layers", 99),
                                         ("use_bidirectional_attention", "all"), ("hidden_activation", "silu")])
def test_unsupported_features_refused(ckpt, field, value):
    _edit_config(ckpt, **{field: value})
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert field in _one_line(e)


def test_per_layer_embeddings_without_their_tensors(ckpt):
    _edit_config(ckpt, hidden_size_per_layer_input=8)
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert "per_layer_input_gate.weight: missing from checkpoint" in _one_line(e)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert "model.safetensors" in _one_line(e)


def test_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(tmp_path / "nothing-here")
    assert "no such file" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(tmp_path / "empty")
    assert "config.json" in _one_line(e)


@pytest.mark.parametrize("section,tower", [("vision_config", "vision"), ("audio_config", "audio")])
def test_a_tower_config_json_describes_without_its_tensors(ckpt, section, tower):
    _edit_config(ckpt, **{section: {}})
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(ckpt)
    assert f"{section} is set but the checkpoint has no {tower} tower tensors" in _one_line(e)


def test_a_tower_reader_on_a_model_without_the_tower(ckpt):
    from gemma4.checkpoint import open_checkpoint
    from gemma4.checkpoint.audio import HFAudioCheckpoint
    from gemma4.checkpoint.vision import HFVisionCheckpoint

    for reader, words in ((HFVisionCheckpoint, "no vision_config (a text-only model)"),
                          (HFAudioCheckpoint, "no audio_config (a model without audio)")):
        with pytest.raises(ModelLoadError) as e:
            reader(open_checkpoint(ckpt))
        assert words in _one_line(e)

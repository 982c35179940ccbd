"""GGUF: files written with the `gguf` writer load to the same logits as their safetensors twins;
the embedded model matches transformers' own GGUF loader; broken files fail with one line."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from gemma4.errors import ModelLoadError
from gemma4.native import ops
from reference import VOCAB, build_gemma3, build_gemma4, tiny_vocab_metadata

TOL = 1e-4  # as argued in test_decoder_parity.py


@pytest.fixture(autouse=True)
def float_activations(monkeypatch):
    """The oracles here are dequantised models: compare with float activations. The int8 activations
    of the CPU kernel (the default) are a measured approximation, bounded in test_quant.py."""
    monkeypatch.setattr(ops, "_activations", "float")


def _ids(n=30):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(3))


def _logits_of(ref, ids):
    with torch.no_grad():
        return ref(ids[None]).logits[0]


@pytest.mark.parametrize("name", ["moe_kv", "dense_kv_off"])
def test_gemma4_f32_gguf_equals_safetensors(tmp_path, name):
    ref = build_gemma4(tmp_path / "hf", name, seed=8)
    gguf_path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "F32", tiny_vocab_metadata())
    model = gemma4.load(gguf_path)
    assert model.config.architecture == "gemma4"
    hf_cfg = gemma4.load(tmp_path / "hf").config
    for field in ("layer_types", "attention_k_eq_v", "rope", "sliding_window", "num_experts", "top_k_experts",
                  "moe_intermediate_size"):
        assert getattr(model.config, field) == getattr(hf_cfg, field), field
    for fact in ("head_dim_of", "kv_heads_of", "k_eq_v"):
        assert [getattr(model.config, fact)(i) for i in range(hf_cfg.num_hidden_layers)] == \
               [getattr(hf_cfg, fact)(i) for i in range(hf_cfg.num_hidden_layers)], fact
    ids = _ids()
    assert (model.forward(ids) - _logits_of(ref, ids)).abs().max().item() <= TOL


def test_gemma3_f32_gguf_equals_safetensors(tmp_path):
    ref = build_gemma3(tmp_path / "hf", "g3_linear_rope", seed=2)
    gguf_path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "F32", tiny_vocab_metadata())
    model = gemma4.load(gguf_path)
    ids = _ids()
    assert (model.forward(ids) - _logits_of(ref, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_block_types_load_as_their_dequantized_twin(tmp_path, qtype):
    """The oracle: transformers on the same weights quantised and dequantised by the `gguf` package."""
    import gguf

    ref = build_gemma4(tmp_path / "hf", "blocks", seed=9)
    gguf_path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", qtype, tiny_vocab_metadata())
    model = gemma4.load(gguf_path)
    types = model.checkpoint.tensor_types()
    assert types.get(qtype, 0) > 0, types

    qt = gguf.GGMLQuantizationType[qtype]
    twin = load_file(tmp_path / "hf" / "model.safetensors")
    for key, t in twin.items():
        if t.dim() >= 2 and "norm" not in key:
            arr = t.float().numpy()
            if qt == gguf.GGMLQuantizationType.F16:
                arr = arr.astype(np.float16).astype(np.float32)
            else:
                arr = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt)
            twin[key] = torch.from_numpy(np.ascontiguousarray(arr)).reshape(t.shape)
    save_file(twin, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    from transformers import Gemma4ForCausalLM

    deq_ref = Gemma4ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids()
    assert (model.forward(ids) - _logits_of(deq_ref, ids)).abs().max().item() <= TOL


def test_embedded_model_matches_transformers_gguf_loader():
    """Gemma 3 270M Q4_K_M (F32, Q8_0, Q5_0, Q4_K, Q6_K tensors) against transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    from gemma4.store import embedded_path

    path = embedded_path()
    model = gemma4.load(path)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= set(model.checkpoint.tensor_types())
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor(model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4))
    with torch.no_grad():
        out = ref(ids[None], output_hidden_states=True)
    expected, h = out.logits[0], out.hidden_states[-1][0]
    # Bound, per logit: both sides compute in float32 and order the sums of all 18 layers differently
    # (and MKL / oneDNN pick their blocking per CPU). Logit v at position t is a dot product of
    # K = hidden_size terms h_t,i E_v,i; reordering a float32 sum of K terms moves it by about
    # sqrt(K) * 2^-24 * sum_i |h_t,i E_v,i| (rounding errors adding as a random walk). The factor 8 covers
    # the differences the layers below carry into h, whose relative size is of the same order. Here that
    # is ~1e-3 at the largest logits (sum |h E| ~ 100): still an order of magnitude under what a wrong
    # block scale or sub-scale does (>= 1e-2), and it follows the model's own magnitudes on any CPU.
    head = model.config.hidden_size
    bound = 8 * head**0.5 * 2.0**-24 * (h.abs() @ ref.get_output_embeddings().weight.abs().T)
    excess = ((model.forward(ids) - expected).abs() - bound).max().item()
    print(f"embedded model vs transformers GGUF: max |diff| - bound {excess:.2e}")
    assert excess <= 0


# ---- broken files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gg")
    build_gemma4(d / "hf", "dense_kv", seed=1)
    return write_gguf(open_checkpoint(d / "hf"), d / "m.gguf", "F32", tiny_vocab_metadata())


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gemma4.cli", *args], capture_output=True, text=True, timeout=120)


def _broken(tmp_path, good, edit) -> Path:
    data = bytearray(Path(good).read_bytes())
    out = tmp_path / "broken.gguf"
    out.write_bytes(bytes(edit(data)))
    return out


def _assert_one_line_exit_2(path, *words):
    with pytest.raises(ModelLoadError) as e:
        gemma4.load(path)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)
    r = _cli("run", "-m", str(path), "hello")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_truncated(tmp_path, good_gguf):
    _assert_one_line_exit_2(_broken(tmp_path, good_gguf, lambda d: d[: len(d) // 2]), "truncated")


def test_truncated_inside_the_vocabulary(tmp_path, good_gguf):
    def edit(d):
        return d[: d.index(b"tokenizer.ggml.tokens") + 200]  # a cut in the middle of the string array
    _assert_one_line_exit_2(_broken(tmp_path, good_gguf, edit), "truncated")


def test_load_leaves_torch_compiler_unimported(good_gguf):
    # Building the model's skeleton must not run torch's random inits: under the meta device they import
    # torch._dynamo, which took ~2 s of every load.
    code = ("import sys, gemma4; gemma4.load(sys.argv[1], progress=False); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(good_gguf)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_wrong_magic(tmp_path, good_gguf):
    _assert_one_line_exit_2(_broken(tmp_path, good_gguf, lambda d: b"GGUX" + d[4:]), "not a GGUF")


def test_unsupported_architecture(tmp_path, good_gguf):
    # "gemma4" -> "gemmaX" in the general.architecture value (same length, so the file stays valid)
    def edit(d):
        at = d.index(b"general.architecture") + len(b"general.architecture") + 4 + 8
        d[at:at + 6] = b"gemmaX"
        return d
    _assert_one_line_exit_2(_broken(tmp_path, good_gguf, edit), "general.architecture", "gemmaX")


def test_missing_tokenizer(tmp_path):
    build_gemma4(tmp_path / "hf", "dense_kv", seed=1)
    path = write_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "m.gguf", "F32")
    _assert_one_line_exit_2(path, "tokenizer")

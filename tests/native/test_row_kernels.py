"""The row kernels compiled for AVX-512 (row_products_avx512.cpp: int8 weights on 512-bit registers, Q4_K and Q6_K in
tiles of 8 rows) against the 256-bit ones they stand beside: the same bits for every layout, row count, block count
and output count, in one-matrix products and routed experts; and the switch that chooses (GEMMA4_ROW_KERNELS, isa.py).

The comparisons are skipped by name where the CPU lacks AVX-512 VNNI (isa.py reads the CPU); the switch's checks
run everywhere."""

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

import gemma4.native
from gemma4.checkpoint.gguf_blocks import from_gguf
from gemma4.native import isa
from gemma4.quant.formats import QuantWeight, quantize_int4, quantize_int8
from test_quant import _int4k, _int6


def _wide_here() -> bool:
    return gemma4.native.compiled() is not None and isa.has(*isa.WIDE_ROWS_FLAGS)


needs_wide = pytest.mark.skipif(not _wide_here(), reason="this CPU lacks AVX-512 VNNI (or the kernels are not built)")


@pytest.fixture
def kernel():
    """The compiled module; the row kernels the process chose are chosen again after the test."""
    module = gemma4.native.compiled()
    if module is None:
        pytest.skip("no AVX2 kernel on this machine")
    chosen = module.row_kernels()
    yield module
    module.set_row_kernels(chosen)


def _both(kernel, product):
    """product() with the 256-bit row kernels, then with the 512-bit ones."""
    out = {}
    for name in ("avx2", "avx512"):
        kernel.set_row_kernels(name)
        out[name] = product()
    return out["avx2"], out["avx512"]


def _layouts(n: int, k: int, g: torch.Generator) -> dict[str, QuantWeight]:
    """Every layout the row kernels take, n rows of k: int8 (groups 32 and 16) and int4 quantised here, int8 with f16
    scales (with and without offsets) from GGUF's Q8_0, Q5_0 and Q5_1 blocks, and, where k is whole groups of 256,
    int6 (Q6_K) and Q4_K's int4 with the extremes of every field."""
    w = torch.randn(n, k, generator=g)
    w[0, :32] = 0.0  # a block of zeros: its scale is 0
    out = {"int8": quantize_int8(w), "int8_g16": quantize_int8(w, 16), "int4": quantize_int4(w)}
    for name, qtype in {"q8_0": T.Q8_0, "q5_0": T.Q5_0, "q5_1": T.Q5_1}.items():
        out[name] = from_gguf(quantize(w.numpy(), qtype), qtype, (n, k))
    if k % 256 == 0:
        out["q6_k"], out["q4_k"] = _int6((), n, k, g), _int4k((), n, k, g)
    return out


def _activations(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=g) ** 3  # a wide range of magnitudes within a block
    x[-1, 32:64] = 0.0  # a block of zeros: its activation scale is 0
    return x


# K: 17, 18, 19 and 20 blocks of 32 (int4 takes four blocks a step, then a pair, then one), and 3 and 5 groups of 256.
@needs_wide
@pytest.mark.parametrize("k", [544, 576, 608, 640, 768, 1280])
def test_wide_row_kernels_give_the_256_bit_kernels_bits(kernel, k):
    g = torch.Generator().manual_seed(k)
    n = 37  # an odd number of outputs, more than one thread's chunk of 16
    for name, w in _layouts(n, k, g).items():
        for m in (*range(1, 10), 17):  # every row count of a tile (1 .. 8), and tiles of 8 with one row left over
            x = _activations(m, k, g)
            narrow, wide = _both(kernel, lambda: kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub))
            assert torch.equal(narrow, wide), (name, m)


@needs_wide
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K])
def test_wide_row_kernels_give_the_256_bit_kernels_bits_on_the_embedded_models_tensors(kernel, qtype):
    """Real blocks: the embedded model's first tensor of each type it holds (its output head is Q8_0), 64 rows."""
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.store import embedded_path

    f = GGUFFile(embedded_path())
    name, info = next((name, info) for name, info in f.tensors.items() if info.type == qtype)
    k = info.shape[-1]
    w = from_gguf(f.raw(name)[:64], qtype, (64, k))
    g = torch.Generator().manual_seed(2)
    for m in (1, 2, 5, 8):
        x = _activations(m, k, g)
        narrow, wide = _both(kernel, lambda: kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub))
        assert torch.equal(narrow, wide), (name, m)


@needs_wide
@pytest.mark.parametrize("layout", ["int8", "int4", "q5_1", "q6_k", "q4_k"])
def test_wide_row_kernels_give_routed_experts_the_256_bit_bits(kernel, layout):
    """The fused expert call (one row against its expert, with and without the weighted sum) on both kernels."""
    g = torch.Generator().manual_seed(5)
    e, n, k = 4, 24, 768
    stacked = _layouts(e * n, k, g)[layout]
    w = QuantWeight(stacked.bits, stacked.group, stacked.q.view(e, n, -1), stacked.scale.view(e, n, -1),
                    None if stacked.zero is None else stacked.zero.view(e, n, -1),
                    None if stacked.sub is None else stacked.sub.view(e, n, -1))
    x = _activations(6, k, g)
    ids, weights = torch.tensor([3, 0, 2, 2, 1, 3]), torch.rand(6, generator=g)
    for mix in (None, weights):
        narrow, wide = _both(kernel, lambda: kernel.qmm_experts(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids,
                                                                mix, 2))
        assert torch.equal(narrow, wide), mix is None


@needs_wide
def test_a_rows_product_does_not_depend_on_the_rows_beside_it_on_the_wide_kernels(kernel):
    """Verify == decode on the 512-bit kernels: a row in a tile of 8 gives what it gives alone."""
    kernel.set_row_kernels("avx512")
    g = torch.Generator().manual_seed(8)
    for name, w in _layouts(40, 512, g).items():
        x = _activations(11, 512, g)
        together = kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)
        alone = torch.cat([kernel.qmm_q8(x[i:i + 1], w.q, w.scale, w.zero, w.bits, w.group, w.sub) for i in range(11)])
        assert torch.equal(together, alone), name


def test_row_kernels_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("GEMMA4_ROW_KERNELS", "avx2")
    assert isa.row_kernels() == "avx2" and "AVX2" in isa.kernel_plan()
    monkeypatch.setenv("GEMMA4_ROW_KERNELS", "fast")
    with pytest.raises(ValueError, match="GEMMA4_ROW_KERNELS: 'fast' is none of auto, avx2, avx512"):
        isa.row_kernels()
    monkeypatch.delenv("GEMMA4_ROW_KERNELS")
    wide = isa.has(*isa.WIDE_ROWS_FLAGS)
    assert isa.row_kernels() == ("avx512" if wide else "avx2")
    assert ("AVX-512 VNNI" in isa.kernel_plan()) == wide


def test_the_process_runs_the_row_kernels_the_environment_names(tmp_path):
    """The choice reaches the compiled module once, at load: a fresh process with GEMMA4_ROW_KERNELS=avx2 runs the
    256-bit kernels; without it, the 512-bit ones where the CPU has them."""
    import os
    import subprocess
    import sys

    if gemma4.native.compiled() is None:
        pytest.skip("no AVX2 kernel on this machine")
    code = "import gemma4.native as n; print(n.compiled().row_kernels())"
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_ROW_KERNELS"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    forced = subprocess.run([sys.executable, "-c", code], env={**env, "GEMMA4_ROW_KERNELS": "avx2"},
                            capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "avx2"
    assert default.stdout.strip() == ("avx512" if isa.has(*isa.WIDE_ROWS_FLAGS) else "avx2")


def test_an_unknown_row_kernel_name_is_refused(kernel):
    with pytest.raises(RuntimeError, match="row kernels: avx3 is neither avx2 nor avx512"):
        kernel.set_row_kernels("avx3")

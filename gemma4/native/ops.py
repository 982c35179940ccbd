"""The native kernels' Python side: thin wrappers, and the rules that pick a kernel or the plain torch path.

Matrix products with quantised weights: y = x @ dequantize(W).T, and the decoder's small fused ops.

On the CPU the AVX2 extension (csrc/) reads the packed weights directly:

- int8 activations (the default): each row of x is rounded to int8 per block of 32 with a scale
  max|x|/127 (llama.cpp's Q8_0 activations), and each block's dot product with the int4/int6/int8
  weights is summed exactly in integers (`maddubs` + `madd`, Q4_K's and Q6_K's integer sub-scales
  included) before the float scales are applied. This is what
  reaches memory bandwidth at decode (a block of weights costs a handful of instructions) and beats
  dequantise + BLAS at prefill too (4 rows share each decoded weight block). The cost in quality
  is bounded in tests/native/test_quant.py: half an activation step per block, and on the embedded model a
  KL from float activations well under llama.cpp's own.
- many rows of a prefill (its chunks, an expert's share of one; prefill_products()) on a CPU with a matrix engine (AMX): either
  the int8 path's very integers on AMX int8 tiles, the weights as held (amx_products.cpp; the float rescale
  per block in another order than the row kernels', bounded in tests/native/test_int8_tiles.py), or the matrix
  dequantised to bf16 once per product, the rows rounded to bf16, an AMX GEMM summing in float32
  (matrix_engine.cpp): the activations keep 8 significant bits per element instead of an int8 step per block of
  32; the weights are rounded to bf16 (8 bits) — bounded with the int8 path's in tests/native/test_matrix_engine.py.
  int4 weights take that arithmetic on AMX bf16 tiles of their own (amx_bf16_products.cpp: dequantised a tile at a
  time in L1, bounded in tests/native/test_bf16_tiles.py). on_bf16_tiles() and on_int8_tiles() pick by the rows
  each matrix serves.
- float activations (GEMMA4_ACTIVATIONS=float): float32 times the widened weights, the exact product
  with the dequantised matrix up to summation order; the reference for the above.
- routed experts in one call (only the experts named are read), RMSNorm with the residual add, RoPE
  in one pass, and attention of a few queries (decode, verify steps) over the cache as it is stored:
  a sliding ring as is, a full layer's paged pool in place through its block table, K=V layers' keys
  rebuilt from the values inside the kernel.
- a decoder layer's dense parts in three calls (attn_in: norm, q/k/v, their norms, RoPE; attn_out: o and
  the residual norm; mlp_block: the gated MLP between its norms), composed of the ops above in the
  modules' order, so they give the same bits; products sharing an input (q/k/v, gate/up) quantise it
  once and run in one parallel region. And decode's one-token cache writes in one call.

torch's own int4/int8 CPU ops were measured here 10-100x slower than the bandwidth roofline at decode
shapes. Everywhere else (CUDA, no compiler) the weight is dequantised and multiplied with torch: one
matrix at a time, transiently.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from . import compiled

if TYPE_CHECKING:  # (quant imports this module)
    from ..quant.formats import QuantWeight

# Float activations: up to this many rows the kernel runs; above, dequantise + BLAS is faster.
MAX_KERNEL_ROWS = 8

_activations = None  # the mode below, read from the environment on first use (each product asks)


def activations() -> str:
    """How the CPU kernel takes activations: "int8" (rounded per block of 32, integer dot products; the
    default, as llama.cpp does) or "float" (GEMMA4_ACTIVATIONS=float: float32 times the dequantised weights,
    the reference the int8 path is measured against). Read once per process."""
    global _activations
    if _activations is None:
        mode = os.environ.get("GEMMA4_ACTIVATIONS", "int8")
        if mode not in ("int8", "float"):
            raise ValueError(f"GEMMA4_ACTIVATIONS: {mode!r} is neither int8 nor float")
        _activations = mode
    return _activations


# (Where the CPU has a matrix engine, many-row products go there first: MATRIX_ENGINE_MIN_ROWS below.)
# Integer dot products beat dequantise + BLAS at every row count for int4 and int6 weights, and for int8
# ones up to ~128 rows. Above, an int8 matrix whose float32 copy stays in the caches (the embedded model's
# 640-wide ones, <= 5 MB) is multiplied by BLAS: at 512 rows 1.4-1.6x faster (q_proj 1024 x 640: 9.1 vs
# 5.6 ms, dequantising included); a bigger one (the 26B-A4B shape's, >= 23 MB) costs as much to
# dequantise as BLAS saves. The product is then float32 throughout, without rounding the activations.
MIN_BLAS_ROWS = 192
MAX_BLAS_MATRIX = 8 << 20  # bytes of the float32 copy


def blas_first(w: QuantWeight, rows: int) -> bool:
    """Whether x [rows, K] @ w.T goes faster another way than through the int8-activation kernel: on the matrix
    engine (in a prefill), or as dequantise + BLAS."""
    if on_engine(rows):
        return True
    return rows >= MIN_BLAS_ROWS and w.bits == 8 and w.q.numel() * 4 <= MAX_BLAS_MATRIX


# From this many rows a quantised product runs faster on the matrix engine (the matrix dequantised to bf16 once,
# ~5-9 G elements/s per thread, then an AMX GEMM) than in the int8-activation kernel, whose cost grows with
# every row: measured on 26B-A4B shapes (1408 x 2816, 2816 x 704, 4096 x 2816; int8 and int4) the two meet
# between 16 rows (kernel 0.8-1.3x faster) and 32 (engine 1.4-2.5x); at 512 rows the engine is 6-12x faster.
MATRIX_ENGINE_MIN_ROWS = 24

_engine = None  # the compiled module where the matrix engine runs here, False where not; decided on first use
_prefill = threading.local()  # .depth: prefill_products() contexts open on this thread


@contextlib.contextmanager
def prefill_products():
    """Within it (a prompt's chunks, a whole-sequence forward), many-row products may go to the matrix engine.
    Outside, decode and verify steps stay on the row-by-row kernels, whose rows give the same bits however many
    run together: a speculative verify step must give decode's tokens, and an expert hit by many of its tokens
    must not change path."""
    _prefill.depth = getattr(_prefill, "depth", 0) + 1
    try:
        yield
    finally:
        _prefill.depth -= 1


def on_engine(rows: int) -> bool:
    """Whether a product of `rows` rows goes to the matrix engine: enough rows, in a prefill, int8 activations
    (the default: float ones are the exact reference), the engine here."""
    return (rows >= MATRIX_ENGINE_MIN_ROWS and getattr(_prefill, "depth", 0) > 0 and activations() == "int8"
            and matrix_engine() is not None)


def matrix_engine():
    """The compiled module where many-row products go to the matrix engine: a CPU with AMX bf16 and AVX-512 BF16
    (isa.py), the kernels built, and torch's MKL exporting its bf16 GEMM; else None."""
    global _engine
    if _engine is None:
        from .isa import matrix_engine_wanted

        kernel = compiled()
        _engine = kernel if kernel is not None and matrix_engine_wanted() and kernel.matrix_engine_gemm() else False
    return _engine or None


def engine_product(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] @ dequantize(w).T on the matrix engine, in x's dtype: int4 weights on bf16 tiles where
    on_bf16_tiles says so, on int8 tiles where on_int8_tiles does (x rounded to int8 per block of 32 as the int8
    kernels round it), else w dequantised to bf16 (its exact bf16 rounding) and x rounded to bf16, float32 sums and
    output (the bf16 tiles' arithmetic too)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if on_bf16_tiles(w, rows):
        y = bf16_tiles().amx_bf16_grouped(x2.float().contiguous(), None, w.q, w.scale, w.zero, w.bits, w.group, w.sub,
                                          [0], [0, rows])
    elif on_int8_tiles(w, rows):
        y = int8_tiles().amx_mm_grouped(x2.float().contiguous(), w.q, w.scale, w.zero, w.bits, w.group, w.sub,
                                        [0], [0, rows])
    else:
        y = matrix_engine().engine_mm_grouped(x2.to(torch.bfloat16).contiguous(), w.q, w.scale, w.zero, w.bits,
                                              w.group, w.sub, [0], [0, rows])
    return y.to(x.dtype).reshape(*lead, -1)


# The matrix engine's two ways with quantised weights, chosen per product by the rows each matrix serves: AMX int8
# tiles (amx_products.cpp: the weights read as held, the rows rounded to int8 per block of 32, a float rescale per
# block) cost in proportion to rows x N x K, ~170-210 G MAC/s per thread for int8 weights, ~130-170 for int4 (each
# tile of 16 weight rows unpacked, an offset term per block); the bf16 way dequantises the matrix once per call
# and then multiplies at MKL's AMX bf16 rate, 250-330 G MAC/s at 512 rows. Measured on the 26B-A4B shapes (experts'
# gate_up and down, the dense MLP, q; bench/int8_tiles.py, one thread, CPU time, load average ~11): int8 weights
# (Q8_0, Q5_0) on the tiles are 2.4-2.7x faster at 16 rows, 1.2-1.7x at 32-64, ~1.1x at 128, even at 160-192,
# 1.3-1.6x slower at 512. (Q4_K's were 1.4-1.8x faster at 16 rows, ~1.1x at 32, even at 48, slower from 64: int4
# weights now take the bf16 tiles below, which beat both; on the int8 tiles only with GEMMA4_MATRIX_ENGINE=int8.)
INT8_TILES_MAX_ROWS = 160  # int8 weights

_tiles = None  # the compiled module where the int8 tile products run here, False where not; decided on first use


def int8_tiles():
    """The compiled module where many-row products may take AMX int8 tiles: a CPU with AMX int8 (isa.py), the
    kernels built with them and the tile registers granted, the engine not restricted to bf16
    (GEMMA4_MATRIX_ENGINE=bf16); else None."""
    global _tiles
    if _tiles is None:
        from .isa import AMX_INT8_FLAGS, has, matrix_engine_mode

        kernel = matrix_engine()
        _tiles = (kernel if kernel is not None and has(*AMX_INT8_FLAGS) and matrix_engine_mode() != "bf16"
                  and kernel.amx_int8_ready() else False)
    return _tiles or None


def tiles_take(w) -> bool:
    """Whether the int8 tile products take this weight's layout: int8 or int4 in groups of 32, or Q4_K's."""
    return w.int8_layout and (w.bits, w.group) in ((8, 32), (4, 32), (4, 256))


def on_int8_tiles(w, rows: int) -> bool:
    """Whether a matrix-engine product whose matrices each serve `rows` rows takes the int8 tiles: the layout, the
    tiles here, int8 weights and few enough rows for the bf16 way's dequantisation not to pay
    (GEMMA4_MATRIX_ENGINE=int8: every layout the tiles take, any rows)."""
    if not tiles_take(w) or int8_tiles() is None:
        return False
    from .isa import matrix_engine_mode

    return (w.bits == 8 and rows <= INT8_TILES_MAX_ROWS) or matrix_engine_mode() == "int8"


# int4 weights (Q4_K, Q4_0/Q4_1 as held) on AMX bf16 tiles (amx_bf16_products.cpp): each tile of 32 weight rows
# dequantised to bf16 a chunk at a time in L1 (a table lookup per block), the rows rounded to bf16 once, no float
# rescale per block and no bf16 copy of the matrix: the bf16 way's arithmetic at the int8 tiles' reach. Measured
# against both (bench/int8_tiles.py, one thread, CPU time): Q4_K experts' gate_up 1.2-2x faster than the int8 tiles
# at 32-64 rows, faster than the dequantise-then-GEMM way there (1.2-1.8x), even with it at 128 rows, slower from
# 192 (1.1-1.4x at 512: its GEMM reuses each tile more).
BF16_TILES_MAX_ROWS = 96

_bf16_tiles = None  # the compiled module where int4 products take the bf16 tiles here, False where not


def bf16_tiles():
    """The compiled module where int4 products may take the AMX bf16 tiles: the matrix engine here, the kernels built
    with AMX and the tile registers granted, the default mode (GEMMA4_MATRIX_ENGINE=bf16 and int8 keep the other
    two ways to compare); else None."""
    global _bf16_tiles
    if _bf16_tiles is None:
        from .isa import matrix_engine_mode

        kernel = matrix_engine()
        _bf16_tiles = kernel if kernel is not None and matrix_engine_mode() == "on" and kernel.amx_bf16_ready() else False
    return _bf16_tiles or None


def on_bf16_tiles(w, rows: int) -> bool:
    """Whether a matrix-engine product whose matrices each serve `rows` rows takes the bf16 tiles: int4 weights in
    groups of 32 or Q4_K's, the tiles here, not so many rows that the dequantise-then-GEMM way pays."""
    return (w.int8_layout and w.bits == 4 and w.group in (32, 256) and rows <= BF16_TILES_MAX_ROWS
            and w.scale.dtype == torch.float32 and bf16_tiles() is not None)


def float_products_on_engine(device) -> bool:
    """Whether a float32 part's many-row products (a vision tower's) go to the matrix engine, its matrices held in
    bf16: on the CPU, in the default mode (GEMMA4_ACTIVATIONS=float keeps float32 as the reference), the engine here."""
    return torch.device(device).type == "cpu" and activations() == "int8" and matrix_engine() is not None


# Queries per block of engine_attention: a block's float32 scores over a few thousand keys stay in the core's L2.
ENGINE_ATTENTION_QUERIES = 128


def engine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(q k^T * scale) v, unmasked (an image's patches see each other), for q [H, T, D] and k, v [KV, S, D]
    float32 -> [H, T, D] float32: the scores in float32 (their rounding would be multiplied by the logit's size),
    the probabilities and the values rounded to bf16 for the matrix engine's P·V, float32 sums. None where it does
    not apply (few queries, outside a prefill, not float32 on the CPU, no engine): then the caller uses torch."""
    if not (q.is_cpu and q.dtype is torch.float32 and q.dim() == 3 and k.dim() == 3 and on_engine(q.shape[1])):
        return None
    heads, t, d = q.shape
    group = heads // k.shape[0]
    vt = v.transpose(1, 2).to(torch.bfloat16).contiguous()  # [KV, D, S]: the engine's right operand is [N, K]
    mm = matrix_engine().mm_bf16_f32
    out = q.new_empty(heads, t, d)
    for h in range(heads):
        kh = k[h // group]
        for t0 in range(0, t, ENGINE_ATTENTION_QUERIES):
            s = torch.matmul(q[h, t0:t0 + ENGINE_ATTENTION_QUERIES], kh.T)
            if scale != 1.0:
                s.mul_(scale)
            p = torch.softmax(s, dim=-1).to(torch.bfloat16)
            out[h, t0:t0 + ENGINE_ATTENTION_QUERIES] = mm(p, vt[h // group])
    return out


# A prefill chunk's attention goes to the matrix engine (prefill_attention.cpp: bf16 GEMMs for the scores and P.V,
# float32 sums and softmax) from this many query rows per KV head (heads of a group x queries): every chunk that
# attend_small (at most 64 rows) does not take. Measured on the 26B-A4B shape (2 threads, a loaded Xeon): a sliding
# layer over ~1K keys 1.8x torch's fused attention at 64 rows, 2.9x at 256; a full layer over 4K keys 2.5-5.5x from
# 128 to 1024 rows. Decode and verify steps (outside prefill_products) keep attend_small in any case.
ENGINE_ATTENTION_MIN_ROWS = 65
# The scores' operands q and k each as two bf16 parts (hi + lo: 16 significant bits) summed over three bf16 GEMMs
# (3; 2 where the keys are stored in bf16, exact), or each rounded once to bf16 (1): at Gemma's attention scale 1 a
# long context's scores are tens, and a single rounding moved a tiny model's logits by a mean KL of 0.003.
ENGINE_ATTENTION_SCORE_TERMS = 3


def engine_attends(q: torch.Tensor, v: torch.Tensor, sees_until: torch.Tensor | None = None) -> bool:
    """Whether prefill_attention takes queries q [B, H, T, D] over values v [B, KV, S, D] (or a pool [n, KV, BS, D]):
    in a prefill (prefill_products), int8 activations (GEMMA4_ACTIVATIONS=float keeps the float32 reference), the
    matrix engine here, enough rows, float32 or bf16 values, no (from, until) spans."""
    b, h, t, d = q.shape
    rows = (h // v.shape[1]) * t
    return (q.is_cpu and q.dtype == torch.float32 and d % 16 == 0 and v.dtype in (torch.float32, torch.bfloat16)
            and (sees_until is None or sees_until.dim() == 2) and rows >= ENGINE_ATTENTION_MIN_ROWS
            and on_engine(rows))


def prefill_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                      window: int | None, sees_until: torch.Tensor | None, scale: float,
                      blocks: torch.Tensor | None = None, rebuild=None) -> torch.Tensor | None:
    """attend_small's attention (same arguments, same masks) for a prefill chunk's many queries, on the matrix engine:
    q and each tile of keys rounded to bf16 for the scores, the probabilities and values to bf16 for P.V, float32
    sums, running softmax in float32 (the error is bounded in tests/native/test_prefill_attention.py). Key tiles no
    query sees are skipped; the cache is read in place, a tile at a time. None where engine_attends says no."""
    if k is None and rebuild is None:
        return None
    if (k is not None and k.dtype != v.dtype) or not engine_attends(q, v, sees_until):
        return None
    w, cos, sin = rebuild if rebuild is not None else (None, None, None)
    return matrix_engine().prefill_attention(q, k, v, qpos, kpos, window or 0, sees_until, scale, blocks, w, cos, sin,
                                             ENGINE_ATTENTION_SCORE_TERMS)


def grouped_product(x: torch.Tensor, w, ids: list[int], offsets: list[int],
                    rows: int | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
    """Rows offsets[g] .. offsets[g + 1] of x [P, K] times matrix ids[g] of the stacked w [E, N, K] -> [P, N], on
    the matrix engine in one call (a prefill's routed experts, their rows grouped by expert); None where it does
    not apply (then the caller multiplies expert by expert). w: a QuantWeight, a module holding one, or a bf16
    tensor (x rounded to bf16, float32 sums and output, as bf16_linear's engine products). rows: the
    row count the engine's rule judges (default P; an expert-parallel rank passes the whole batch's). tokens: the
    product's rows are x[tokens] (int64 [P]): on the int8 and bf16 tiles they are picked from x inside the call,
    without a gathered copy of x (top_k times its size)."""
    w = getattr(w, "qweight", w)
    pairs = x.shape[0] if tokens is None else tokens.shape[0]
    rows = pairs if rows is None else rows
    if isinstance(w, torch.Tensor):  # a bf16 checkpoint's stacked matrices: multiplied where they lie
        if not (x.is_cpu and w.dtype is torch.bfloat16 and w.dim() == 3 and w.is_contiguous() and on_engine(rows)):
            return None
        xb = (x if tokens is None else x[tokens]).to(torch.bfloat16).contiguous()
        return matrix_engine().engine_mm_grouped_bf16(xb, w, ids, offsets)
    if not (x.is_cpu and x.dtype is torch.float32 and getattr(w, "int8_layout", False) and on_engine(rows)):
        return None
    per_matrix = pairs / max(len(ids), 1)  # the rows each expert's matrix serves, on average
    if on_bf16_tiles(w, per_matrix):
        return bf16_tiles().amx_bf16_grouped(x.contiguous(), None if tokens is None else tokens.long().contiguous(),
                                             w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids, offsets)
    if on_int8_tiles(w, per_matrix):
        if tokens is not None:
            return int8_tiles().amx_mm_gathered(x.contiguous(), tokens.long().contiguous(), w.q, w.scale, w.zero,
                                                w.bits, w.group, w.sub, ids, offsets)
        return int8_tiles().amx_mm_grouped(x.contiguous(), w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids, offsets)
    xb = (x if tokens is None else x[tokens]).to(torch.bfloat16).contiguous()
    return matrix_engine().engine_mm_grouped(xb, w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids, offsets)


def qlinear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] @ dequantize(w).T -> [..., N]; w is one matrix ([N, ...])."""
    # Called ~130 times per decode step of a small model: the checks are kept to a few attribute reads.
    kernel = compiled() if x.is_cpu and x.dtype is torch.float32 else None
    if kernel is not None:
        rows = x.numel() // x.shape[-1]
        if w.int8_layout and on_engine(rows):
            return engine_product(x, w)
        if w.int8_layout and activations() == "int8" and not blas_first(w, rows):
            return kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if x2.shape[0] <= MAX_KERNEL_ROWS and w.sub is None and w.scale.dtype == torch.float32:
            return kernel.qmm(x2, w.q, w.scale, w.zero, w.bits, w.group).reshape(*lead, -1)
    return F.linear(x, w.dequantize(x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """residual + x * (mean(x^2) + eps)^-0.5 * weight in one native pass instead of six small aten ops (the
    same rounding order; only the sum of squares is ordered differently); None where it does not apply."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or (residual is not None and residual.dtype != x.dtype):
        return None
    kernel = compiled()
    if kernel is None:
        return None
    return kernel.rms_norm(x.contiguous(), weight, eps, None if residual is None else residual.contiguous())


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor | None:
    """Rotate-half RoPE of x [B, T, heads, D] at positions [B, T] (negative ones as 0) in one native pass;
    None where it does not apply."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    kernel = compiled()
    return None if kernel is None else kernel.rope(x, positions, inv_freq)


# bf16 weights on a CPU without bf16 arithmetic (AVX2): up to this many rows of activations (decode,
# verify steps) the kernel reads the weights once; above it (prefill) the matrix is widened to float32
# for the product, one matrix at a time (the widening costs a few % of a 512-row product, and float32
# GEMM runs ~2.5x torch's bf16 GEMM here).
MAX_BF16_KERNEL_ROWS = 16


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] @ w.T for a bf16 matrix w [N, K] on the CPU, float32 sums, in x's dtype; None where
    this does not apply (then the caller multiplies with torch)."""
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous():
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    kernel = compiled()
    if kernel is None:
        return None
    if x2.shape[0] > MAX_BF16_KERNEL_ROWS:
        if on_engine(x2.shape[0]):  # the weights are bf16 already: only the activations are rounded
            return matrix_engine().mm_bf16_f32(x2.to(torch.bfloat16), w).to(x.dtype).reshape(*lead, -1)
        return (x2.float() @ w.float().T).to(x.dtype).reshape(*lead, -1)
    return kernel.bf16mm(x2.float().contiguous(), w).to(x.dtype).reshape(*lead, -1)


def expert_matmul(x: torch.Tensor, w, ids: torch.Tensor, weights: torch.Tensor | None = None,
                  top_k: int = 1) -> torch.Tensor | None:
    """Row j of x [J, K] times expert ids[j] of the stacked w [E, N, K] -> [J, N]; with weights [J], the
    weighted sum over each token's top_k consecutive rows -> [J / top_k, N]. One native call that reads
    only the experts named; None where it does not apply (a float matrix, a layout or a device the kernel
    does not take: then the caller loops over the experts). w: a QuantWeight, a module holding one
    (QuantParam), or a float tensor."""
    w = getattr(w, "qweight", w)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or activations() != "int8"
            or not getattr(w, "int8_layout", False)):
        return None
    kernel = compiled()
    if kernel is None:
        return None
    return kernel.qmm_experts(x.contiguous(), w.q, w.scale, w.zero, w.bits, w.group, w.sub, ids.contiguous(),
                              None if weights is None else weights.float().contiguous(), top_k)


# Queries per KV head up to which attention runs in the native kernel (decode, verify steps); above it
# (prefill) torch's fused attention, whose blocked GEMMs win at many queries.
MAX_SMALL_ATTENTION_ROWS = 64
ATTENTION_CHUNK = 64  # keys per work item of attend_small (a paged pool's blocks hold whole chunks)


def put_tokens(stored: dict[str, torch.Tensor], new: dict[str, torch.Tensor], i0: list[int], i1: list[int],
               pos_table: torch.Tensor | None = None, positions: list[int] | None = None) -> bool:
    """Decode's one-token cache write: new[n][b, :, 0] -> stored[n][i0[b], :, i1[b]] for every name n and
    every b with i0[b] >= 0 (and positions[b] -> pos_table[i0[b], i1[b]]) in one native call; False where it
    does not apply (then the caller writes with torch)."""
    kernel = compiled()
    if kernel is None or not all(t.device.type == "cpu" for t in new.values()):
        return False
    kernel.put_tokens([stored[n] for n in new], list(new.values()), i0, i1, pos_table, positions or [])
    return True


def small_attention(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attend_small takes these queries q [B, H, T, D] over values v [B, KV, S, D] (in some dtype
    it reads): few queries per KV head, on the CPU, with the kernel built."""
    b, h, t, d = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.float32 and v.dtype in (torch.float32, torch.bfloat16)
            and d % 8 == 0 and (h // v.shape[1]) * t <= MAX_SMALL_ATTENTION_ROWS and compiled() is not None)


def attend_small(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                 window: int | None, sees_until: torch.Tensor | None, scale: float,
                 blocks: torch.Tensor | None = None, rebuild=None) -> torch.Tensor | None:
    """softmax(q k^T * scale, masked as attention_mask masks) v for a few queries, read straight from a
    float32 or bf16 cache: q [B, H, T, D] float32, kpos [B, S], k, v [B, KV, S, D] -> [B, H, T, D] float32.
    With blocks [B, n] (ids of blocks of a paged pool), k, v are the pools [blocks, KV, block, D] and key
    slot s of row b lives in block blocks[b, s // block] at offset s % block (block a multiple of 64).
    K=V layers pass k None and rebuild = (k_norm weight [D], cos, sin [positions, r]): each key is rebuilt
    from its value as keys_from_values does, RoPE on the first r pairs.
    None where it does not apply (then the caller uses torch)."""
    if k is None:
        if rebuild is None:
            return None
        k = v
    elif rebuild is not None:
        raise ValueError("attend_small: keys are either stored or rebuilt, not both")
    if k.dtype != v.dtype or not small_attention(q, v) or (blocks is not None and k.shape[2] % ATTENTION_CHUNK):
        return None
    w, cos, sin = rebuild if rebuild is not None else (None, None, None)
    return compiled().attend_small(q, k, v, qpos, kpos, window or 0, sees_until, scale, blocks, w, cos, sin)


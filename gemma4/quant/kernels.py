"""Matrix products with quantised weights: y = x @ dequantize(W).T, and the decoder's small fused ops.

On the CPU a small AVX2 extension (compiled once by torch.utils.cpp_extension, cached by a hash of
its source) reads the packed weights directly:

- int8 activations (the default): each row of x is rounded to int8 per block of 32 with a scale
  max|x|/127 (llama.cpp's Q8_0 activations), and each block's dot product with the int4/int6/int8
  weights is summed exactly in integers (`maddubs` + `madd`, Q4_K's and Q6_K's integer sub-scales
  included) before the float scales are applied. This is what
  reaches memory bandwidth at decode (a block of weights costs a handful of instructions) and beats
  dequantise + BLAS at prefill too (4 rows share each decoded weight block). The cost in quality
  is bounded in tests/test_quant.py: half an activation step per block, and on the embedded model a
  KL from float activations well under llama.cpp's own.
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

import hashlib
import os
import threading

import torch
from torch.nn import functional as F

from .formats import QuantWeight

# Float activations: up to this many rows the kernel runs; above, dequantise + BLAS is faster.
MAX_KERNEL_ROWS = 8

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <algorithm>
#include <utility>

// Releases the GIL for the call when this thread holds it (a call from Python); the fused ops below call
// the others from C++, where it is already released.
struct NoGil {
    c10::optional<pybind11::gil_scoped_release> release;
    NoGil() { if (PyGILState_Check()) release.emplace(); }
};

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
// Weights stream from memory once per token: a prefetch this far ahead of the rows being read keeps
// enough loads in flight while the core computes (the Q8_0 head of the embedded model: 11.0 -> 9.0 ms,
// against 9-10 ms for torch to sum the same bytes). One call per 64 bytes read.
constexpr int64_t PREFETCH_AHEAD = 2048;
static inline void prefetch_ahead(const void* p) { _mm_prefetch((const char*)p + PREFETCH_AHEAD, _MM_HINT_T0); }

static inline __m256 u8f(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static inline __m256 i8f(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// out[m, n] = sum_k x[m, k] * (scale[n, k/g] * q[n, k] + zero[n, k/g])
torch::Tensor qmm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                  int64_t bits, int64_t group) {
    const NoGil no_gil;  // other Python threads (the HTTP server) run during the product
    const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / group;
    auto out = torch::empty({M, N}, x.options());
    // Per-group sums of x carry the offsets: sum_k x*zero = sum_g zero_g * sum_{k in g} x_k.
    torch::Tensor xs;
    const bool has_zero = zero_opt.has_value();
    if (has_zero) xs = x.view({M, G, group}).sum(-1).contiguous();
    const float* X = x.data_ptr<float>();
    const uint8_t* Q = (const uint8_t*)q.data_ptr();
    const float* S = scale.data_ptr<float>();
    const float* Z = has_zero ? zero_opt->data_ptr<float>() : nullptr;
    const float* XS = has_zero ? xs.data_ptr<float>() : nullptr;
    float* O = out.data_ptr<float>();
    const int64_t row_bytes = bits == 4 ? K / 2 : K;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* qr = Q + n * row_bytes;
            const float* sr = S + n * G;
            for (int64_t m = 0; m < M; ++m) {
                const float* xr = X + m * K;
                __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
                if (bits == 4) {
                    const __m128i lowmask = _mm_set1_epi8(15);
                    for (int64_t g = 0; g < G; ++g) {
                        __m128i v = _mm_loadu_si128((const __m128i*)(qr + g * 16));
                        __m128i lo = _mm_and_si128(v, lowmask);
                        __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), lowmask);
                        const float* xg = xr + g * 32;
                        __m256 t0 = _mm256_mul_ps(u8f(lo), _mm256_loadu_ps(xg));
                        __m256 t1 = _mm256_mul_ps(u8f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xg + 8));
                        t0 = _mm256_fmadd_ps(u8f(hi), _mm256_loadu_ps(xg + 16), t0);
                        t1 = _mm256_fmadd_ps(u8f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xg + 24), t1);
                        if (g & 1) acc2 = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(sr[g]), acc2);
                        else acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(sr[g]), acc);
                    }
                } else if (group == 32) {
                    for (int64_t g = 0; g < G; ++g) {
                        const int8_t* qg = (const int8_t*)qr + g * 32;
                        const float* xg = xr + g * 32;
                        __m128i a = _mm_loadu_si128((const __m128i*)qg), b = _mm_loadu_si128((const __m128i*)(qg + 16));
                        __m256 t0 = _mm256_mul_ps(i8f(a), _mm256_loadu_ps(xg));
                        __m256 t1 = _mm256_mul_ps(i8f(_mm_srli_si128(a, 8)), _mm256_loadu_ps(xg + 8));
                        t0 = _mm256_fmadd_ps(i8f(b), _mm256_loadu_ps(xg + 16), t0);
                        t1 = _mm256_fmadd_ps(i8f(_mm_srli_si128(b, 8)), _mm256_loadu_ps(xg + 24), t1);
                        if (g & 1) acc2 = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(sr[g]), acc2);
                        else acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(sr[g]), acc);
                    }
                } else {  // int8, group 16
                    for (int64_t g = 0; g < G; ++g) {
                        const int8_t* qg = (const int8_t*)qr + g * 16;
                        const float* xg = xr + g * 16;
                        __m128i a = _mm_loadu_si128((const __m128i*)qg);
                        __m256 t0 = _mm256_mul_ps(i8f(a), _mm256_loadu_ps(xg));
                        __m256 t1 = _mm256_mul_ps(i8f(_mm_srli_si128(a, 8)), _mm256_loadu_ps(xg + 8));
                        if (g & 1) acc2 = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(sr[g]), acc2);
                        else acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(sr[g]), acc);
                    }
                }
                float y = hsum(_mm256_add_ps(acc, acc2));
                if (has_zero) {
                    const float* zr = Z + n * G;
                    const float* xsr = XS + m * G;
                    for (int64_t g = 0; g < G; ++g) y += zr[g] * xsr[g];
                }
                O[m * N + n] = y;
            }
        }
    });
    return out;
}

// ---- int8 activations: each row quantised per block of 32 (scale max|x|/127), as llama.cpp's Q8_0 ----
// XQ int8 [M, K]; XD [M, K/32] the block scales; XS [M, K/32] = XD * sum of the block's XQ (offset terms).
// pair4 (for int4 weights): each pair of blocks b, b + 1 is stored as x_b[0:16] x_b+1[0:16] x_b[16:32]
// x_b+1[16:32], the order of the nibbles of one 32-byte weight load (see pair4 below); an odd last
// block stays as it is. XD and XS keep block order.
// One row of int8 activations (B blocks of 32) into the pair4 order, in place: swap x_b[16:32] and x_b+1[0:16].
static void pair_blocks(int8_t* row, int64_t B) {
    for (int64_t b = 0; b + 2 <= B; b += 2) {
        int8_t* p = row + b * 32;
        const __m128i a = _mm_loadu_si128((const __m128i*)(p + 16)), c = _mm_loadu_si128((const __m128i*)(p + 32));
        _mm_storeu_si128((__m128i*)(p + 16), c);
        _mm_storeu_si128((__m128i*)(p + 32), a);
    }
}

static void quantize_rows(const float* X, int64_t M, int64_t K, int8_t* XQ, float* XD, float* XS, bool pair4 = false) {
    const int64_t B = K / 32;
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t b = 0; b < B; ++b) {
            const float* x = X + m * K + b * 32;
            __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
            __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                      _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float d = _mm_cvtss_f32(h) / 127.0f;
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            const __m256 vid = _mm256_set1_ps(id);
            const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rnd));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rnd));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rnd));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rnd));
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_hadd_epi32(s4, s4);
            s4 = _mm_hadd_epi32(s4, s4);
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i*)(XQ + m * K + b * 32), _mm256_permutevar8x32_epi32(p, perm));
            XD[m * B + b] = d;
            XS[m * B + b] = d * (float)_mm_cvtsi128_si32(s4);
        }
        if (pair4) pair_blocks(XQ + m * K, B);
    }
}

// The 32 weights of block b of a row as bytes for maddubs: int4 unsigned 0..15 (used as is); int8
// signed (maddubs wants unsigned x signed: |w| against x carrying w's sign, llama.cpp's trick).
template <int BITS>
static inline __m256i load_block(const uint8_t* qr, int64_t b) {
    if (BITS == 4) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(qr + b * 16));
        const __m128i m15 = _mm_set1_epi8(15);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m15), _mm_and_si128(v, m15));
    }
    return _mm256_loadu_si256((const __m256i*)(qr + b * 32));
}

template <int BITS>
static inline __m256 block_dot(__m256i w, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)x);
    __m256i p;
    if (BITS == 4) p = _mm256_maddubs_epi16(w, xv);
    else p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// Scales (and offsets) are float32, or f16 as GGUF's Q8_0 and Q5 blocks hold them (widened exactly by F16C).
static inline float scale_at(const float* s, int64_t i) { return s[i]; }
static inline float scale_at(const uint16_t* s, int64_t i) { return _cvtsh_ss(s[i]); }
static inline __m256 scale8(const float* s) { return _mm256_loadu_ps(s); }
static inline __m256 scale8(const uint16_t* s) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)s)); }

template <typename ST>
static inline float dot_scales(const ST* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(scale8(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += scale_at(a, i) * b[i];
    return s;
}

template <int BITS, bool G16, typename ST>
static inline __m256 block_scale(const ST* sr, int64_t b) {
    if (G16) return _mm256_set_m128(_mm_set1_ps(scale_at(sr, 2 * b + 1)), _mm_set1_ps(scale_at(sr, 2 * b)));
    return _mm256_set1_ps(scale_at(sr, b));
}

// MR activation rows against one weight row: out[r * ostride] for r < MR. G16: weight scales per 16.
// The offsets' share, sum_b zero[b] * XS[r, b], is a separate short dot product (no scalar chain).
// int4 blocks b, b + 1 from one 32-byte load: its low nibbles are elements 0-15 of block b (low half)
// and of block b + 1 (high half), its high nibbles elements 16-31. The activations of such a pair are
// laid out to match (quantize_rows with pair4), so two maddubs cover both blocks and each 128-bit half
// of the sums carries one block, scaled by one FMA with (s_b xd_b | s_b+1 xd_b+1).
// 32 bytes at qr + 16 b split into their low and high nibbles: for an int4 pair, elements 0-15 and 16-31
// of blocks b | b + 1 (one per 128-bit half); for int6, the low 4 bits of two whole blocks.
struct Nibbles { __m256i lo, hi; };

static inline Nibbles load_pair(const uint8_t* qr, int64_t b) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(qr + b * 16));
    const __m256i m15 = _mm256_set1_epi8(15);
    return {_mm256_and_si256(v, m15), _mm256_and_si256(_mm256_srli_epi16(v, 4), m15)};
}

// 16-bit sums of pairs of products of the pair's weights with one row's paired activations x.
static inline __m256i pair_sums(Nibbles w, const int8_t* x) {
    return _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, _mm256_loadu_si256((const __m256i*)x)),
                            _mm256_maddubs_epi16(w.hi, _mm256_loadu_si256((const __m256i*)(x + 32))));
}

template <int MR>
static inline void pair4(const uint8_t* qr, const float* sr, int64_t b, const int8_t* XQ, const float* XD,
                         int64_t B, int64_t K, __m256* acc) {
    const Nibbles w = load_pair(qr, b);
    const __m128 ws = _mm_castpd_ps(_mm_load_sd((const double*)(sr + b)));
    const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (int r = 0; r < MR; ++r) {
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(pair_sums(w, XQ + r * K + b * 32), _mm256_set1_epi16(1)));
        const __m128 d2 = _mm_mul_ps(ws, _mm_castpd_ps(_mm_load_sd((const double*)(XD + r * B + b))));
        acc[r] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d2), halves), acc[r]);
    }
}

template <int BITS, bool G16, int MR, typename ST = float>
static inline void row_dot(const uint8_t* qr, const ST* sr, const ST* zr, int64_t B, const int8_t* XQ,
                           const float* XD, const float* XS, int64_t K, float* out, int64_t ostride) {
    __m256 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
    int64_t b = 0;
    if constexpr (BITS == 4) {  // pairs of blocks, two FMA chains (the tail block below, unpaired)
        __m256 acc2[MR];
        for (int r = 0; r < MR; ++r) acc2[r] = _mm256_setzero_ps();
        for (; b + 4 <= B; b += 4) {
            prefetch_ahead(qr + b * 16);
            pair4<MR>(qr, sr, b, XQ, XD, B, K, acc);
            pair4<MR>(qr, sr, b + 2, XQ, XD, B, K, acc2);
        }
        if (b + 2 <= B) {
            pair4<MR>(qr, sr, b, XQ, XD, B, K, acc);
            b += 2;
        }
        for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(acc[r], acc2[r]);
    } else {  // two blocks per step: two FMA chains per row hide their latency. The same order for every MR, so
       // a row's result never depends on how many rows share the call (speculative verify == decode).
        __m256 acc2[MR];
        for (int r = 0; r < MR; ++r) acc2[r] = _mm256_setzero_ps();
        for (; b + 2 <= B; b += 2) {
            prefetch_ahead(qr + b * 32);
            const __m256i w0 = load_block<BITS>(qr, b), w1 = load_block<BITS>(qr, b + 1);
            const __m256 s0 = block_scale<BITS, G16>(sr, b), s1 = block_scale<BITS, G16>(sr, b + 1);
            for (int r = 0; r < MR; ++r) {
                const int8_t* x = XQ + r * K + b * 32;
                const float* xd = XD + r * B + b;
                acc[r] = _mm256_fmadd_ps(block_dot<BITS>(w0, x), _mm256_mul_ps(s0, _mm256_set1_ps(xd[0])), acc[r]);
                acc2[r] = _mm256_fmadd_ps(block_dot<BITS>(w1, x + 32), _mm256_mul_ps(s1, _mm256_set1_ps(xd[1])), acc2[r]);
            }
        }
        for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(acc[r], acc2[r]);
    }
    for (; b < B; ++b) {
        const __m256i w = load_block<BITS>(qr, b);
        const __m256 ws = block_scale<BITS, G16>(sr, b);
        for (int r = 0; r < MR; ++r) {
            const __m256 d = _mm256_mul_ps(ws, _mm256_set1_ps(XD[r * B + b]));
            acc[r] = _mm256_fmadd_ps(block_dot<BITS>(w, XQ + r * K + b * 32), d, acc[r]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        float y = hsum(acc[r]);
        if (zr != nullptr) y += dot_scales(zr, XS + r * B, B);
        out[r * ostride] = y;
    }
}

template <int BITS, bool G16, typename ST = float>
static void rows_dot(int MR, const uint8_t* qr, const ST* sr, const ST* zr, int64_t B, const int8_t* XQ,
                     const float* XD, const float* XS, int64_t K, float* out, int64_t ostride) {
    switch (MR) {
        case 1: row_dot<BITS, G16, 1, ST>(qr, sr, zr, B, XQ, XD, XS, K, out, ostride); break;
        case 2: row_dot<BITS, G16, 2, ST>(qr, sr, zr, B, XQ, XD, XS, K, out, ostride); break;
        case 3: row_dot<BITS, G16, 3, ST>(qr, sr, zr, B, XQ, XD, XS, K, out, ostride); break;
        default: row_dot<BITS, G16, 4, ST>(qr, sr, zr, B, XQ, XD, XS, K, out, ostride); break;
    }
}

// int6 (Q6_K) weights, per unit of 128 elements (4 blocks of 32): 32 bytes of the low 4 bits of
// blocks 0 | 1 (low | high nibble), 32 bytes of blocks 2 | 3, 32 bytes of bits 4-5 (block j at bits
// 2j, 2j+1). The codes c in 0..63 go into maddubs unsigned; their offset -32 is applied once per 256
// through the activations' sums per 16 (XS16). The 16-element sub-scales multiply in integers (madd);
// then one float scale d * xd per block, in the same order for any MR.
template <int MR>
static inline void six_block(__m256i code, int j, __m256i s16, const __m256* dx, int64_t b, const int8_t* XQ,
                             int64_t K, __m256* acc) {
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    const __m256i lane = _mm256_set1_epi32(j);
    // lanes 0-7 (elements 0-15) the sub-scale 2j, lanes 8-15 the sub-scale 2j + 1
    const __m256i sc = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(s16, lane), pick);
    for (int r = 0; r < MR; ++r) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(XQ + r * K + b * 32));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(code, xv), sc);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(dx[r], lane), acc[r]);
    }
}

template <int MR>
static inline void row_dot6(const uint8_t* qr, const float* dr, const int8_t* sub, int64_t B, const int8_t* XQ,
                            const float* XD, const int16_t* XS16, int64_t K, float* out, int64_t ostride) {
    __m256 acc[MR];  // one chain per row (with 4 rows, two would spill the 16 registers)
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i m30 = _mm256_set1_epi8(0x30);
    for (int64_t s = 0; s < B / 8; ++s) {  // super-blocks of 256: one d, 16 sub-scales
        const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(sub + 16 * s)));
        __m256 dx[MR];  // lane j: d * xd of block j, for every row
        for (int r = 0; r < MR; ++r) {  // lane j: block j's sum over its two 16s of sub * sum(x)
            dx[r] = _mm256_mul_ps(_mm256_loadu_ps(XD + r * B + 8 * s), _mm256_set1_ps(dr[s]));
            const __m256i c = _mm256_madd_epi16(s16, _mm256_loadu_si256((const __m256i*)(XS16 + r * (K / 16) + 16 * s)));
            acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c), _mm256_mul_ps(dx[r], _mm256_set1_ps(32.0f)), acc[r]);
        }
        for (int h = 0; h < 2; ++h) {
            const uint8_t* unit = qr + (2 * s + h) * 96;
            prefetch_ahead(unit);
            prefetch_ahead(unit + 64);
            const Nibbles n01 = load_pair(unit, 0), n23 = load_pair(unit, 2);  // blocks 0 | 1, 2 | 3
            const __m256i high = _mm256_loadu_si256((const __m256i*)(unit + 64));
            const int64_t b = 8 * s + 4 * h;
            six_block<MR>(_mm256_or_si256(n01.lo, _mm256_and_si256(_mm256_slli_epi16(high, 4), m30)),
                          4 * h, s16, dx, b, XQ, K, acc);
            six_block<MR>(_mm256_or_si256(n01.hi, _mm256_and_si256(_mm256_slli_epi16(high, 2), m30)),
                          4 * h + 1, s16, dx, b + 1, XQ, K, acc);
            six_block<MR>(_mm256_or_si256(n23.lo, _mm256_and_si256(high, m30)),
                          4 * h + 2, s16, dx, b + 2, XQ, K, acc);
            six_block<MR>(_mm256_or_si256(n23.hi, _mm256_and_si256(_mm256_srli_epi16(high, 2), m30)),
                          4 * h + 3, s16, dx, b + 3, XQ, K, acc);
        }
    }
    for (int r = 0; r < MR; ++r) out[r * ostride] = hsum(acc[r]);
}

// The int8 activations' sums per 16 (int6's offset term): XS16 [M, K/16].
static std::vector<int16_t> sums16(const int8_t* XQ, int64_t M, int64_t K) {
    std::vector<int16_t> out(M * (K / 16));
    for (int64_t i = 0; i < M * (K / 16); ++i) {
        int s = 0;
        for (int e = 0; e < 16; ++e) s += XQ[i * 16 + e];
        out[i] = (int16_t)s;
    }
    return out;
}

static void rows_dot6(int MR, const uint8_t* qr, const float* dr, const int8_t* sub, int64_t B, const int8_t* XQ,
                      const float* XD, const int16_t* XS16, int64_t K, float* out, int64_t ostride) {
    switch (MR) {
        case 1: row_dot6<1>(qr, dr, sub, B, XQ, XD, XS16, K, out, ostride); break;
        case 2: row_dot6<2>(qr, dr, sub, B, XQ, XD, XS16, K, out, ostride); break;
        case 3: row_dot6<3>(qr, dr, sub, B, XQ, XD, XS16, K, out, ostride); break;
        default: row_dot6<4>(qr, dr, sub, B, XQ, XD, XS16, K, out, ostride); break;
    }
}

// int4 with Q4_K's scales: per super-block of 256, float d and zero (-dmin); per block of 32 the integer
// sub-scale sc and offset m (sub[2b], sub[2b + 1], 0..63): w = d sc q + zero m. Pairs of blocks as pair4
// (one 32-byte load, activations laid out to match); sc multiplies in integers (madd); the offsets go in
// once per super-block: zero * sum_b m_b * XS_b, XS_b = xd_b * sum of the block's int8 activations.
template <int MR>
static inline void row_dot4k(const uint8_t* qr, const float* dr, const float* zr, const int8_t* sub, int64_t B,
                             const int8_t* XQ, const float* XD, const float* XS, int64_t K, float* out,
                             int64_t ostride) {
    __m256 acc[MR];  // one chain per row (with 4 rows, two would spill the 16 registers)
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1);
    for (int64_t s = 0; s < B / 8; ++s) {
        prefetch_ahead(qr + s * 128);
        prefetch_ahead(qr + s * 128 + 64);
        // 32-bit lane j: (sc_j, m_j) as two int16
        const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(sub + 16 * s)));
        const __m256 mf = _mm256_cvtepi32_ps(_mm256_srai_epi32(s16, 16));  // m_j
        __m256 dx[MR];
        for (int r = 0; r < MR; ++r) {
            dx[r] = _mm256_mul_ps(_mm256_loadu_ps(XD + r * B + 8 * s), _mm256_set1_ps(dr[s]));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(mf, _mm256_set1_ps(zr[s])), _mm256_loadu_ps(XS + r * B + 8 * s), acc[r]);
        }
        for (int p = 0; p < 4; ++p) {  // blocks 2p, 2p + 1 of the super-block
            const int64_t b = 8 * s + 2 * p;
            const Nibbles w = load_pair(qr, b);
            const __m256i lanes = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
            const __m256i sc = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(s16, lanes), pick);
            for (int r = 0; r < MR; ++r) {
                const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pair_sums(w, XQ + r * K + b * 32), sc));
                acc[r] = _mm256_fmadd_ps(f, _mm256_permutevar8x32_ps(dx[r], lanes), acc[r]);
            }
        }
    }
    for (int r = 0; r < MR; ++r) out[r * ostride] = hsum(acc[r]);
}

static void rows_dot4k(int MR, const uint8_t* qr, const float* dr, const float* zr, const int8_t* sub, int64_t B,
                       const int8_t* XQ, const float* XD, const float* XS, int64_t K, float* out, int64_t ostride) {
    switch (MR) {
        case 1: row_dot4k<1>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
        case 2: row_dot4k<2>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
        case 3: row_dot4k<3>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
        default: row_dot4k<4>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
    }
}

// A weight's scales and offsets as the kernels read them: float32, or f16 (int8 only).
struct Scales {
    const float* f32 = nullptr;
    const float* z32 = nullptr;
    const uint16_t* f16 = nullptr;
    const uint16_t* z16 = nullptr;
    Scales(const torch::Tensor& scale, const c10::optional<torch::Tensor>& zero, int64_t bits) {
        const bool half = scale.scalar_type() == torch::kHalf;
        TORCH_CHECK(!zero.has_value() || zero->scalar_type() == scale.scalar_type(), "scales and offsets differ in dtype");
        TORCH_CHECK(!half || bits == 8, "f16 scales are for int8 weights");
        if (half) {
            f16 = (const uint16_t*)scale.data_ptr();
            z16 = zero.has_value() ? (const uint16_t*)zero->data_ptr() : nullptr;
        } else {
            f32 = scale.data_ptr<float>();
            z32 = zero.has_value() ? zero->data_ptr<float>() : nullptr;
        }
    }
};

static void check_layout(const char* what, int64_t K, int64_t bits, int64_t group, bool has_zero, bool has_sub) {
    const bool ok = bits == 6 ? (K % 256 == 0 && group == 256 && has_sub && !has_zero)
                  : bits == 4 && group == 256 ? (K % 256 == 0 && has_sub && has_zero)
                  : K % 32 == 0 && !has_sub && (group == 32 || (group == 16 && bits == 8 && !has_zero));
    TORCH_CHECK(ok, what, ": unsupported layout");
}

constexpr int64_t ROW_TILE = 4;  // rows of x per weight row: 4 x 2 FMA chains fit the 16 registers (8 spilled)

// One matrix of a product: its packed rows, scales and layout (check_layout's).
struct Weight {
    const uint8_t* Q;
    Scales sc;
    const int8_t* SUB;
    int64_t bits, group, N, row_bytes, G;
    Weight(const torch::Tensor& q, const torch::Tensor& scale, const c10::optional<torch::Tensor>& zero,
           int64_t bits_, int64_t group_, const c10::optional<torch::Tensor>& sub, int64_t K, const char* what)
        : Q((const uint8_t*)q.data_ptr()), sc(scale, zero, bits_),
          SUB(sub.has_value() ? sub->data_ptr<int8_t>() : nullptr), bits(bits_), group(group_), N(q.size(0)),
          row_bytes(bits_ == 4 ? K / 2 : bits_ == 6 ? K / 4 * 3 : K), G(K / group_) {
        check_layout(what, K, bits, group, zero.has_value(), sub.has_value());
    }
};

// x rounded to int8 per block of 32, in the layouts the weights at hand read: plain (int8, int6; with
// int6's sums per 16) and paired (int4; see quantize_rows). XD, XS are the same for both.
struct Activations {
    torch::Tensor xq, xp, xd, xs;
    std::vector<int16_t> x16;
    int64_t M, K, B;
    Activations(const torch::Tensor& x, bool plain, bool paired, bool sums) : M(x.size(0)), K(x.size(1)), B(x.size(1) / 32) {
        xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
        xd = torch::empty({M, B}, x.options());
        xs = torch::empty({M, B}, x.options());
        quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>(), !plain);
        if (plain && paired) {  // the paired copy of the plain rows
            xp = xq.clone();
            for (int64_t m = 0; m < M; ++m) pair_blocks(xp.data_ptr<int8_t>() + m * K, B);
        } else if (paired) {
            xp = xq;
        }
        if (sums) x16 = sums16(xq.data_ptr<int8_t>(), M, K);
        plain_q = xq.data_ptr<int8_t>();
        paired_q = paired ? xp.data_ptr<int8_t>() : nullptr;
        d = xd.data_ptr<float>();
        s = xs.data_ptr<float>();
    }
    // Raw pointers, taken once: data_ptr<T>() checks the dtype on every call, a cost per weight row.
    const int8_t* plain_q;
    const int8_t* paired_q;
    const float* d;
    const float* s;
};

// Weight row n (of all of w's rows, experts' stacked) against MR activation rows m0.. of a, into o[r * ostride].
static inline void dot_rows(const Weight& w, const Activations& a, int64_t n, int64_t m0, int MR, float* o,
                            int64_t ostride) {
    const int64_t K = a.K, B = a.B, G = w.G;
    const int8_t* xq_t = (w.bits == 4 ? a.paired_q : a.plain_q) + m0 * K;
    const float* xd_t = a.d + m0 * B;
    const float* xs_t = a.s + m0 * B;
    const uint8_t* qr = w.Q + n * w.row_bytes;
    const float* sr = w.sc.f32 ? w.sc.f32 + n * G : nullptr;
    const float* zr = w.sc.z32 ? w.sc.z32 + n * G : nullptr;
    if (w.sc.f16) {  // int8 with GGUF's f16 scales
        const uint16_t* srh = w.sc.f16 + n * G;
        const uint16_t* zrh = w.sc.z16 ? w.sc.z16 + n * G : nullptr;
        if (w.group == 32) rows_dot<8, false>(MR, qr, srh, zrh, B, xq_t, xd_t, xs_t, K, o, ostride);
        else rows_dot<8, true>(MR, qr, srh, zrh, B, xq_t, xd_t, xs_t, K, o, ostride);
    } else if (w.bits == 6) rows_dot6(MR, qr, sr, w.SUB + n * (K / 16), B, xq_t, xd_t, a.x16.data() + m0 * (K / 16), K, o, ostride);
    else if (w.bits == 4 && w.group == 256) rows_dot4k(MR, qr, sr, zr, w.SUB + n * (K / 16), B, xq_t, xd_t, xs_t, K, o, ostride);
    else if (w.bits == 4) rows_dot<4, false>(MR, qr, sr, zr, B, xq_t, xd_t, xs_t, K, o, ostride);
    else if (w.group == 32) rows_dot<8, false>(MR, qr, sr, zr, B, xq_t, xd_t, xs_t, K, o, ostride);
    else rows_dot<8, true>(MR, qr, sr, zr, B, xq_t, xd_t, xs_t, K, o, ostride);
}

// Output rows n0 .. n1 of x @ w^T into O [M, ostride] (column n of O is row n of w).
static void product_rows(const Weight& w, const Activations& a, int64_t n0, int64_t n1, float* O, int64_t ostride) {
    for (int64_t m0 = 0; m0 < a.M; m0 += ROW_TILE) {
        const int MR = (int)std::min<int64_t>(ROW_TILE, a.M - m0);
        for (int64_t n = n0; n < n1; ++n) dot_rows(w, a, n, m0, MR, O + m0 * ostride + n, ostride);
    }
}

// x [..., K] times each of several matrices [N_i, K] -> [..., N_i], x quantised once, all the products in
// one parallel region: output rows are split across threads 16 at a time (a tile of x stays in cache),
// each row computed as a one-matrix call computes it. Rows of x go ROW_TILE at a time against each
// weight row (each weight block is decoded once per tile).
static std::vector<torch::Tensor> qmm_many(const torch::Tensor& x_in, const std::vector<Weight>& ws) {
    const torch::Tensor x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    bool plain = false, paired = false, sums = false;
    for (const Weight& w : ws) {
        (w.bits == 4 ? paired : plain) = true;
        sums = sums || w.bits == 6;
    }
    const Activations a(x, plain, paired, sums);
    constexpr int64_t NB = 16;
    std::vector<torch::Tensor> outs;
    std::vector<float*> out_ptrs;
    std::vector<int64_t> first{0};  // the first chunk of rows of each matrix
    for (const Weight& w : ws) {
        outs.push_back(torch::empty({M, w.N}, x.options()));
        out_ptrs.push_back(outs.back().data_ptr<float>());
        first.push_back(first.back() + (w.N + NB - 1) / NB);
    }
    at::parallel_for(0, first.back(), 1, [&](int64_t c0, int64_t c1) {
        size_t i = 0;
        for (int64_t c = c0; c < c1; ++c) {
            while (c >= first[i + 1]) ++i;
            const int64_t n0 = (c - first[i]) * NB, n1 = std::min(ws[i].N, n0 + NB);
            product_rows(ws[i], a, n0, n1, out_ptrs[i], ws[i].N);
        }
    });
    auto sizes = x_in.sizes().vec();
    for (size_t i = 0; i < ws.size(); ++i) {
        sizes.back() = ws[i].N;
        outs[i] = outs[i].view(sizes);
    }
    return outs;
}

// out[m, n] = sum_k xq8(x)[m, k] * (scale[n, k/g] * q[n, k] + zero[n, k/g]), x [..., K] quantised per 32.
torch::Tensor qmm_q8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                     int64_t bits, int64_t group, c10::optional<torch::Tensor> sub_opt) {
    const NoGil no_gil;
    return qmm_many(x, {Weight(q, scale, zero_opt, bits, group, sub_opt, x.size(-1), "qmm_q8")})[0];
}

// Routed experts in one call. x [J, K]: row j goes through expert ids[j] of the stacked q [E, N, ...].
// Without weights: out [J, N]. With weights [J]: out [J / topk, N], row t = sum over its topk rows j of
// weights[j] * (x[j] @ W[ids[j]]^T) (the MoE's weighted sum, fused). Only the experts named are read.
torch::Tensor qmm_experts(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                          int64_t bits, int64_t group, c10::optional<torch::Tensor> sub_opt, torch::Tensor ids,
                          c10::optional<torch::Tensor> weights, int64_t topk) {
    const NoGil no_gil;
    const int64_t J = x.size(0), K = x.size(1), N = q.size(1);
    const Weight w(q, scale, zero_opt, bits, group, sub_opt, K, "qmm_experts");  // rows: expert e's row n is e * N + n
    const Activations a(x, bits != 4, bits == 4, bits == 6);
    const int64_t* I = ids.data_ptr<int64_t>();
    auto dot = [&](int64_t j, int64_t n, float* o) { dot_rows(w, a, I[j] * N + n, j, 1, o, 0); };
    if (!weights.has_value()) {
        auto out = torch::empty({J, N}, x.options());
        float* O = out.data_ptr<float>();
        at::parallel_for(0, J * N, 16, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) dot(i / N, i % N, O + i);
        });
        return out;
    }
    const int64_t T = J / topk;
    auto out = torch::empty({T, N}, x.options());
    float* O = out.data_ptr<float>();
    const float* Wt = weights->data_ptr<float>();
    at::parallel_for(0, T * N, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t t = i / N, n = i % N;
            float acc = 0.0f, y;
            for (int64_t j = t * topk; j < (t + 1) * topk; ++j) {
                dot(j, n, &y);
                acc += Wt[j] * y;
            }
            O[i] = acc;
        }
    });
    return out;
}

// The activations as qmm_q8 sees them (for tests): x rounded per block of 32 and scaled back.
torch::Tensor quantize_activations(torch::Tensor x) {
    const NoGil no_gil;
    const int64_t M = x.size(0), K = x.size(1), B = K / 32;
    auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
    auto xd = torch::empty({M, B}, x.options()), xs = torch::empty({M, B}, x.options());
    quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
    return (xq.to(torch::kFloat).view({M, B, 32}) * xd.view({M, B, 1})).view({M, K});
}

// Eight float32 values from float32 or bf16 (widened exactly: the bf16 bits are a float32's top half).
static inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 widen8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// ---- bf16 weights: out[m, n] = sum_k x[m, k] * w[n, k], x float32, w bf16 widened exactly, float32 sums ----
// Each output row is computed alone, in the same order for any number of rows (decode == verify).
template <int MR>
static inline void bf16_rows(const uint16_t* wr, const float* X, int64_t K, float* out, int64_t ostride) {
    __m256 acc[MR], acc2[MR];
    for (int r = 0; r < MR; ++r) acc[r] = acc2[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {  // two chains per row hide the FMA latency
        if ((k & 31) == 0) prefetch_ahead(wr + k);
        const __m256 w0 = widen8(wr + k), w1 = widen8(wr + k + 8);
        for (int r = 0; r < MR; ++r) {
            acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + r * K + k), acc[r]);
            acc2[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + r * K + k + 8), acc2[r]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        float y = hsum(_mm256_add_ps(acc[r], acc2[r]));
        for (int64_t j = k; j < K; ++j) {
            uint32_t bits = (uint32_t)wr[j] << 16;
            float wf;
            std::memcpy(&wf, &bits, 4);
            y += wf * X[r * K + j];
        }
        out[r * ostride] = y;
    }
}

torch::Tensor bf16mm(torch::Tensor x, torch::Tensor w) {
    const NoGil no_gil;
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    auto out = torch::empty({M, N}, x.options());
    const float* X = x.data_ptr<float>();
    const uint16_t* W = (const uint16_t*)w.data_ptr();
    float* O = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            const uint16_t* wr = W + n * K;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int64_t mr = std::min<int64_t>(4, M - m0);
                const float* xt = X + m0 * K;
                float* o = O + m0 * N + n;
                if (mr == 4) bf16_rows<4>(wr, xt, K, o, N);
                else if (mr == 3) bf16_rows<3>(wr, xt, K, o, N);
                else if (mr == 2) bf16_rows<2>(wr, xt, K, o, N);
                else bf16_rows<1>(wr, xt, K, o, N);
            }
        }
    });
    return out;
}

// ---- attention of a few queries (decode, verify) over one piece of the cache ----
// q [B, H, T, D] float32; k, v [B, KV, S, D] float32 or bf16 (rows contiguous); qpos [B, T], kpos [B, S]
// (-1: empty slot); a query at p sees keys p - window + 1 .. min(p or sees_until) (window 0: all).
// Keys are split in chunks of 64 across threads (flash-decoding): each chunk keeps, per query, its max
// score, sum of exponentials and weighted values; a second pass merges them in the order of the first
// position each chunk shows the query (a ring's slots wrap: slot order is a rotation that depends on the
// ring's size; position order does not). A query that sees nothing gets zeros. Every query's arithmetic
// is the same whatever the others (T, batch) are, and, over a ring of a multiple of 64 slots, whatever
// its size (a chunk of slots then holds the keys of one 64-position run that the query sees).

// e^x for x <= 0 (scores minus their maximum; -inf and anything below -87 give 0): 2^n * p(f), n = round(x / ln 2), f = x - n ln 2
// in two parts, p a degree-6 Taylor polynomial on |f| <= ln 2 / 2 (relative error < 2e-7, float32's own).
static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);  // below: e^x < 2^-125, 0
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Scores of RT query rows (rq[r]) against the keys kb + idx[i] * D (widened): sc[r * CH + idx[i]] = q . k * scale.
// NK keys per step give RT * NK independent FMA chains (one per row and key, each summed over e in the
// same order whatever RT and NK are, so a row's score never depends on the rows or keys beside it).
// With vb, the value rows of these keys and the next keys' rows are prefetched on the way (from memory they
// arrive while the scores are computed; the values pass reads each row in several strided sweeps).
constexpr int64_t CH_MAX = 64;  // keys per chunk (ATTENTION_CHUNK)

// K=V layers: the keys of stored values, k = RoPE(v * w) (the k_norm weight w, then the first R pairs
// (e, e + D/2) turned by the angle of the key's position: cos/sin tables [positions, R]). The same float32
// operations as the torch path (keys_from_values), one key at a time into kf [n, D].
template <typename KT>
static inline void rebuild_keys(const KT* vb, const int64_t* idx, int64_t n, const int64_t* kp, int64_t D,
                                const float* w, const float* cs, const float* sn, int64_t R, float* kf) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < n; ++t) {
        const KT* v = vb + idx[t] * D;
        float* k = kf + t * D;
        for (int64_t e = 0; e < D; e += 8) _mm256_storeu_ps(k + e, _mm256_mul_ps(widen8(v + e), _mm256_loadu_ps(w + e)));
        const int64_t p = std::max<int64_t>(0, kp[idx[t]]);
        const float* c = cs + p * R;
        const float* s = sn + p * R;
        for (int64_t e = 0; e < R; ++e) {
            const float x1 = k[e], x2 = k[e + half];
            k[e] = x1 * c[e] - x2 * s[e];
            k[e + half] = x2 * c[e] + x1 * s[e];
        }
    }
}

static inline void prefetch_row(const void* p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char*)p + o, _MM_HINT_T0);
}

template <typename KT, int RT, int NK>
static inline void score_tile(const float* const* rq, const KT* kb, const KT* vb, const int64_t* idx, int64_t n,
                              int64_t D, float scale, float* sc, int64_t CH, bool packed = false) {
    const KT* krow[CH_MAX];  // key i's row
    for (int64_t i = 0; i < n; ++i) krow[i] = kb + (packed ? i : idx[i]) * D;
    int64_t i = 0;
    for (; i + NK <= n; i += NK) {
        if (vb != nullptr) {
            for (int c = 0; c < NK; ++c) prefetch_row(vb + idx[i + c] * D, D * (int64_t)sizeof(KT));
            for (int c = 0; c < NK && i + NK + c < n; ++c) prefetch_row(krow[i + NK + c], D * (int64_t)sizeof(KT));
        }
        __m256 a[RT][NK];
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < NK; ++c) a[r][c] = _mm256_setzero_ps();
        for (int64_t e = 0; e < D; e += 8) {
            __m256 kv[NK];
            for (int c = 0; c < NK; ++c) kv[c] = widen8(krow[i + c] + e);
            for (int r = 0; r < RT; ++r) {
                const __m256 q = _mm256_loadu_ps(rq[r] + e);
                for (int c = 0; c < NK; ++c) a[r][c] = _mm256_fmadd_ps(q, kv[c], a[r][c]);
            }
        }
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < NK; ++c) sc[r * CH + idx[i + c]] = hsum(a[r][c]) * scale;
    }
    for (; i < n; ++i) {
        if (vb != nullptr) prefetch_row(vb + idx[i] * D, D * (int64_t)sizeof(KT));
        __m256 a[RT];
        for (int r = 0; r < RT; ++r) a[r] = _mm256_setzero_ps();
        for (int64_t e = 0; e < D; e += 8) {
            const __m256 kv = widen8(krow[i] + e);
            for (int r = 0; r < RT; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rq[r] + e), kv, a[r]);
        }
        for (int r = 0; r < RT; ++r) sc[r * CH + idx[i]] = hsum(a[r]) * scale;
    }
}

// pa[r * D + e] = sum over i of p[r * CH + idx[i]] * v[idx[i]][e], for RT rows, EV vectors of 8 channels at
// a time held in registers across the keys (each lane summed in key order whatever RT and EV are).
template <typename KT, int RT, int EV>
static inline void value_tile(const float* p, const KT* vb, const int64_t* idx, int64_t n, int64_t D, float* pa,
                              int64_t CH) {
    int64_t e = 0;
    for (; e + 8 * EV <= D; e += 8 * EV) {
        __m256 a[RT][EV];
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < EV; ++c) a[r][c] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
            const KT* vr = vb + idx[i] * D + e;
            __m256 vv[EV];
            for (int c = 0; c < EV; ++c) vv[c] = widen8(vr + 8 * c);
            for (int r = 0; r < RT; ++r) {
                const __m256 pr = _mm256_broadcast_ss(p + r * CH + idx[i]);
                for (int c = 0; c < EV; ++c) a[r][c] = _mm256_fmadd_ps(pr, vv[c], a[r][c]);
            }
        }
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < EV; ++c) _mm256_storeu_ps(pa + r * D + e + 8 * c, a[r][c]);
    }
    for (; e < D; e += 8) {
        __m256 a[RT];
        for (int r = 0; r < RT; ++r) a[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
            const __m256 vv = widen8(vb + idx[i] * D + e);
            for (int r = 0; r < RT; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * CH + idx[i]), vv, a[r]);
        }
        for (int r = 0; r < RT; ++r) _mm256_storeu_ps(pa + r * D + e, a[r]);
    }
}

// Scores of the tile's rows: keys in the stored dtype, or (rebuilt, K=V layers) float32 rows kf[t] for
// the t-th key of idx (written by rebuild_keys), their scores stored at idx[t] all the same.
template <typename KT, int RT>
static inline void chunk_tile(const float* const* rq, const KT* kb, const KT* vb, const int64_t* idx, int64_t n,
                              int64_t D, float scale, float* sc, float* pa, int64_t CH, int pass, bool fetch,
                              const float* kf) {
    if (pass == 0 && kf != nullptr) {
        if (RT <= 2) score_tile<float, RT, 4>(rq, kf, nullptr, idx, n, D, scale, sc, CH, true);
        else score_tile<float, RT, 2>(rq, kf, nullptr, idx, n, D, scale, sc, CH, true);
    } else if (pass == 0) {
        if (RT <= 2) score_tile<KT, RT, 4>(rq, kb, fetch ? vb : nullptr, idx, n, D, scale, sc, CH);
        else score_tile<KT, RT, 2>(rq, kb, fetch ? vb : nullptr, idx, n, D, scale, sc, CH);
    } else {
        if (RT <= 2) value_tile<KT, RT, 4>(sc, vb, idx, n, D, pa, CH);
        else value_tile<KT, RT, 2>(sc, vb, idx, n, D, pa, CH);
    }
}

// Key j of batch row b, KV head h: K + ((BT[b, j / BS] * KV + h) * BS + j % BS) * D with a block table BT
// (a paged pool [blocks, KV, BS, D]); without one, K is [B, KV, S, D] (one block of S per row).
template <typename KT>
static void attend_chunks(const float* Q, const KT* K, const KT* V, const int64_t* QP, const int64_t* KP,
                          const int64_t* SU, int64_t window, float scale, int64_t B, int64_t H, int64_t T,
                          int64_t KV, int64_t S, int64_t D, int64_t CH, int64_t NC, float* PM, float* PL, float* PA,
                          int64_t* PF, const int64_t* BT, int64_t BS, int64_t NBLK,
                          const float* KW, const float* KC, const float* KS, int64_t KR) {
    const int64_t G = H / KV, R = G * T;
    at::parallel_for(0, B * KV * NC, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc(R * CH), kf(KW ? CH * D : 0);
        std::vector<const float*> rq(R);
        std::vector<int64_t> rlo(R), rhi(R), idx(CH);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / (KV * NC), kv = (i / NC) % KV, c = i % NC;
            const int64_t j0 = c * CH, j1 = std::min(S, j0 + CH), n = j1 - j0;
            const int64_t first = BT ? ((BT[b * NBLK + j0 / BS] * KV + kv) * BS + j0 % BS) * D
                                     : ((b * KV + kv) * S + j0) * D;
            const KT* kb = K + first;  // the chunk's keys and values, rows of D
            const KT* vb = V + first;
            const int64_t* kp = KP + b * S + j0;
            float* pm = PM + i * R;
            float* pl = PL + i * R;
            int64_t* pf = PF + i * R;
            float* pa = PA + i * R * D;
            for (int64_t r = 0; r < R; ++r) {  // query row r: head kv * G + r / T, position t = r % T
                const int64_t t = r % T, qp = QP[b * T + t];
                rq[r] = Q + ((b * H + kv * G + r / T) * T + t) * D;
                rhi[r] = SU ? SU[b * T + t] : qp;  // sees keys at rlo .. rhi
                rlo[r] = window > 0 ? std::max<int64_t>(0, qp - window + 1) : 0;
            }
            std::fill(sc.begin(), sc.end(), -INFINITY);
            for (int64_t r0 = 0; r0 < R; r0 += 4) {
                const int RT = (int)std::min<int64_t>(4, R - r0);
                int64_t lo = INT64_MAX, hi = -1;
                for (int64_t r = r0; r < r0 + RT; ++r) lo = std::min(lo, rlo[r]), hi = std::max(hi, rhi[r]);
                int64_t m = 0;  // the keys some row of this tile may see
                for (int64_t j = 0; j < n; ++j)
                    if (kp[j] >= 0 && kp[j] >= lo && kp[j] <= hi) idx[m++] = j;
                if (KW) rebuild_keys(vb, idx.data(), m, kp, D, KW, KC, KS, KR, kf.data());
                const float* tkf = KW ? kf.data() : nullptr;
                for (int pass = 0; pass < 2; ++pass) {
                    if (pass == 1) {  // masks, maxima, exponentials of the tile's rows
                        for (int64_t r = r0; r < r0 + RT; ++r) {
                            float* x = sc.data() + r * CH;
                            float top = -INFINITY;
                            int64_t first = INT64_MAX;
                            for (int64_t t = 0; t < m; ++t) {
                                const int64_t j = idx[t];
                                if (kp[j] < rlo[r] || kp[j] > rhi[r]) x[j] = -INFINITY;
                                else top = std::max(top, x[j]), first = std::min(first, kp[j]);
                            }
                            pm[r] = top;
                            pf[r] = first;
                            if (top == -INFINITY) {
                                std::fill(x, x + n, 0.0f);
                                pl[r] = 0.0f;
                                continue;
                            }
                            const __m256 top8 = _mm256_set1_ps(top);
                            __m256 l8 = _mm256_setzero_ps();
                            int64_t j = 0;
                            for (; j + 8 <= n; j += 8) {
                                const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), top8));
                                _mm256_storeu_ps(x + j, e);
                                l8 = _mm256_add_ps(l8, e);
                            }
                            if (j < n) {  // the last keys through the same vector exp, hidden lanes at -inf (0)
                                float tail[8];
                                for (int64_t e = 0; e < 8; ++e) tail[e] = j + e < n ? x[j + e] : -INFINITY;
                                const __m256 e8 = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), top8));
                                _mm256_storeu_ps(tail, e8);
                                for (int64_t e = 0; j + e < n; ++e) x[j + e] = tail[e];
                                l8 = _mm256_add_ps(l8, e8);
                            }
                            pl[r] = hsum(l8);
                        }
                    }
                    const float* const* tq = rq.data() + r0;
                    float* tsc = sc.data() + r0 * CH;
                    float* tpa = pa + r0 * D;
                    switch (RT) {
                        case 1: chunk_tile<KT, 1>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                        case 2: chunk_tile<KT, 2>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                        case 3: chunk_tile<KT, 3>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                        default: chunk_tile<KT, 4>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                    }
                }
            }
        }
    });
}

torch::Tensor attend_small(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor qpos, torch::Tensor kpos,
                           int64_t window, c10::optional<torch::Tensor> sees_until, double scale,
                           c10::optional<torch::Tensor> blocks, c10::optional<torch::Tensor> key_weight,
                           c10::optional<torch::Tensor> key_cos, c10::optional<torch::Tensor> key_sin) {
    const NoGil no_gil;
    q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
    qpos = qpos.contiguous(); kpos = kpos.contiguous();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), S = kpos.size(1);
    const int64_t G = H / KV, R = G * T, CH = CH_MAX, NC = (S + CH - 1) / CH;
    TORCH_CHECK(D % 8 == 0 && H % KV == 0 && k.scalar_type() == v.scalar_type() && k.sizes() == v.sizes(),
                "attend_small: unsupported shapes");
    torch::Tensor bt;
    int64_t BS = S, NBLK = 1;
    if (blocks.has_value()) {  // k, v: pools [blocks, KV, BS, D]; blocks [B, NBLK] ids covering S slots
        bt = blocks->contiguous();
        BS = k.size(2);
        NBLK = bt.size(1);
        TORCH_CHECK(BS % CH == 0 && NBLK * BS >= S && bt.size(0) == B, "attend_small: unsupported block table");
    } else {
        TORCH_CHECK(k.size(0) == B && k.size(2) == S, "attend_small: keys do not match kpos");
    }
    const int64_t* BT = blocks.has_value() ? bt.data_ptr<int64_t>() : nullptr;
    // K=V: keys rebuilt from the values (k is v) with the k_norm weight [D] and cos/sin tables [positions, R]
    torch::Tensor kw, kc, ks;
    int64_t KR = 0;
    if (key_weight.has_value()) {
        kw = key_weight->contiguous(); kc = key_cos->contiguous(); ks = key_sin->contiguous();
        KR = kc.size(1);
        TORCH_CHECK(kw.numel() == D && KR <= D / 2 && ks.sizes() == kc.sizes() && kc.size(0) > kpos.max().item<int64_t>(),
                    "attend_small: unsupported key rebuild");
    }
    const float* KW = key_weight.has_value() ? kw.data_ptr<float>() : nullptr;
    const float* KC = key_weight.has_value() ? kc.data_ptr<float>() : nullptr;
    const float* KS = key_weight.has_value() ? ks.data_ptr<float>() : nullptr;
    auto f = q.options();
    auto pm = torch::empty({B * KV * NC, R}, f), pl = torch::empty({B * KV * NC, R}, f);
    auto pa = torch::empty({B * KV * NC, R, D}, f);
    auto pf = torch::empty({B * KV * NC, R}, q.options().dtype(torch::kLong));
    torch::Tensor su;
    if (sees_until.has_value()) su = sees_until->contiguous();
    const int64_t* SU = sees_until.has_value() ? su.data_ptr<int64_t>() : nullptr;
    if (k.scalar_type() == torch::kBFloat16)
        attend_chunks<uint16_t>(q.data_ptr<float>(), (const uint16_t*)k.data_ptr(), (const uint16_t*)v.data_ptr(),
                                qpos.data_ptr<int64_t>(), kpos.data_ptr<int64_t>(), SU, window, (float)scale,
                                B, H, T, KV, S, D, CH, NC, pm.data_ptr<float>(), pl.data_ptr<float>(), pa.data_ptr<float>(),
                                pf.data_ptr<int64_t>(), BT, BS, NBLK, KW, KC, KS, KR);
    else {
        TORCH_CHECK(k.scalar_type() == torch::kFloat, "attend_small: keys must be float32 or bfloat16");
        attend_chunks<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                             qpos.data_ptr<int64_t>(), kpos.data_ptr<int64_t>(), SU, window, (float)scale,
                             B, H, T, KV, S, D, CH, NC, pm.data_ptr<float>(), pl.data_ptr<float>(), pa.data_ptr<float>(),
                             pf.data_ptr<int64_t>(), BT, BS, NBLK, KW, KC, KS, KR);
    }
    auto out = torch::zeros({B, H, T, D}, f);
    const float* PM = pm.data_ptr<float>();
    const float* PL = pl.data_ptr<float>();
    const float* PA = pa.data_ptr<float>();
    const int64_t* PF = pf.data_ptr<int64_t>();
    float* O = out.data_ptr<float>();
    at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {  // merge the chunks of each query
        std::vector<std::pair<int64_t, int64_t>> order;  // (first position seen, chunk)
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / (H * T), h = (i / T) % H, t = i % T, kv = h / G, r = (h % G) * T + t;
            float top = -INFINITY;
            order.clear();
            for (int64_t c = 0; c < NC; ++c) {
                const int64_t pi = (b * KV + kv) * NC + c;
                if (PM[pi * R + r] == -INFINITY) continue;
                top = std::max(top, PM[pi * R + r]);
                order.emplace_back(PF[pi * R + r], c);
            }
            if (top == -INFINITY) continue;  // sees nothing: zeros
            std::sort(order.begin(), order.end());
            float l = 0.0f;
            float* o = O + i * D;
            for (const auto& fc : order) {
                const int64_t pi = (b * KV + kv) * NC + fc.second;
                const float m = PM[pi * R + r];
                const float w = std::exp(m - top);
                l += w * PL[pi * R + r];
                const float* a = PA + (pi * R + r) * D;
                for (int64_t e = 0; e < D; ++e) o[e] += w * a[e];
            }
            const float inv = 1.0f / l;
            for (int64_t e = 0; e < D; ++e) o[e] *= inv;
        }
    });
    return out;
}

// ---- rotate-half RoPE in one pass: x [B, T, H, D] float32, positions [B, T] (negative: 0), inv_freq [D/2]:
// angle = float(p) * inv_freq[i] (float32, as torch computes it); out_i = x_i cos - x_{i+D/2} sin,
// out_{i+D/2} = x_{i+D/2} cos + x_i sin. Frequencies of zero (proportional RoPE) leave their pairs as they are.
torch::Tensor rope(torch::Tensor x, torch::Tensor positions, torch::Tensor inv_freq) {
    const NoGil no_gil;
    x = x.contiguous();
    positions = positions.contiguous();
    const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
    auto out = torch::empty_like(x);
    const float* X = x.data_ptr<float>();
    const int64_t* P = positions.data_ptr<int64_t>();
    const float* F = inv_freq.data_ptr<float>();
    float* O = out.data_ptr<float>();
    at::parallel_for(0, B * T, 16, [&](int64_t i0, int64_t i1) {
        std::vector<float> c(half), sn(half);
        for (int64_t i = i0; i < i1; ++i) {
            const float p = (float)std::max<int64_t>(0, P[i]);
            for (int64_t j = 0; j < half; ++j) {  // (zero frequencies: cos 1, sin 0, no library call)
                const float a = p * F[j];
                c[j] = F[j] == 0.0f ? 1.0f : std::cos(a);
                sn[j] = F[j] == 0.0f ? 0.0f : std::sin(a);
            }
            for (int64_t h = 0; h < H; ++h) {
                const float* xr = X + (i * H + h) * D;
                float* o = O + (i * H + h) * D;
                for (int64_t j = 0; j < half; ++j) {
                    const float x1 = xr[j], x2 = xr[j + half];
                    o[j] = x1 * c[j] - x2 * sn[j];
                    o[j + half] = x2 * c[j] + x1 * sn[j];
                }
            }
        }
    });
    return out;
}

// ---- small fused ops of the decoder (one pass instead of five aten calls each) ----
// out = residual + (x * (mean(x^2) + eps)^-0.5) * weight per row of D, all float32; weight and residual
// optional. Same rounding order as the unfused torch ops; only the sum of squares is ordered differently.
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> weight, double eps,
                       c10::optional<torch::Tensor> residual) {
    const NoGil no_gil;
    const int64_t D = x.size(-1), R = x.numel() / D;
    auto out = torch::empty_like(x);
    const float* X = x.data_ptr<float>();
    const float* W = weight.has_value() ? weight->data_ptr<float>() : nullptr;
    const float* H = residual.has_value() ? residual->data_ptr<float>() : nullptr;
    float* O = out.data_ptr<float>();
    const float e = (float)eps;
    at::parallel_for(0, R, std::max<int64_t>(1, 32768 / D), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* x = X + r * D;
            float* o = O + r * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 16 <= D; i += 16) {
                __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
                a0 = _mm256_fmadd_ps(v0, v0, a0);
                a1 = _mm256_fmadd_ps(v1, v1, a1);
            }
            float ss = hsum(_mm256_add_ps(a0, a1));
            for (; i < D; ++i) ss += x[i] * x[i];
            const float inv = 1.0f / std::sqrt(ss / (float)D + e);
            const __m256 vinv = _mm256_set1_ps(inv);
            i = 0;
            for (; i + 8 <= D; i += 8) {
                __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
                if (W) y = _mm256_mul_ps(y, _mm256_loadu_ps(W + i));
                if (H) y = _mm256_add_ps(_mm256_loadu_ps(H + r * D + i), y);
                _mm256_storeu_ps(o + i, y);
            }
            for (; i < D; ++i) {
                float y = x[i] * inv;
                if (W) y *= W[i];
                if (H) y = H[r * D + i] + y;
                o[i] = y;
            }
        }
    });
    return out;
}

// ---- a decoder layer's dense parts in three calls (decode and verify steps: Python's per-op cost was
// ~1/4 of a small model's step). Each is the composition of the ops above that the layer's modules
// call one by one, in the same order on the same values, so its results are the same bits. ----
// A quantised matrix as Python hands it: (q, scale, zero, bits, group, sub).
using QW = std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t, c10::optional<torch::Tensor>>;

static Weight weight_of(const QW& w, int64_t K) {
    return Weight(std::get<0>(w), std::get<1>(w), std::get<2>(w), std::get<3>(w), std::get<4>(w), std::get<5>(w), K, "qmm_q8");
}

static torch::Tensor qmm_w(const torch::Tensor& x, const QW& w) { return qmm_many(x, {weight_of(w, x.size(-1))})[0]; }

// h [B, T, hidden] -> q [B, T, H, D] (normed, rotated), k [B, T, KV, D] (normed, rotated; None for K=V
// layers), v [B, T, KV, D] (v_norm'd where the layer has one; K=V: from the key projection).
std::vector<torch::Tensor> attn_in(torch::Tensor h, torch::Tensor in_w, double eps, QW wq, QW wk, c10::optional<QW> wv,
                                   torch::Tensor qn_w, torch::Tensor kn_w, bool v_norm, torch::Tensor qpos,
                                   torch::Tensor inv_freq, int64_t heads, int64_t kv_heads, int64_t head_dim) {
    const NoGil no_gil;
    const int64_t B = h.size(0), T = h.size(1);
    const torch::Tensor x = rms_norm(h.contiguous(), in_w, eps, c10::nullopt);
    const int64_t K = x.size(-1);
    std::vector<Weight> ws{weight_of(wq, K), weight_of(wk, K)};
    if (wv.has_value()) ws.push_back(weight_of(*wv, K));
    const std::vector<torch::Tensor> p = qmm_many(x, ws);  // q, k, v in one parallel region
    const torch::Tensor q = rope(rms_norm(p[0].view({B, T, heads, head_dim}), qn_w, eps, c10::nullopt), qpos, inv_freq);
    const torch::Tensor raw_k = p[1].view({B, T, kv_heads, head_dim});
    const torch::Tensor raw_v = wv.has_value() ? p[2].view({B, T, kv_heads, head_dim}) : raw_k;
    const torch::Tensor v = v_norm ? rms_norm(raw_v, c10::nullopt, eps, c10::nullopt) : raw_v;
    torch::Tensor k;  // undefined (None) for K=V layers: the cache stores the values only
    if (wv.has_value()) k = rope(rms_norm(raw_k, kn_w, eps, c10::nullopt), qpos, inv_freq);
    return {q, k, v};
}

// att [B, H, T, D] float32 (attention's output) -> h + post_norm(o_proj(att as [B, T, H * D])).
torch::Tensor attn_out(torch::Tensor att, QW wo, torch::Tensor post_w, double eps, torch::Tensor h) {
    const NoGil no_gil;
    const int64_t B = att.size(0), H = att.size(1), T = att.size(2), D = att.size(3);
    const torch::Tensor o = qmm_w(att.transpose(1, 2).reshape({B, T, H * D}), wo);
    return rms_norm(o, post_w, eps, h.contiguous());
}

// post_norm(down(gelu_tanh(gate(x)) * up(x))) (+ residual), x = pre_norm(h): the gated MLP between its norms.
torch::Tensor mlp_block(torch::Tensor h, torch::Tensor pre_w, double eps, QW wg, QW wu, QW wd, torch::Tensor post_w,
                        c10::optional<torch::Tensor> residual) {
    const NoGil no_gil;
    const torch::Tensor x = rms_norm(h.contiguous(), pre_w, eps, c10::nullopt);
    const std::vector<torch::Tensor> gu = qmm_many(x, {weight_of(wg, x.size(-1)), weight_of(wu, x.size(-1))});
    const torch::Tensor a = at::gelu(gu[0], "tanh").mul_(gu[1]);
    c10::optional<torch::Tensor> r;
    if (residual.has_value()) r = residual->contiguous();
    return rms_norm(qmm_w(a, wd), post_w, eps, r);
}

// Decode's cache write, one token per row: for each b with i0[b] >= 0, src[b, :, 0] of every source
// [B, KV, 1, X] (any strides) goes to dst[i0[b], :, i1[b]] of its stored tensor [rows or blocks, KV, slots, X]
// (widened or narrowed to its dtype); with a position table [rows, slots], positions[b] goes to
// table[i0[b], i1[b]]. One call instead of a few indexing ops per tensor.
void put_tokens(std::vector<torch::Tensor> dsts, std::vector<torch::Tensor> srcs, std::vector<int64_t> i0,
                std::vector<int64_t> i1, c10::optional<torch::Tensor> pos_table, std::vector<int64_t> positions) {
    const NoGil no_gil;
    TORCH_CHECK(dsts.size() == srcs.size() && i0.size() == i1.size(), "put_tokens: mismatched arguments");
    TORCH_CHECK(!pos_table.has_value() || (pos_table->scalar_type() == torch::kLong && positions.size() == i0.size()),
                "put_tokens: bad position table");
    for (size_t b = 0; b < i0.size(); ++b) {
        if (i0[b] < 0) continue;
        for (size_t n = 0; n < dsts.size(); ++n) {
            torch::Tensor& d = dsts[n];
            const torch::Tensor& s = srcs[n];
            TORCH_CHECK(i0[b] < d.size(0) && i1[b] >= 0 && i1[b] < d.size(2) && (int64_t)b < s.size(0),
                        "put_tokens: slot out of range");
            if (d.scalar_type() == s.scalar_type() && d.dim() == 4 && s.dim() == 4 && d.stride(3) == 1 &&
                s.stride(3) == 1 && d.size(1) == s.size(1) && d.size(3) == s.size(3)) {  // rows copied as bytes
                const int64_t es = d.element_size(), X = d.size(3);
                char* dp = (char*)d.data_ptr() + (i0[b] * d.stride(0) + i1[b] * d.stride(2)) * es;
                const char* sp = (const char*)s.data_ptr() + (int64_t)b * s.stride(0) * es;
                for (int64_t h = 0; h < d.size(1); ++h) std::memcpy(dp + h * d.stride(1) * es, sp + h * s.stride(1) * es, X * es);
            } else {  // another dtype (widened or narrowed) or shape: torch's copy
                d.select(0, i0[b]).select(1, i1[b]).copy_(s.select(0, (int64_t)b).select(1, 0));
            }
        }
        if (pos_table.has_value())
            pos_table->data_ptr<int64_t>()[i0[b] * pos_table->stride(0) + i1[b] * pos_table->stride(1)] = positions[b];
    }
}

// ---- GGUF K-quant blocks to the kernels' layouts at load (the numpy converters in formats.py are the
// reference; these give the same bytes, ~10x faster, which is most of a big Q4_K_M model's load) ----
// GGUF rows of super-blocks of 256 elements, `bytes` bytes each: raw [rows, k/256 * bytes], checked. The
// converters' outputs per super-block (scales(): one float, subs(): 16 int8) and their loop: each(f) runs
// f(i, its bytes) for every super-block i of the whole tensor, in parallel.
struct SuperBlocks {
    const torch::Tensor& raw;
    int64_t bytes, rows, nb;
    SuperBlocks(const torch::Tensor& raw_, int64_t k, int64_t bytes_, const char* what)
        : raw(raw_), bytes(bytes_), rows(raw_.size(0)), nb(k / 256) {
        TORCH_CHECK(k % 256 == 0 && raw.is_contiguous() && raw.size(1) == nb * bytes, what, ": bad shape");
    }
    torch::Tensor scales() const { return torch::empty({rows, nb}, raw.options().dtype(torch::kFloat)); }
    torch::Tensor subs() const { return torch::empty({rows, nb * 16}, raw.options().dtype(torch::kChar)); }
    template <typename F>
    void each(F f) const {
        const uint8_t* R = raw.data_ptr<uint8_t>();
        at::parallel_for(0, rows * nb, 256, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) f(i, R + i * bytes);
        });
    }
};

// Q4_K, raw [rows, k/256 * 144] -> packed int4 [rows, k/2] (per 32: element i | element i+16 << 4),
// d and -dmin float32 [rows, k/256], sub int8 [rows, k/16] (sc, m of each block of 32, interleaved).
std::vector<torch::Tensor> gguf_q4_k(torch::Tensor raw, int64_t k) {
    const NoGil no_gil;
    const SuperBlocks sb(raw, k, 144, "gguf_q4_k");
    auto packed = torch::empty({sb.rows, k / 2}, raw.options());
    auto d = sb.scales(), z = sb.scales(), sub = sb.subs();
    uint8_t* P = packed.data_ptr<uint8_t>();
    float* D = d.data_ptr<float>();
    float* Z = z.data_ptr<float>();
    int8_t* S = sub.data_ptr<int8_t>();
    sb.each([&](int64_t i, const uint8_t* p) {  // super-block i of the whole tensor
        uint16_t h[2];
        std::memcpy(h, p, 4);
        D[i] = _cvtsh_ss(h[0]);
        Z[i] = -_cvtsh_ss(h[1]);
        const uint8_t* sc = p + 4;
        int8_t* so = S + i * 16;
        for (int j = 0; j < 4; ++j) {
            so[2 * j] = (int8_t)(sc[j] & 63);
            so[2 * j + 1] = (int8_t)(sc[j + 4] & 63);
            so[2 * (j + 4)] = (int8_t)((sc[j + 8] & 15) | ((sc[j] >> 6) << 4));
            so[2 * (j + 4) + 1] = (int8_t)((sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4));
        }
        const uint8_t* qs = p + 16;
        uint8_t* po = P + i * 128;
        for (int c = 0; c < 4; ++c)
            for (int e = 0; e < 16; ++e) {
                const uint8_t lo = qs[c * 32 + e], hi = qs[c * 32 + 16 + e];
                po[(2 * c) * 16 + e] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
                po[(2 * c + 1) * 16 + e] = (uint8_t)((lo >> 4) | (hi & 0xF0));
            }
    });
    return {packed, d, z, sub};
}

// Q6_K, raw [rows, k/256 * 210] -> int6 [rows, 3k/4] (pack6's layout: per 128, the low nibbles of blocks
// 0 | 1 and 2 | 3, then bits 4-5 of block j at bits 2j), d float32 [rows, k/256], sub int8 [rows, k/16].
std::vector<torch::Tensor> gguf_q6_k(torch::Tensor raw, int64_t k) {
    const NoGil no_gil;
    const SuperBlocks sb(raw, k, 210, "gguf_q6_k");
    auto q = torch::empty({sb.rows, k / 4 * 3}, raw.options());
    auto d = sb.scales(), sub = sb.subs();
    uint8_t* Q = q.data_ptr<uint8_t>();
    float* D = d.data_ptr<float>();
    int8_t* S = sub.data_ptr<int8_t>();
    sb.each([&](int64_t i, const uint8_t* p) {
        for (int h = 0; h < 2; ++h) {  // two units of 128 elements
            const uint8_t* ql = p + h * 64;
            const uint8_t* qh = p + 128 + h * 32;
            uint8_t* o = Q + i * 192 + h * 96;
            for (int e = 0; e < 32; ++e) {
                o[e] = (uint8_t)((ql[e] & 15) | ((ql[32 + e] & 15) << 4));
                o[32 + e] = (uint8_t)((ql[e] >> 4) | (ql[32 + e] & 0xF0));
                o[64 + e] = qh[e];
            }
        }
        std::memcpy(S + i * 16, p + 192, 16);
        uint16_t h;
        std::memcpy(&h, p + 208, 2);
        D[i] = _cvtsh_ss(h);
    });
    return {q, d, sub};
}
"""

# -fopenmp: at::parallel_for is OpenMP in torch's CPU build and a header template here; compiled without
# it, every product ran on one thread. The extension links libgomp.so.1, which resolves to the copy torch
# has already loaded, so one thread pool serves both.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]

_lock = threading.Lock()
_native = None  # the compiled module, False when it cannot be built


def native():
    """The compiled CPU kernel, or None (no AVX2/FMA, no compiler, or GEMMA4_NO_NATIVE=1)."""
    global _native
    if _native is None:
        with _lock:
            if _native is None:
                _native = _build() or False
    return _native or None


def _build():
    if os.environ.get("GEMMA4_NO_NATIVE") == "1" or not _cpu_has_avx2():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        # Named by its source and flags, so builds of different versions never meet in torch's build cache.
        tag = hashlib.sha256((_SOURCE + " ".join(_CFLAGS)).encode()).hexdigest()[:12]
        return load_inline(name=f"gemma4_qmm_{tag}", cpp_sources=_SOURCE,
                           functions=["qmm", "qmm_q8", "qmm_experts", "quantize_activations", "rms_norm", "bf16mm",
                                      "attend_small", "rope", "attn_in", "attn_out", "mlp_block", "put_tokens", "gguf_q4_k", "gguf_q6_k"],
                           extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception:  # no compiler, no headers: the plain-torch path serves
        return None


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags
    except OSError:
        return False


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


# Integer dot products beat dequantise + BLAS at every row count for int4 and int6 weights, and for int8
# ones up to ~128 rows. Above, an int8 matrix whose float32 copy stays in the caches (the embedded model's
# 640-wide ones, <= 5 MB) is multiplied by BLAS: at 512 rows 1.4-1.6x faster (q_proj 1024 x 640: 9.1 vs
# 5.6 ms, dequantising included); a bigger one (the 26B-A4B shape's, >= 23 MB) costs as much to
# dequantise as BLAS saves. The product is then float32 throughout, without rounding the activations.
MIN_BLAS_ROWS = 192
MAX_BLAS_MATRIX = 8 << 20  # bytes of the float32 copy


def blas_first(w: QuantWeight, rows: int) -> bool:
    """Whether x [rows, K] @ w.T goes faster as dequantise + BLAS than through the int8-activation kernel."""
    return rows >= MIN_BLAS_ROWS and w.bits == 8 and w.q.numel() * 4 <= MAX_BLAS_MATRIX


def qlinear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] @ dequantize(w).T -> [..., N]; w is one matrix ([N, ...])."""
    # Called ~130 times per decode step of a small model: the checks are kept to a few attribute reads.
    kernel = native() if x.is_cpu and x.dtype is torch.float32 else None
    if kernel is not None:
        if w.int8_layout and activations() == "int8" and not blas_first(w, x.numel() // x.shape[-1]):
            return kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if x2.shape[0] <= MAX_KERNEL_ROWS and w.sub is None and w.scale.dtype == torch.float32:
            return kernel.qmm(x2, w.q, w.scale, w.zero, w.bits, w.group).reshape(*lead, -1)
    return F.linear(x, w.dequantize(x.dtype))


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
    kernel = native()
    if kernel is None:
        return None
    if x2.shape[0] > MAX_BF16_KERNEL_ROWS:
        return (x2.float() @ w.float().T).to(x.dtype).reshape(*lead, -1)
    return kernel.bf16mm(x2.float().contiguous(), w).to(x.dtype).reshape(*lead, -1)


def expert_matmul(x: torch.Tensor, w: QuantWeight, ids: torch.Tensor, weights: torch.Tensor | None = None,
                  top_k: int = 1) -> torch.Tensor | None:
    """Row j of x [J, K] times expert ids[j] of the stacked w [E, N, K] -> [J, N]; with weights [J], the
    weighted sum over each token's top_k consecutive rows -> [J / top_k, N]. One native call that reads
    only the experts named; None where it does not apply (then the caller loops over the experts)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or activations() != "int8" or not w.int8_layout:
        return None
    kernel = native()
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
    kernel = native()
    if kernel is None or not all(t.device.type == "cpu" for t in new.values()):
        return False
    kernel.put_tokens([stored[n] for n in new], list(new.values()), i0, i1, pos_table, positions or [])
    return True


def small_attention(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attend_small takes these queries q [B, H, T, D] over values v [B, KV, S, D] (in some dtype
    it reads): few queries per KV head, on the CPU, with the kernel built."""
    b, h, t, d = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.float32 and v.dtype in (torch.float32, torch.bfloat16)
            and d % 8 == 0 and (h // v.shape[1]) * t <= MAX_SMALL_ATTENTION_ROWS and native() is not None)


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
    return native().attend_small(q, k, v, qpos, kpos, window or 0, sees_until, scale, blocks, w, cos, sin)


"""Matrix products with quantised weights: y = x @ dequantize(W).T.

On the CPU a small AVX2 kernel (compiled once by torch.utils.cpp_extension and cached) reads the
packed weights directly: for each 32 (or 16) weights it widens the integers to float, multiplies
by the float32 activations and applies the group's scale, so a decode step reads each weight byte
once and never materialises a float matrix. The activations stay float32, so the result equals the
float product with the dequantised matrix up to summation order. torch's own int4/int8 CPU ops were
measured here 10-100x slower than the bandwidth roofline at decode shapes (see the report in
`measure_kernels`), hence this kernel.

Everywhere else (CUDA, no compiler, GEMMs of many rows) the weight is dequantised and multiplied
with torch: one matrix at a time, transiently.
"""

from __future__ import annotations

import os
import threading

import torch
from torch.nn import functional as F

from .formats import QuantWeight

# Up to this many rows the kernel runs; above, dequantise + BLAS is faster (compute-bound).
MAX_KERNEL_ROWS = 8

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 u8f(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static inline __m256 i8f(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// out[m, n] = sum_k x[m, k] * (scale[n, k/g] * q[n, k] + zero[n, k/g])
torch::Tensor qmm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                  int64_t bits, int64_t group) {
    pybind11::gil_scoped_release no_gil;  // other Python threads (the HTTP server) run during the product
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
"""

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

        return load_inline(name="gemma4_qmm_v3", cpp_sources=_SOURCE, functions=["qmm"],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c"], verbose=False)
    except Exception:  # no compiler, no headers: the plain-torch path serves
        return None


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags
    except OSError:
        return False


def qlinear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., K] @ dequantize(w).T -> [..., N]; w is one matrix ([N, ...])."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.device.type == "cpu" and x2.dtype == torch.float32 and x2.shape[0] <= MAX_KERNEL_ROWS:
        kernel = native()
        if kernel is not None:
            return kernel.qmm(x2.contiguous(), w.q, w.scale, w.zero, w.bits, w.group).reshape(*lead, -1)
    return F.linear(x, w.dequantize(x.dtype))

// One block of 32 of a weight row in the int8-activation row kernels, on 256-bit registers: its bytes, its integer
// dot product with a row of int8 activations, its scale. Included by quant_products.cpp and, compiled for AVX-512, by
// row_products_avx512.cpp, whose 512-bit kernels finish their odd last block with these: the same source, the same
// operations and bits.
#pragma once

#include "common.h"

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

// sum += the products of unsigned bytes u with signed bytes s, four adjacent ones per 32-bit lane: one VNNI
// instruction where the build targets it (common.h), else maddubs + madd (no saturation here: a pair of
// products stays within 2 * 128 * 127 < 2^15), the same integers either way.
static inline __m256i dot4_add(__m256i sum, __m256i u, __m256i s) {
#if defined(GEMMA4_VNNI_AVX)
    return _mm256_dpbusd_avx_epi32(sum, u, s);
#elif defined(GEMMA4_VNNI_AVX512)
    return _mm256_dpbusd_epi32(sum, u, s);
#else
    return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

template <int BITS>
static inline __m256 block_dot(__m256i w, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)x), zero = _mm256_setzero_si256();
    if (BITS == 4) return _mm256_cvtepi32_ps(dot4_add(zero, w, xv));
    return _mm256_cvtepi32_ps(dot4_add(zero, _mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)));
}

// Scales (and offsets) are float32, or f16 as GGUF's Q8_0 and Q5 blocks hold them (widened exactly by F16C).
static inline float scale_at(const float* s, int64_t i) { return s[i]; }
static inline float scale_at(const uint16_t* s, int64_t i) { return _cvtsh_ss(s[i]); }

template <int BITS, bool G16, typename ST>
static inline __m256 block_scale(const ST* sr, int64_t b) {
    if (G16) return _mm256_set_m128(_mm_set1_ps(scale_at(sr, 2 * b + 1)), _mm_set1_ps(scale_at(sr, 2 * b)));
    return _mm256_set1_ps(scale_at(sr, b));
}

// The K-quant row kernels (Q6_K's int6, Q4_K's int4) and the nibble loads they share with int4 pair4: MR rows
// of int8 activations against one weight row, on 256-bit registers. Included by quant_products.cpp and, compiled for
// AVX-512 (32 registers: 8 rows' chains without spilling), by row_products_avx512.cpp for tiles of more than 4
// rows: the same source, so the same operations and bits.
#pragma once

#include "common.h"

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

// The int8-activation row kernel for int8 weights (quant_products.cpp's row_dot: Q8_0, Q5_0, Q5_1 as held) on 512-bit
// registers with AVX-512 VNNI: compiled for that target and called only where the CPU has it (set_row_kernels). It
// gives the bits of its 256-bit twin: integer sums are exact whatever instructions form them, and every float
// multiply, add and fused multiply-add happens on the same values in the same order, the halves of one 512-bit
// register holding the two 256-bit chains (even and odd blocks), added and reduced at the end as the 256-bit kernel
// adds and reduces them. int4 and the K-quants (Q4_K, Q6_K) keep their 256-bit kernels: 512-bit versions with the
// same bits (pairs of blocks, or two rows, in the halves) measured 0.8-1.1x of them on this Xeon (their nibble
// unpacking and half-register inserts eat what the wider products save). The K-quants' 256-bit kernels are compiled
// here too, for this target, where its 32 registers take tiles of 8 rows (each weight block unpacked once per 8).
#include "common.h"

bool g_rows_wide = false;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

#include "row_blocks.h"     // the odd last block of the int8 kernel, as quant_products.cpp computes it
#include "k_quant_rows.h"  // compiled here for this target: 32 registers hold 8 rows' chains

namespace {

constexpr int WIDE_MR = 8;  // rows per weight row: 32 registers hold 8 rows' chains

inline __m256 high256(__m512 v) { return _mm512_extractf32x8_ps(v, 1); }

// ---- int8: blocks b | b + 1 in the halves ----
// The weight scales of blocks b, b + 1 as float32: G16 four (2b .. 2b + 3), else two (lanes 0, 1).
template <bool G16>
inline __m128 scales_of_two(const float* s, int64_t b) {
    return G16 ? _mm_loadu_ps(s + 2 * b) : _mm_castpd_ps(_mm_load_sd((const double*)(s + b)));
}
template <bool G16>
inline __m128 scales_of_two(const uint16_t* s, int64_t b) {
    if (G16) return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(s + 2 * b)));
    int32_t two;
    std::memcpy(&two, s + b, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(two));
}

template <bool G16, int MR, typename ST>
void row_dot8(const uint8_t* qr, const ST* sr, const ST* zr, int64_t B, const int8_t* XQ, const float* XD,
              const float* XS, int64_t K, float* out, int64_t ostride) {
    // lane i of the product: (scale x xd) of its block (G16: of its 16), as the 256-bit kernel's block_scale * xd
    const __m512i spread = G16 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                               : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {
        prefetch_ahead(qr + b * 32);
        // VNNI multiplies unsigned by signed bytes: |w| by x with w's sign (the 256-bit kernel's sign trick)
        const __m512i w = _mm512_loadu_si512(qr + b * 32);
        const __m512i aw = _mm512_abs_epi8(w);
        const __mmask64 neg = _mm512_movepi8_mask(w);
        const __m128 ws = scales_of_two<G16>(sr, b);
        for (int r = 0; r < MR; ++r) {
            const __m512i x = _mm512_loadu_si512(XQ + r * K + b * 32);
            const __m512i p = _mm512_dpbusd_epi32(zero, aw, _mm512_mask_sub_epi8(x, neg, zero, x));
            __m128 xd = _mm_castpd_ps(_mm_load_sd((const double*)(XD + r * B + b)));
            if (G16) xd = _mm_unpacklo_ps(xd, xd);
            const __m512 d = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(ws, xd)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, acc[r]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        __m256 a = _mm256_add_ps(_mm512_castps512_ps256(acc[r]), high256(acc[r]));
        for (int64_t t = b; t < B; ++t) {  // an odd last block, into the even chain as the 256-bit kernel adds it
            const __m256 d = _mm256_mul_ps(block_scale<8, G16>(sr, t), _mm256_set1_ps(XD[r * B + t]));
            a = _mm256_fmadd_ps(block_dot<8>(load_block<8>(qr, t), XQ + r * K + t * 32), d, a);
        }
        float y = hsum(a);
        if (zr != nullptr) y += dot_scales(zr, XS + r * B, B);
        out[r * ostride] = y;
    }
}

// MR (1 .. WIDE_MR) as a template argument: f<MR>(args...).
#define BY_ROWS(MR, CALL)                                   \
    switch (MR) {                                           \
        case 1: CALL(1); break;                             \
        case 2: CALL(2); break;                             \
        case 3: CALL(3); break;                             \
        case 4: CALL(4); break;                             \
        case 5: CALL(5); break;                             \
        case 6: CALL(6); break;                             \
        case 7: CALL(7); break;                             \
        default: CALL(8); break;                            \
    }

// MR 5 .. 8 (the K-quants' 256-bit kernels: up to 4 rows, quant_products.cpp's instances serve)
#define BY_MORE_ROWS(MR, CALL)                              \
    switch (MR) {                                           \
        case 5: CALL(5); break;                             \
        case 6: CALL(6); break;                             \
        case 7: CALL(7); break;                             \
        default: CALL(8); break;                            \
    }

}  // namespace

bool dot_rows_wide(const Weight& w, int64_t n, const int8_t* xq, const float* xd, const float* xs, const int16_t* x16,
                   int64_t K, int MR, float* o, int64_t ostride) {
    const int64_t B = K / 32, G = w.G;
    const uint8_t* qr = w.Q + n * w.row_bytes;
    if (w.bits == 6 || (w.bits == 4 && w.group == 256)) {
        if (MR <= ROW_TILE) return false;
        const float* dr = w.sc.f32 + n * G;
        const int8_t* sub = w.SUB + n * (K / 16);
#define SIX(M) row_dot6<M>(qr, dr, sub, B, xq, xd, x16, K, o, ostride)
#define FOURK(M) row_dot4k<M>(qr, dr, w.sc.z32 + n * G, sub, B, xq, xd, xs, K, o, ostride)
        if (w.bits == 6) { BY_MORE_ROWS(MR, SIX) } else { BY_MORE_ROWS(MR, FOURK) }
        return true;
    }
    if (w.bits != 8) return false;
    if (w.sc.f16) {
        const uint16_t* sr = w.sc.f16 + n * G;
        const uint16_t* zr = w.sc.z16 ? w.sc.z16 + n * G : nullptr;
#define F16_32(M) row_dot8<false, M>(qr, sr, zr, B, xq, xd, xs, K, o, ostride)
#define F16_16(M) row_dot8<true, M>(qr, sr, zr, B, xq, xd, xs, K, o, ostride)
        if (w.group == 32) { BY_ROWS(MR, F16_32) } else { BY_ROWS(MR, F16_16) }
    } else {
        const float* sr = w.sc.f32 + n * G;
        const float* zr = w.sc.z32 ? w.sc.z32 + n * G : nullptr;
#define F32_32(M) row_dot8<false, M>(qr, sr, zr, B, xq, xd, xs, K, o, ostride)
#define F32_16(M) row_dot8<true, M>(qr, sr, zr, B, xq, xd, xs, K, o, ostride)
        if (w.group == 32) { BY_ROWS(MR, F32_32) } else { BY_ROWS(MR, F32_16) }
    }
    return true;
}

#pragma GCC pop_options

int64_t row_tile(const Weight& w) { return g_rows_wide && (w.bits != 4 || w.group == 256) ? WIDE_MR : ROW_TILE; }

static bool cpu_has_wide() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}

std::string set_row_kernels(std::string name) {
    TORCH_CHECK(name == "avx2" || name == "avx512", "row kernels: ", name, " is neither avx2 nor avx512");
    TORCH_CHECK(name == "avx2" || cpu_has_wide(), "row kernels: this CPU lacks AVX-512 F/BW/VL/DQ/VNNI");
    g_rows_wide = name == "avx512";
    return row_kernels();
}

std::string row_kernels() { return g_rows_wide ? "avx512" : "avx2"; }

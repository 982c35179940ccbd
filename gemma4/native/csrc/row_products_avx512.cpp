// The int8-activation row kernels of quant_products.cpp (row_dot, row_dot4k, row_dot6) on 512-bit registers with
// AVX-512 VNNI: compiled for that target and called only where the CPU has it (set_row_kernels). Each gives the
// bits of its 256-bit twin: integer sums are exact whatever instruction forms them, and every float multiply, add
// and fused multiply-add happens on the same values in the same order, a 512-bit register's halves holding what
// two 256-bit ones held:
// - int8 and int4 pair4 (two FMA chains per row: even and odd blocks, or pairs of blocks): the two chains' blocks
//   in the low and high halves, added and reduced at the end as the 256-bit kernel adds and reduces them;
// - Q4_K and Q6_K (one chain per row, the blocks in sequence): two rows in the halves, each row's chain as it was.
#include "common.h"

bool g_rows_wide = false;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace {

constexpr int WIDE_MR = 8;  // rows per weight row: 32 registers hold 8 rows' chains

inline __m512i two256(const void* lo, const void* hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)lo)),
                              _mm256_loadu_si256((const __m256i*)hi), 1);
}
inline __m512 two256f(const float* lo, const float* hi) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(lo)), _mm256_loadu_ps(hi), 1);
}
inline __m256 high256(__m512 v) { return _mm512_extractf32x8_ps(v, 1); }
inline __m512i both256(const void* p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p)); }

// ---- the 256-bit pieces the kernels' tails share with quant_products.cpp (the same operations) ----
inline __m256i dot4_add(__m256i sum, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(sum, u, s); }

template <int BITS>
inline __m256i load_block(const uint8_t* qr, int64_t b) {
    if (BITS == 4) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(qr + b * 16));
        const __m128i m15 = _mm_set1_epi8(15);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m15), _mm_and_si128(v, m15));
    }
    return _mm256_loadu_si256((const __m256i*)(qr + b * 32));
}

template <int BITS>
inline __m256 block_dot(__m256i w, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)x), zero = _mm256_setzero_si256();
    if (BITS == 4) return _mm256_cvtepi32_ps(dot4_add(zero, w, xv));
    return _mm256_cvtepi32_ps(dot4_add(zero, _mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)));
}

inline float scale_at(const float* s, int64_t i) { return s[i]; }
inline float scale_at(const uint16_t* s, int64_t i) { return _cvtsh_ss(s[i]); }

template <bool G16, typename ST>
inline __m256 block_scale(const ST* sr, int64_t b) {
    if (G16) return _mm256_set_m128(_mm_set1_ps(scale_at(sr, 2 * b + 1)), _mm_set1_ps(scale_at(sr, 2 * b)));
    return _mm256_set1_ps(scale_at(sr, b));
}

// ---- int8 (and int4 pair4): blocks b | b + 1 (pairs b, b + 1 | b + 2, b + 3) in the halves ----
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

// XD8: each activation block's scale 8 times ([M, B, 8]), so that one load gives a pair of blocks' lanes.
template <bool G16, int MR, typename ST>
void row_dot8(const uint8_t* qr, const ST* sr, const ST* zr, int64_t B, const int8_t* XQ, const float* XD,
              const float* XD8, const float* XS, int64_t K, float* out, int64_t ostride) {
    // lane i of the product: (scale x xd) of its block (G16: of its 16), as the 256-bit kernel's block_scale * xd
    const __m512i spread = G16 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                               : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {
        prefetch_ahead(qr + b * 32);
        const __m512i w = _mm512_loadu_si512(qr + b * 32);
        const __m512i aw = _mm512_abs_epi8(w);
        const __mmask64 neg = _mm512_movepi8_mask(w);
        const __m512 ws = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scales_of_two<G16>(sr, b)));
        for (int r = 0; r < MR; ++r) {
            const __m512i x = _mm512_loadu_si512(XQ + r * K + b * 32);
            const __m512i p = _mm512_dpbusd_epi32(zero, aw, _mm512_mask_sub_epi8(x, neg, zero, x));
            const __m512 d = _mm512_mul_ps(ws, _mm512_loadu_ps(XD8 + (r * B + b) * 8));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, acc[r]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        __m256 a = _mm256_add_ps(_mm512_castps512_ps256(acc[r]), high256(acc[r]));
        for (int64_t t = b; t < B; ++t) {  // an odd last block, into the even chain as the 256-bit kernel adds it
            const __m256 d = _mm256_mul_ps(block_scale<G16>(sr, t), _mm256_set1_ps(XD[r * B + t]));
            a = _mm256_fmadd_ps(block_dot<8>(load_block<8>(qr, t), XQ + r * K + t * 32), d, a);
        }
        float y = hsum(a);
        if (zr != nullptr) y += dot_scales(zr, XS + r * B, B);
        out[r * ostride] = y;
    }
}

template <int MR>
void row_dot4(const uint8_t* qr, const float* sr, const float* zr, int64_t B, const int8_t* XQ, const float* XD,
              const float* XS, int64_t K, float* out, int64_t ostride) {
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i m15 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) {  // pairs b, b + 1 (low half: the 256-bit kernel's acc) and b + 2, b + 3 (acc2)
        prefetch_ahead(qr + b * 16);
        const __m512i v = _mm512_loadu_si512(qr + b * 16);
        const __m512i lo = _mm512_and_si512(v, m15), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
        const __m128 ws = _mm_loadu_ps(sr + b);
        for (int r = 0; r < MR; ++r) {
            const int8_t* x = XQ + r * K + b * 32;
            const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, two256(x, x + 64)), hi, two256(x + 32, x + 96));
            const __m512 d = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(ws, _mm_loadu_ps(XD + r * B + b))));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, acc[r]);
        }
    }
    const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (int r = 0; r < MR; ++r) {
        __m256 a = _mm512_castps512_ps256(acc[r]);
        if (b + 2 <= B) {  // a last whole pair, into the first chain
            const int8_t* x = XQ + r * K + b * 32;
            const __m256i v = _mm256_loadu_si256((const __m256i*)(qr + b * 16)), m15h = _mm256_set1_epi8(15);
            const __m256i wl = _mm256_and_si256(v, m15h), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15h);
            const __m256 p = _mm256_cvtepi32_ps(dot4_add(dot4_add(_mm256_setzero_si256(), wl, _mm256_loadu_si256((const __m256i*)x)),
                                                         wh, _mm256_loadu_si256((const __m256i*)(x + 32))));
            const __m128 ws = _mm_castpd_ps(_mm_load_sd((const double*)(sr + b)));
            const __m128 d2 = _mm_mul_ps(ws, _mm_castpd_ps(_mm_load_sd((const double*)(XD + r * B + b))));
            a = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d2), halves), a);
        }
        a = _mm256_add_ps(a, high256(acc[r]));
        const int64_t t = b + 2 <= B ? b + 2 : b;
        if (t < B) {  // an odd last block, unpaired
            const __m256 d = _mm256_mul_ps(_mm256_set1_ps(sr[t]), _mm256_set1_ps(XD[r * B + t]));
            a = _mm256_fmadd_ps(block_dot<4>(load_block<4>(qr, t), XQ + r * K + t * 32), d, a);
        }
        float y = hsum(a);
        if (zr != nullptr) y += dot_scales(zr, XS + r * B, B);
        out[r * ostride] = y;
    }
}

// ---- Q4_K and Q6_K: rows 2i | 2i + 1 in the halves (an odd last row twice, its low half kept) ----
inline int row_of(int i, int half, int MR) { return std::min(2 * i + half, MR - 1); }

template <int MR>
void out_pairs(const __m512* acc, float* out, int64_t ostride) {
    for (int i = 0; i < (MR + 1) / 2; ++i) {
        out[row_of(i, 0, MR) * ostride] = hsum(_mm512_castps512_ps256(acc[i]));
        if (2 * i + 1 < MR) out[(2 * i + 1) * ostride] = hsum(high256(acc[i]));
    }
}

template <int MR>
void row_dot4k(const uint8_t* qr, const float* dr, const float* zr, const int8_t* sub, int64_t B, const int8_t* XQ,
               const float* XD, const float* XS, int64_t K, float* out, int64_t ostride) {
    constexpr int P = (MR + 1) / 2;
    __m512 acc[P];
    for (int i = 0; i < P; ++i) acc[i] = _mm512_setzero_ps();
    const __m512i m15 = _mm512_set1_epi8(15);
    for (int64_t s = 0; s < B / 8; ++s) {
        prefetch_ahead(qr + s * 128);
        prefetch_ahead(qr + s * 128 + 64);
        const __m512i s16 = _mm512_broadcast_i64x4(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(sub + 16 * s))));
        const __m512 mz = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(s16, 16)), _mm512_set1_ps(zr[s]));
        __m512 dx[P];
        for (int i = 0; i < P; ++i) {
            const int r0 = row_of(i, 0, MR), r1 = row_of(i, 1, MR);
            dx[i] = _mm512_mul_ps(two256f(XD + r0 * B + 8 * s, XD + r1 * B + 8 * s), _mm512_set1_ps(dr[s]));
            acc[i] = _mm512_fmadd_ps(mz, two256f(XS + r0 * B + 8 * s, XS + r1 * B + 8 * s), acc[i]);
        }
        for (int p = 0; p < 4; ++p) {
            const int64_t b = 8 * s + 2 * p;
            const __m512i v = both256(qr + b * 16);
            const __m512i lo = _mm512_and_si512(v, m15), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
            const __m512i lanes = _mm512_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1,
                                                    8 + 2 * p, 8 + 2 * p, 8 + 2 * p, 8 + 2 * p,
                                                    9 + 2 * p, 9 + 2 * p, 9 + 2 * p, 9 + 2 * p);
            // sc as float: each lane's sum of 8 products times its sc is an integer under 2^24 (15 * 127 * 8 * 63),
            // so the float product of the two is the 256-bit kernel's integer madd, exactly
            const __m512 sc = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(_mm512_permutexvar_epi32(lanes, s16), 16), 16));
            for (int i = 0; i < P; ++i) {
                const int8_t* x0 = XQ + row_of(i, 0, MR) * K + b * 32;
                const int8_t* x1 = XQ + row_of(i, 1, MR) * K + b * 32;
                const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, two256(x0, x1)),
                                                        hi, two256(x0 + 32, x1 + 32));
                const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), sc);
                acc[i] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(lanes, dx[i]), acc[i]);
            }
        }
    }
    out_pairs<MR>(acc, out, ostride);
}

template <int MR>
inline void six_block(__m512i code, int j, __m512i s16, const __m512* dx, int64_t b, const int8_t* XQ, int64_t K,
                      __m512* acc) {
    // lanes 0-3 of each half: sub-scale 2j (the low 16 bits of s16's lane j), lanes 4-7: 2j + 1 (the high 16), as
    // float: a lane's sum of 4 products times it is an integer under 2^24 (63 * 127 * 4 * 128), so the float
    // product is the 256-bit kernel's integer madd, exactly
    const __m512i up = _mm512_setr_epi32(16, 16, 16, 16, 0, 0, 0, 0, 16, 16, 16, 16, 0, 0, 0, 0);
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(_mm512_permutexvar_epi32(_mm512_set1_epi32(j), s16), up), 16));
    const __m512i lane = _mm512_setr_epi32(j, j, j, j, j, j, j, j, 8 + j, 8 + j, 8 + j, 8 + j, 8 + j, 8 + j, 8 + j, 8 + j);
    for (int i = 0; i < (MR + 1) / 2; ++i) {
        const __m512i xv = two256(XQ + row_of(i, 0, MR) * K + b * 32, XQ + row_of(i, 1, MR) * K + b * 32);
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), code, xv)), sc);
        acc[i] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(lane, dx[i]), acc[i]);
    }
}

template <int MR>
void row_dot6(const uint8_t* qr, const float* dr, const int8_t* sub, int64_t B, const int8_t* XQ, const float* XD,
              const int16_t* XS16, int64_t K, float* out, int64_t ostride) {
    constexpr int P = (MR + 1) / 2;
    __m512 acc[P];
    for (int i = 0; i < P; ++i) acc[i] = _mm512_setzero_ps();
    const __m512i m30 = _mm512_set1_epi8(0x30), m15 = _mm512_set1_epi8(15);
    for (int64_t s = 0; s < B / 8; ++s) {
        const __m512i s16 = _mm512_broadcast_i64x4(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(sub + 16 * s))));
        __m512 dx[P];
        for (int i = 0; i < P; ++i) {
            const int r0 = row_of(i, 0, MR), r1 = row_of(i, 1, MR);
            dx[i] = _mm512_mul_ps(two256f(XD + r0 * B + 8 * s, XD + r1 * B + 8 * s), _mm512_set1_ps(dr[s]));
            const __m512i c = _mm512_madd_epi16(s16, two256(XS16 + r0 * (K / 16) + 16 * s, XS16 + r1 * (K / 16) + 16 * s));
            acc[i] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(dx[i], _mm512_set1_ps(32.0f)), acc[i]);
        }
        for (int h = 0; h < 2; ++h) {
            const uint8_t* unit = qr + (2 * s + h) * 96;
            prefetch_ahead(unit);
            prefetch_ahead(unit + 64);
            const __m512i v01 = both256(unit), v23 = both256(unit + 32), high = both256(unit + 64);
            const int64_t b = 8 * s + 4 * h;
            six_block<MR>(_mm512_or_si512(_mm512_and_si512(v01, m15), _mm512_and_si512(_mm512_slli_epi16(high, 4), m30)),
                          4 * h, s16, dx, b, XQ, K, acc);
            six_block<MR>(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v01, 4), m15),
                                          _mm512_and_si512(_mm512_slli_epi16(high, 2), m30)),
                          4 * h + 1, s16, dx, b + 1, XQ, K, acc);
            six_block<MR>(_mm512_or_si512(_mm512_and_si512(v23, m15), _mm512_and_si512(high, m30)),
                          4 * h + 2, s16, dx, b + 2, XQ, K, acc);
            six_block<MR>(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v23, 4), m15),
                                          _mm512_and_si512(_mm512_srli_epi16(high, 2), m30)),
                          4 * h + 3, s16, dx, b + 3, XQ, K, acc);
        }
    }
    out_pairs<MR>(acc, out, ostride);
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

}  // namespace

bool dot_rows_wide(const Weight& w, int64_t n, const int8_t* xq, const float* xd, const float* xd8, const float* xs,
                   const int16_t* x16, int64_t K, int MR, float* o, int64_t ostride) {
    const int64_t B = K / 32, G = w.G;
    const uint8_t* qr = w.Q + n * w.row_bytes;
    const float* sr = w.sc.f32 ? w.sc.f32 + n * G : nullptr;
    const float* zr = w.sc.z32 ? w.sc.z32 + n * G : nullptr;
    if (w.sc.f16) {
        const uint16_t* srh = w.sc.f16 + n * G;
        const uint16_t* zrh = w.sc.z16 ? w.sc.z16 + n * G : nullptr;
#define F16_32(M) row_dot8<false, M>(qr, srh, zrh, B, xq, xd, xd8, xs, K, o, ostride)
#define F16_16(M) row_dot8<true, M>(qr, srh, zrh, B, xq, xd, xd8, xs, K, o, ostride)
        if (w.group == 32) { BY_ROWS(MR, F16_32) } else { BY_ROWS(MR, F16_16) }
        return true;
    }
    // Q4_K and Q6_K pair rows: one row alone keeps the 256-bit kernel (it would fill half a register)
    if ((w.bits == 6 || (w.bits == 4 && w.group == 256)) && MR < 2) return false;
    const int8_t* sub = w.SUB ? w.SUB + n * (K / 16) : nullptr;
#define SIX(M) row_dot6<M>(qr, sr, sub, B, xq, xd, x16, K, o, ostride)
#define FOURK(M) row_dot4k<M>(qr, sr, zr, sub, B, xq, xd, xs, K, o, ostride)
#define FOUR(M) row_dot4<M>(qr, sr, zr, B, xq, xd, xs, K, o, ostride)
#define F32_32(M) row_dot8<false, M>(qr, sr, zr, B, xq, xd, xd8, xs, K, o, ostride)
#define F32_16(M) row_dot8<true, M>(qr, sr, zr, B, xq, xd, xd8, xs, K, o, ostride)
    if (w.bits == 6) { BY_ROWS(MR, SIX) }
    else if (w.bits == 4 && w.group == 256) { BY_ROWS(MR, FOURK) }
    else if (w.bits == 4) { BY_ROWS(MR, FOUR) }
    else if (w.group == 32) { BY_ROWS(MR, F32_32) }
    else { BY_ROWS(MR, F32_16) }
    return true;
}

#pragma GCC pop_options

int64_t row_tile() { return g_rows_wide ? WIDE_MR : ROW_TILE; }

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

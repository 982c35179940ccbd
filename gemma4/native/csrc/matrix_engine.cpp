// Many-row products on the CPU's matrix engine: a quantised matrix is dequantised to bf16 once per call (once per
// prefill chunk), then multiplied by the chunk's rows, rounded to bf16, in a GEMM that sums in float32 and writes
// float32 (MKL's cblas_gemm_bf16bf16f32, which runs on AMX tiles where the CPU has them). The dequantisation has
// an AVX-512 (BW, BF16) version and a plain one beside it; both give the bits of QuantWeight.dequantize(bfloat16):
// scale * q (+ zero) in float32, the products and sums in the same order (no fused multiply-add), rounded to
// nearest even.
#include "common.h"

#include <dlfcn.h>

namespace {

// bf16 of a float32, rounded to nearest even (NaN kept a quiet NaN), as torch's .to(bfloat16) does.
inline uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

// One matrix row's element i of block b as float32, and the per-row layouts, read as Weight describes them.
struct RowReader {
    const Weight& w;
    int64_t K;
    float step(int64_t n, int64_t g) const {
        return w.sc.f16 ? f16_to_f32(w.sc.f16[n * w.G + g]) : w.sc.f32[n * w.G + g];
    }
    bool has_zero() const { return w.sc.z16 || w.sc.z32; }
    float zero(int64_t n, int64_t g) const {
        return w.sc.z16 ? f16_to_f32(w.sc.z16[n * w.G + g]) : w.sc.z32[n * w.G + g];
    }
};

// ---- the plain version: any x86 CPU -----------------------------------------------------------------------------
// (no contraction of a product and a sum into one fused multiply-add: the reference rounds the product first)
__attribute__((optimize("fp-contract=off"))) void dequant_row_plain(const Weight& w, int64_t K, int64_t n, uint16_t* out) {
    const RowReader rd{w, K};
    const uint8_t* qr = w.Q + n * w.row_bytes;
    if (w.bits == 8) {
        const int8_t* q = (const int8_t*)qr;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t g = k / w.group;
            float v = (float)q[k] * rd.step(n, g);
            if (rd.has_zero()) v = v + rd.zero(n, g);
            out[k] = to_bf16(v);
        }
    } else if (w.bits == 4) {
        for (int64_t b = 0; b < K / 32; ++b) {
            float s, z;
            if (w.group == 256) {  // Q4_K: the block's integer multipliers times the group's scale and offset
                const int8_t* sub = w.SUB + n * (K / 16) + 2 * b;
                s = rd.step(n, b / 8) * (float)sub[0];
                z = rd.zero(n, b / 8) * (float)sub[1];
            } else {
                s = rd.step(n, b);
                z = rd.has_zero() ? rd.zero(n, b) : 0.0f;
            }
            const uint8_t* p = qr + b * 16;
            for (int i = 0; i < 32; ++i) {
                const int c = i < 16 ? (p[i] & 15) : (p[i - 16] >> 4);
                float v = (float)c * s;
                if (w.group == 256 || rd.has_zero()) v = v + z;
                out[b * 32 + i] = to_bf16(v);
            }
        }
    } else {  // int6: 96 bytes per 128 elements
        for (int64_t u = 0; u < K / 128; ++u) {
            const uint8_t* p = qr + u * 96;
            for (int j = 0; j < 4; ++j) {
                for (int i = 0; i < 32; ++i) {
                    const int low = j < 2 ? (p[i] >> (4 * j)) & 15 : (p[32 + i] >> (4 * (j - 2))) & 15;
                    const int high = (p[64 + i] >> (2 * j)) & 3;
                    const int64_t k = u * 128 + j * 32 + i;
                    const float st = rd.step(n, k / 256) * (float)w.SUB[n * (K / 16) + k / 16];
                    out[k] = to_bf16((float)((low | (high << 4)) - 32) * st);
                }
            }
        }
    }
}

// ---- AVX-512 (F, BW, VL, BF16) --------------------------------------------------------------------------------
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

AVX512_BF16 inline void store32(uint16_t* out, __m512 lo, __m512 hi) {
    _mm512_storeu_si512((void*)out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
AVX512_BF16 inline __m512 i8x16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
AVX512_BF16 inline __m512 u8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

AVX512_BF16 void dequant_row_avx512(const Weight& w, int64_t K, int64_t n, uint16_t* out) {
    const RowReader rd{w, K};
    const uint8_t* qr = w.Q + n * w.row_bytes;
    if (w.bits == 8) {
        const int8_t* q = (const int8_t*)qr;
        const bool zero = rd.has_zero();
        for (int64_t k = 0; k < K; k += 32) {
            const int64_t g0 = k / w.group, g1 = (k + 16) / w.group;
            __m512 lo = _mm512_mul_ps(i8x16(q + k), _mm512_set1_ps(rd.step(n, g0)));
            __m512 hi = _mm512_mul_ps(i8x16(q + k + 16), _mm512_set1_ps(rd.step(n, g1)));
            if (zero) {
                lo = _mm512_add_ps(lo, _mm512_set1_ps(rd.zero(n, g0)));
                hi = _mm512_add_ps(hi, _mm512_set1_ps(rd.zero(n, g1)));
            }
            store32(out + k, lo, hi);
        }
    } else if (w.bits == 4) {
        const __m128i mask = _mm_set1_epi8(15);
        const bool zero = w.group == 256 || rd.has_zero();
        for (int64_t b = 0; b < K / 32; ++b) {
            float s, z = 0.0f;
            if (w.group == 256) {
                const int8_t* sub = w.SUB + n * (K / 16) + 2 * b;
                s = rd.step(n, b / 8) * (float)sub[0];
                z = rd.zero(n, b / 8) * (float)sub[1];
            } else {
                s = rd.step(n, b);
                if (zero) z = rd.zero(n, b);
            }
            const __m128i p = _mm_loadu_si128((const __m128i*)(qr + b * 16));
            __m512 lo = _mm512_mul_ps(u8x16(_mm_and_si128(p, mask)), _mm512_set1_ps(s));
            __m512 hi = _mm512_mul_ps(u8x16(_mm_and_si128(_mm_srli_epi16(p, 4), mask)), _mm512_set1_ps(s));
            if (zero) {
                lo = _mm512_add_ps(lo, _mm512_set1_ps(z));
                hi = _mm512_add_ps(hi, _mm512_set1_ps(z));
            }
            store32(out + b * 32, lo, hi);
        }
    } else {
        const __m128i mask = _mm_set1_epi8(15), three = _mm_set1_epi8(3);
        const int8_t* sub = w.SUB + n * (K / 16);
        for (int64_t u = 0; u < K / 128; ++u) {
            const uint8_t* p = qr + u * 96;
            const float d = rd.step(n, u / 2);
            for (int j = 0; j < 4; ++j) {
                for (int h = 0; h < 2; ++h) {  // 16 elements at a time: one sub-scale each
                    const __m128i l = _mm_loadu_si128((const __m128i*)(p + (j < 2 ? 0 : 32) + 16 * h));
                    const __m128i hb = _mm_loadu_si128((const __m128i*)(p + 64 + 16 * h));
                    const __m128i low = _mm_and_si128(j % 2 ? _mm_srli_epi16(l, 4) : l, mask);
                    const __m128i high = _mm_and_si128(_mm_srli_epi16(hb, 2 * j), three);
                    const __m128i c = _mm_or_si128(low, _mm_slli_epi16(high, 4));
                    const int64_t k = u * 128 + j * 32 + 16 * h;
                    const __m512 v = _mm512_sub_ps(u8x16(c), _mm512_set1_ps(32.0f));
                    const __m512 r = _mm512_mul_ps(v, _mm512_set1_ps(d * (float)sub[k / 16]));
                    _mm256_storeu_si256((__m256i*)(out + k), (__m256i)_mm512_cvtneps_pbh(r));
                }
            }
        }
    }
}

bool has_avx512_bf16() {
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    return yes;
}

}  // namespace

GemmBf16 gemm_bf16() {
    static const GemmBf16 f = (GemmBf16)dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32");
    return f;
}

// The quantised matrix [N, K] as bf16 (QuantWeight.dequantize(bfloat16)'s bits); plain=true forces the plain
// version (tests compare the two).
torch::Tensor dequantize_bf16(torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt, int64_t bits,
                              int64_t group, c10::optional<torch::Tensor> sub_opt, bool plain) {
    const NoGil no_gil;
    const int64_t N = q.size(0);
    const int64_t K = bits == 4 ? q.size(1) * 2 : bits == 6 ? q.size(1) / 3 * 4 : q.size(1);
    const Weight w(q, scale, zero_opt, bits, group, sub_opt, K, "dequantize_bf16");
    auto out = torch::empty({N, K}, q.options().dtype(torch::kBFloat16));
    uint16_t* O = (uint16_t*)out.data_ptr();
    const bool wide = !plain && has_avx512_bf16();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            if (wide) dequant_row_avx512(w, K, n, O + n * K);
            else dequant_row_plain(w, K, n, O + n * K);
        }
    });
    return out;
}

bool matrix_engine_gemm() { return gemm_bf16() != nullptr; }

// x [M, K] bf16 times w [N, K] bf16 transposed -> [M, N] float32, float32 sums.
torch::Tensor mm_bf16_f32(torch::Tensor x, torch::Tensor w) {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "mm_bf16_f32: bf16 inputs");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "mm_bf16_f32: [M, K] and [N, K]");
    TORCH_CHECK(x.stride(1) == 1 && w.stride(1) == 1, "mm_bf16_f32: rows must be contiguous");
    const GemmBf16 gemm = gemm_bf16();
    TORCH_CHECK(gemm != nullptr, "mm_bf16_f32: this torch build has no cblas_gemm_bf16bf16f32");
    const NoGil no_gil;
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    TORCH_CHECK(M < INT32_MAX && N < INT32_MAX && K < INT32_MAX, "mm_bf16_f32: too large");
    auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
    if (M == 0 || N == 0) return out;
    if (K == 0) return out.zero_();
    gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, (int)M, (int)N, (int)K, 1.0f, (const uint16_t*)x.data_ptr(), (int)x.stride(0),
         (const uint16_t*)w.data_ptr(), (int)w.stride(0), 0.0f, out.data_ptr<float>(), (int)N);
    return out;
}

// Products of groups of rows with their own matrices on the matrix engine: rows offsets[g] .. offsets[g + 1] of xb
// [P, K] (bf16) times matrix ids[g] of the stacked quantised w [E, N, K] (a single matrix: E = 1) -> [P, N] float32.
// Work items are (group, tile of TILE_BYTES of bf16 weight rows): each thread dequantises a tile into its own
// buffer, which stays in its L2 cache while the GEMM (single-threaded inside the parallel region) reads it, so the
// bf16 matrix is never written out whole; dense products (one group) spread their tiles over the threads, routed
// experts their groups.
constexpr int64_t TILE_BYTES = 1 << 20;

// The loop both grouped products share: work items (group, tile of NB weight rows), weights_of(g, n0, nb, buffer)
// giving the tile's bf16 rows (written into the thread's buffer, or in place), one single-threaded GEMM per item.
template <typename WeightsOf>
static torch::Tensor grouped_gemm(const torch::Tensor& xb, int64_t N, const std::vector<int64_t>& offsets,
                                  bool buffered, WeightsOf weights_of) {
    TORCH_CHECK(xb.scalar_type() == torch::kBFloat16 && xb.dim() == 2 && xb.is_contiguous(), "grouped products: xb");
    TORCH_CHECK(offsets.size() >= 1 && offsets.front() == 0 && offsets.back() == xb.size(0), "grouped products: offsets");
    for (size_t g = 0; g + 1 < offsets.size(); ++g) TORCH_CHECK(offsets[g] <= offsets[g + 1], "grouped products: offsets");
    const GemmBf16 gemm = gemm_bf16();
    TORCH_CHECK(gemm != nullptr, "grouped products: this torch build has no cblas_gemm_bf16bf16f32");
    const int64_t K = xb.size(1), P = xb.size(0), groups = (int64_t)offsets.size() - 1;
    auto out = torch::empty({P, N}, xb.options().dtype(torch::kFloat));
    if (groups == 0 || N == 0) return out;
    const int64_t NB = std::max<int64_t>(16, std::min<int64_t>(N, TILE_BYTES / (2 * K)) / 16 * 16);
    const int64_t tiles = (N + NB - 1) / NB, items = groups * tiles;
    const uint16_t* X = (const uint16_t*)xb.data_ptr();
    float* O = out.data_ptr<float>();
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        std::vector<uint16_t> tile(buffered ? NB * K : 0);
        for (int64_t it = i0; it < i1; ++it) {
            const int64_t g = it / tiles, n0 = (it % tiles) * NB, nb = std::min(NB, N - n0);
            const int64_t m0 = offsets[g], rows = offsets[g + 1] - m0;
            if (rows == 0) continue;
            const uint16_t* wt = weights_of(g, n0, nb, tile.data());
            gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, (int)rows, (int)nb, (int)K, 1.0f, X + m0 * K, (int)K, wt,
                 (int)K, 0.0f, O + m0 * N + n0, (int)N);
        }
    });
    return out;
}

torch::Tensor engine_mm_grouped(torch::Tensor xb, torch::Tensor q, torch::Tensor scale,
                                c10::optional<torch::Tensor> zero_opt, int64_t bits, int64_t group,
                                c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                                std::vector<int64_t> offsets) {
    TORCH_CHECK(xb.dim() == 2 && offsets.size() == ids.size() + 1, "engine_mm_grouped: xb [P, K], a group per id");
    const int64_t K = xb.size(1);
    const std::vector<Weight> ws = group_weights(q, scale, zero_opt, bits, group, sub_opt, ids, offsets, K, "engine_mm_grouped");
    const NoGil no_gil;
    const int64_t N = q.size(q.dim() - 2);
    const bool wide = has_avx512_bf16();
    return grouped_gemm(xb, N, offsets, true, [&](int64_t g, int64_t n0, int64_t nb, uint16_t* tile) -> const uint16_t* {
        for (int64_t n = 0; n < nb; ++n) {
            if (wide) dequant_row_avx512(ws[g], K, n0 + n, tile + n * K);
            else dequant_row_plain(ws[g], K, n0 + n, tile + n * K);
        }
        return tile;
    });
}

// The same for bf16 weights (a bf16 checkpoint's stacked experts, w [E, N, K]): the GEMM reads each matrix in place.
torch::Tensor engine_mm_grouped_bf16(torch::Tensor xb, torch::Tensor w, std::vector<int64_t> ids,
                                     std::vector<int64_t> offsets) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 3 && w.is_contiguous() && xb.dim() == 2 &&
                xb.size(1) == w.size(2), "engine_mm_grouped_bf16: w [E, N, K] bf16, contiguous");
    TORCH_CHECK(offsets.size() == ids.size() + 1, "engine_mm_grouped_bf16: a group per id");
    for (size_t g = 0; g < ids.size(); ++g)
        TORCH_CHECK(ids[g] >= 0 && ids[g] < w.size(0) && offsets[g] <= offsets[g + 1], "engine_mm_grouped_bf16: group ", g);
    const NoGil no_gil;
    const int64_t N = w.size(1), K = w.size(2);
    const uint16_t* W = (const uint16_t*)w.data_ptr();
    return grouped_gemm(xb, N, offsets, false, [&](int64_t g, int64_t n0, int64_t, uint16_t*) -> const uint16_t* {
        return W + (ids[g] * N + n0) * K;
    });
}

// Helpers and declarations shared by the native CPU kernels (AVX2, FMA, F16C); each .cpp holds one concern,
// bindings.cpp exports them.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <algorithm>
#include <utility>

// Releases the GIL for the call when this thread holds it (a call from Python); the fused ops (fused_layer.cpp)
// call the others from C++, where it is already released.
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

// Eight float32 values from float32 or bf16 (widened exactly: the bf16 bits are a float32's top half).
static inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 widen8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// ---- quantised weights as the products read them (quant_products.cpp; fused_layer.cpp composes them) ----
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

static inline void check_layout(const char* what, int64_t K, int64_t bits, int64_t group, bool has_zero, bool has_sub) {
    const bool ok = bits == 6 ? (K % 256 == 0 && group == 256 && has_sub && !has_zero)
                  : bits == 4 && group == 256 ? (K % 256 == 0 && has_sub && has_zero)
                  : K % 32 == 0 && !has_sub && (group == 32 || (group == 16 && bits == 8 && !has_zero));
    TORCH_CHECK(ok, what, ": unsupported layout");
}

constexpr int64_t ROW_TILE = 4;  // rows of x per weight row: 4 x 2 FMA chains fit the 16 registers (8 spilled)

// The row kernels compiled for AVX-512 (row_products_avx512.cpp), the same bits as quant_products.cpp's 256-bit ones:
// g_rows_wide says they are chosen (set_row_kernels); dot_rows_wide runs MR (<= row_tile(w)) activation rows against
// weight row n (int8: on 512-bit registers; Q4_K, Q6_K: tiles of more than ROW_TILE rows), false where the weight
// keeps quant_products.cpp's kernels. x16: int6's activation sums per 16.
struct Weight;
extern bool g_rows_wide;
int64_t row_tile(const Weight& w);
bool dot_rows_wide(const Weight& w, int64_t n, const int8_t* xq, const float* xd, const float* xs, const int16_t* x16,
                   int64_t K, int MR, float* o, int64_t ostride);
// sum_i a[i] * b[i]: a row's offsets (float32 or f16) times the activations' block sums (quant_products.cpp)
float dot_scales(const float* a, const float* b, int64_t n);
float dot_scales(const uint16_t* a, const float* b, int64_t n);

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
        // the kernels read rows of row_bytes and per row G scales (and offsets), K/16 sub-scales: x's width K must match
        TORCH_CHECK(q.dim() >= 2 && q.size(-1) == row_bytes && q.is_contiguous(), what, ": weights [..., ", row_bytes,
                    "] (contiguous) for K = ", K);
        const int64_t rows = q.numel() / row_bytes;
        TORCH_CHECK(scale.numel() == rows * G && scale.is_contiguous(), what, ": scales [..., ", G, "]");
        TORCH_CHECK(!zero.has_value() || (zero->numel() == rows * G && zero->is_contiguous()), what, ": offsets [..., ", G, "]");
        TORCH_CHECK(!sub.has_value() || (sub->numel() == rows * (K / 16) && sub->is_contiguous()), what,
                    ": sub-scales [..., ", K / 16, "]");
    }
};

// The matrices of a grouped product: matrix ids[g] of the stacked w [E, N, ...] (or w itself, E = 1) for group g,
// whose rows are offsets[g] .. offsets[g + 1] (checked: ids in range, offsets in order).
inline std::vector<Weight> group_weights(const torch::Tensor& q, const torch::Tensor& scale,
                                         const c10::optional<torch::Tensor>& zero, int64_t bits, int64_t group,
                                         const c10::optional<torch::Tensor>& sub, const std::vector<int64_t>& ids,
                                         const std::vector<int64_t>& offsets, int64_t K, const char* what) {
    const bool stacked = q.dim() == 3;
    const int64_t E = stacked ? q.size(0) : 1;
    std::vector<Weight> ws;
    ws.reserve(ids.size());
    for (size_t g = 0; g < ids.size(); ++g) {
        TORCH_CHECK(ids[g] >= 0 && ids[g] < E && offsets[g] <= offsets[g + 1], what, ": group ", g);
        auto pick = [&](const torch::Tensor& t) { return stacked ? t.select(0, ids[g]) : t; };
        auto pick_opt = [&](const c10::optional<torch::Tensor>& t) {
            return t.has_value() ? c10::optional<torch::Tensor>(pick(*t)) : c10::nullopt;
        };
        ws.emplace_back(pick(q), pick(scale), pick_opt(zero), bits, group, pick_opt(sub), K, what);
    }
    return ws;
}

// Rows of x [M, K] rounded to int8 per block of 32 (XQ), the blocks' scales XD and XD x their sums XS [M, K/32];
// pair4: int4's paired block order (quant_products.cpp, where the layout is described).
void quantize_rows(const float* X, int64_t M, int64_t K, int8_t* XQ, float* XD, float* XS, bool pair4 = false);

// x [..., K] times each of several matrices [N_i, K] -> [..., N_i], x quantised once (quant_products.cpp).
std::vector<torch::Tensor> qmm_many(const torch::Tensor& x_in, const std::vector<Weight>& ws);

// A quantised matrix as Python hands it to the fused layer: (q, scale, zero, bits, group, sub).
using QW = std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t, c10::optional<torch::Tensor>>;

// ---- the exported functions (bindings.cpp), each described where it is defined ----
// float_products.cpp
torch::Tensor qmm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                  int64_t bits, int64_t group);
torch::Tensor bf16mm(torch::Tensor x, torch::Tensor w);
// quant_products.cpp
torch::Tensor qmm_q8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                     int64_t bits, int64_t group, c10::optional<torch::Tensor> sub_opt);
torch::Tensor qmm_experts(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                          int64_t bits, int64_t group, c10::optional<torch::Tensor> sub_opt, torch::Tensor ids,
                          c10::optional<torch::Tensor> weights, int64_t topk);
torch::Tensor quantize_activations(torch::Tensor x);
// row_products_avx512.cpp: which int8-activation row kernels run, "avx2" (256-bit) or "avx512"
std::string set_row_kernels(std::string name);
std::string row_kernels();
// matrix_engine.cpp
torch::Tensor dequantize_bf16(torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt, int64_t bits,
                              int64_t group, c10::optional<torch::Tensor> sub_opt, bool plain);
bool matrix_engine_gemm();
torch::Tensor mm_bf16_f32(torch::Tensor x, torch::Tensor w);
torch::Tensor engine_mm_grouped(torch::Tensor xb, torch::Tensor q, torch::Tensor scale,
                                c10::optional<torch::Tensor> zero_opt, int64_t bits, int64_t group,
                                c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                                std::vector<int64_t> offsets);
torch::Tensor engine_mm_grouped_bf16(torch::Tensor xb, torch::Tensor w, std::vector<int64_t> ids,
                                     std::vector<int64_t> offsets);
// amx_bf16_products.cpp
bool amx_bf16_ready();
torch::Tensor amx_bf16_grouped(torch::Tensor x, c10::optional<torch::Tensor> rows, torch::Tensor q, torch::Tensor scale,
                               c10::optional<torch::Tensor> zero_opt, int64_t bits, int64_t group,
                               c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                               std::vector<int64_t> offsets);
// amx_products.cpp
bool amx_int8_ready();
torch::Tensor amx_mm_grouped(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> zero_opt,
                             int64_t bits, int64_t group, c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                             std::vector<int64_t> offsets);
torch::Tensor amx_mm_gathered(torch::Tensor x, torch::Tensor rows, torch::Tensor q, torch::Tensor scale,
                              c10::optional<torch::Tensor> zero_opt, int64_t bits, int64_t group,
                              c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                              std::vector<int64_t> offsets);
// attention.cpp
torch::Tensor attend_small(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor qpos, torch::Tensor kpos,
                           int64_t window, c10::optional<torch::Tensor> sees_until, double scale,
                           c10::optional<torch::Tensor> blocks, c10::optional<torch::Tensor> key_weight,
                           c10::optional<torch::Tensor> key_cos, c10::optional<torch::Tensor> key_sin);
// prefill_attention.cpp
torch::Tensor prefill_attention(torch::Tensor q, c10::optional<torch::Tensor> k_opt, torch::Tensor v,
                                torch::Tensor qpos, torch::Tensor kpos, int64_t window,
                                c10::optional<torch::Tensor> sees_until, double scale,
                                c10::optional<torch::Tensor> blocks, c10::optional<torch::Tensor> key_weight,
                                c10::optional<torch::Tensor> key_cos, c10::optional<torch::Tensor> key_sin,
                                int64_t terms);
// rope_norms.cpp
torch::Tensor rope(torch::Tensor x, torch::Tensor positions, torch::Tensor inv_freq);
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> weight, double eps,
                       c10::optional<torch::Tensor> residual);
// fused_layer.cpp
std::vector<torch::Tensor> attn_in(torch::Tensor h, torch::Tensor in_w, double eps, QW wq, QW wk, c10::optional<QW> wv,
                                   torch::Tensor qn_w, torch::Tensor kn_w, bool v_norm, torch::Tensor qpos,
                                   torch::Tensor inv_freq, int64_t heads, int64_t kv_heads, int64_t head_dim);
torch::Tensor attn_out(torch::Tensor att, QW wo, torch::Tensor post_w, double eps, torch::Tensor h);
torch::Tensor mlp_block(torch::Tensor h, torch::Tensor pre_w, double eps, QW wg, QW wu, QW wd, torch::Tensor post_w,
                        c10::optional<torch::Tensor> residual);
// cache_writes.cpp
void put_tokens(std::vector<torch::Tensor> dsts, std::vector<torch::Tensor> srcs, std::vector<int64_t> i0,
                std::vector<int64_t> i1, c10::optional<torch::Tensor> pos_table, std::vector<int64_t> positions);
// gguf_blocks.cpp
std::vector<torch::Tensor> gguf_q4_k(torch::Tensor raw, int64_t k);
std::vector<torch::Tensor> gguf_q6_k(torch::Tensor raw, int64_t k);

// MKL's bf16 x bf16 -> float32 GEMM (cblas_gemm_bf16bf16f32), as torch's CPU library exports it: looked up once in
// matrix_engine.cpp (absent: nullptr); the CBLAS enum values it takes.
using GemmBf16 = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                          float*, int);
GemmBf16 gemm_bf16();
constexpr int CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112;

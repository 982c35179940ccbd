// Matrix products with quantised (int4/int6/int8) weights and int8 activations (the decode and small-batch path).
#include "common.h"

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

void quantize_rows(const float* X, int64_t M, int64_t K, int8_t* XQ, float* XD, float* XS, bool pair4) {
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

#include "row_blocks.h"

static inline __m256 scale8(const float* s) { return _mm256_loadu_ps(s); }
static inline __m256 scale8(const uint16_t* s) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)s)); }

template <typename ST>
static inline float dot_scales_of(const ST* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(scale8(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += scale_at(a, i) * b[i];
    return s;
}
// One compiled copy, which the 512-bit row kernels call too: inlined into each, the compiler rounded its scalar
// tail differently in the two (one ulp apart).
__attribute__((noinline)) float dot_scales(const float* a, const float* b, int64_t n) { return dot_scales_of(a, b, n); }
__attribute__((noinline)) float dot_scales(const uint16_t* a, const float* b, int64_t n) { return dot_scales_of(a, b, n); }

#include "k_quant_rows.h"

// MR activation rows against one weight row: out[r * ostride] for r < MR. G16: weight scales per 16.
// The offsets' share, sum_b zero[b] * XS[r, b], is a separate short dot product (no scalar chain).
// int4 blocks b, b + 1 from one 32-byte load: its low nibbles are elements 0-15 of block b (low half)
// and of block b + 1 (high half), its high nibbles elements 16-31. The activations of such a pair are
// laid out to match (quantize_rows with pair4), so two maddubs cover both blocks and each 128-bit half
// of the sums carries one block, scaled by one FMA with (s_b xd_b | s_b+1 xd_b+1).
template <int MR>
static inline void pair4(const uint8_t* qr, const float* sr, int64_t b, const int8_t* XQ, const float* XD,
                         int64_t B, int64_t K, __m256* acc) {
    const Nibbles w = load_pair(qr, b);
    const __m128 ws = _mm_castpd_ps(_mm_load_sd((const double*)(sr + b)));
    const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (int r = 0; r < MR; ++r) {
        const int8_t* x = XQ + r * K + b * 32;
        const __m256 p = _mm256_cvtepi32_ps(dot4_add(dot4_add(_mm256_setzero_si256(), w.lo, _mm256_loadu_si256((const __m256i*)x)),
                                                     w.hi, _mm256_loadu_si256((const __m256i*)(x + 32))));
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


static void rows_dot4k(int MR, const uint8_t* qr, const float* dr, const float* zr, const int8_t* sub, int64_t B,
                       const int8_t* XQ, const float* XD, const float* XS, int64_t K, float* out, int64_t ostride) {
    switch (MR) {
        case 1: row_dot4k<1>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
        case 2: row_dot4k<2>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
        case 3: row_dot4k<3>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
        default: row_dot4k<4>(qr, dr, zr, sub, B, XQ, XD, XS, K, out, ostride); break;
    }
}

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
    if (g_rows_wide && (w.bits == 8 || MR > ROW_TILE) &&
        dot_rows_wide(w, n, xq_t, xd_t, xs_t, w.bits == 6 ? a.x16.data() + m0 * (K / 16) : nullptr, K, MR, o, ostride))
        return;
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
    const int64_t tile = row_tile(w);
    for (int64_t m0 = 0; m0 < a.M; m0 += tile) {
        const int MR = (int)std::min<int64_t>(tile, a.M - m0);
        for (int64_t n = n0; n < n1; ++n) dot_rows(w, a, n, m0, MR, O + m0 * ostride + n, ostride);
    }
}

// x [..., K] times each of several matrices [N_i, K] -> [..., N_i], x quantised once, all the products in
// one parallel region: output rows are split across threads 16 at a time (a tile of x stays in cache),
// each row computed as a one-matrix call computes it. Rows of x go ROW_TILE at a time against each
// weight row (each weight block is decoded once per tile).
std::vector<torch::Tensor> qmm_many(const torch::Tensor& x_in, const std::vector<Weight>& ws) {
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

// Matrix products with float32 activations: quantised (int4/int8) weights read as packed, and bf16 weights.
#include "common.h"

// acc += scale * (sum of a group of 32 weights, as four vectors of 8 in k order, times x's 32 values at xg): the
// first and second 8 in two chains, the third and fourth added to them, the chains summed, one multiply-add.
static inline void add_group32(__m256 w0, __m256 w1, __m256 w2, __m256 w3, const float* xg, float scale, __m256& acc) {
    __m256 t0 = _mm256_mul_ps(w0, _mm256_loadu_ps(xg));
    __m256 t1 = _mm256_mul_ps(w1, _mm256_loadu_ps(xg + 8));
    t0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), t0);
    t1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), t1);
    acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(scale), acc);
}

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
                        add_group32(u8f(lo), u8f(_mm_srli_si128(lo, 8)), u8f(hi), u8f(_mm_srli_si128(hi, 8)),
                                    xr + g * 32, sr[g], g & 1 ? acc2 : acc);
                    }
                } else if (group == 32) {
                    for (int64_t g = 0; g < G; ++g) {
                        const int8_t* qg = (const int8_t*)qr + g * 32;
                        __m128i a = _mm_loadu_si128((const __m128i*)qg), b = _mm_loadu_si128((const __m128i*)(qg + 16));
                        add_group32(i8f(a), i8f(_mm_srli_si128(a, 8)), i8f(b), i8f(_mm_srli_si128(b, 8)), xr + g * 32,
                                    sr[g], g & 1 ? acc2 : acc);
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

#include "common.h"

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

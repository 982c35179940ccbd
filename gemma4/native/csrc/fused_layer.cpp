#include "common.h"

// ---- a decoder layer's dense parts in three calls (decode and verify steps: Python's per-op cost was
// ~1/4 of a small model's step). Each is the composition of the ops (quant_products.cpp, rope_norms.cpp)
// that the layer's modules call one by one, in the same order on the same values, so its results are the
// same bits. ----
static Weight weight_of(const QW& w, int64_t K) {
    return Weight(std::get<0>(w), std::get<1>(w), std::get<2>(w), std::get<3>(w), std::get<4>(w), std::get<5>(w), K, "qmm_q8");
}

static torch::Tensor qmm_w(const torch::Tensor& x, const QW& w) { return qmm_many(x, {weight_of(w, x.size(-1))})[0]; }

// h [B, T, hidden] -> q [B, T, H, D] (normed, rotated), k [B, T, KV, D] (normed, rotated; None for K=V
// layers), v [B, T, KV, D] (v_norm'd where the layer has one; K=V: from the key projection).
std::vector<torch::Tensor> attn_in(torch::Tensor h, torch::Tensor in_w, double eps, QW wq, QW wk, c10::optional<QW> wv,
                                   torch::Tensor qn_w, torch::Tensor kn_w, bool v_norm, torch::Tensor qpos,
                                   torch::Tensor inv_freq, int64_t heads, int64_t kv_heads, int64_t head_dim) {
    const NoGil no_gil;
    const int64_t B = h.size(0), T = h.size(1);
    const torch::Tensor x = rms_norm(h.contiguous(), in_w, eps, c10::nullopt);
    const int64_t K = x.size(-1);
    std::vector<Weight> ws{weight_of(wq, K), weight_of(wk, K)};
    if (wv.has_value()) ws.push_back(weight_of(*wv, K));
    const std::vector<torch::Tensor> p = qmm_many(x, ws);  // q, k, v in one parallel region
    const torch::Tensor q = rope(rms_norm(p[0].view({B, T, heads, head_dim}), qn_w, eps, c10::nullopt), qpos, inv_freq);
    const torch::Tensor raw_k = p[1].view({B, T, kv_heads, head_dim});
    const torch::Tensor raw_v = wv.has_value() ? p[2].view({B, T, kv_heads, head_dim}) : raw_k;
    const torch::Tensor v = v_norm ? rms_norm(raw_v, c10::nullopt, eps, c10::nullopt) : raw_v;
    torch::Tensor k;  // undefined (None) for K=V layers: the cache stores the values only
    if (wv.has_value()) k = rope(rms_norm(raw_k, kn_w, eps, c10::nullopt), qpos, inv_freq);
    return {q, k, v};
}

// att [B, H, T, D] float32 (attention's output) -> h + post_norm(o_proj(att as [B, T, H * D])).
torch::Tensor attn_out(torch::Tensor att, QW wo, torch::Tensor post_w, double eps, torch::Tensor h) {
    const NoGil no_gil;
    const int64_t B = att.size(0), H = att.size(1), T = att.size(2), D = att.size(3);
    const torch::Tensor o = qmm_w(att.transpose(1, 2).reshape({B, T, H * D}), wo);
    return rms_norm(o, post_w, eps, h.contiguous());
}

// post_norm(down(gelu_tanh(gate(x)) * up(x))) (+ residual), x = pre_norm(h): the gated MLP between its norms.
torch::Tensor mlp_block(torch::Tensor h, torch::Tensor pre_w, double eps, QW wg, QW wu, QW wd, torch::Tensor post_w,
                        c10::optional<torch::Tensor> residual) {
    const NoGil no_gil;
    const torch::Tensor x = rms_norm(h.contiguous(), pre_w, eps, c10::nullopt);
    const std::vector<torch::Tensor> gu = qmm_many(x, {weight_of(wg, x.size(-1)), weight_of(wu, x.size(-1))});
    const torch::Tensor a = at::gelu(gu[0], "tanh").mul_(gu[1]);
    c10::optional<torch::Tensor> r;
    if (residual.has_value()) r = residual->contiguous();
    return rms_norm(qmm_w(a, wd), post_w, eps, r);
}

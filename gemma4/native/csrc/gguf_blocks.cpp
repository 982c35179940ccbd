#include "common.h"

// ---- GGUF K-quant blocks to the kernels' layouts at load (the numpy converters in
// checkpoint/gguf_blocks.py are the reference; these give the same bytes, ~10x faster, which is most of a big Q4_K_M model's load) ----
// GGUF rows of super-blocks of 256 elements, `bytes` bytes each: raw [rows, k/256 * bytes], checked. The
// converters' outputs per super-block (scales(): one float, subs(): 16 int8) and their loop: each(f) runs
// f(i, its bytes) for every super-block i of the whole tensor, in parallel.
struct SuperBlocks {
    const torch::Tensor& raw;
    int64_t bytes, rows, nb;
    SuperBlocks(const torch::Tensor& raw_, int64_t k, int64_t bytes_, const char* what)
        : raw(raw_), bytes(bytes_), rows(raw_.size(0)), nb(k / 256) {
        TORCH_CHECK(k % 256 == 0 && raw.is_contiguous() && raw.size(1) == nb * bytes, what, ": bad shape");
    }
    torch::Tensor scales() const { return torch::empty({rows, nb}, raw.options().dtype(torch::kFloat)); }
    torch::Tensor subs() const { return torch::empty({rows, nb * 16}, raw.options().dtype(torch::kChar)); }
    template <typename F>
    void each(F f) const {
        const uint8_t* R = raw.data_ptr<uint8_t>();
        at::parallel_for(0, rows * nb, 256, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) f(i, R + i * bytes);
        });
    }
};

// Q4_K, raw [rows, k/256 * 144] -> packed int4 [rows, k/2] (per 32: element i | element i+16 << 4),
// d and -dmin float32 [rows, k/256], sub int8 [rows, k/16] (sc, m of each block of 32, interleaved).
std::vector<torch::Tensor> gguf_q4_k(torch::Tensor raw, int64_t k) {
    const NoGil no_gil;
    const SuperBlocks sb(raw, k, 144, "gguf_q4_k");
    auto packed = torch::empty({sb.rows, k / 2}, raw.options());
    auto d = sb.scales(), z = sb.scales(), sub = sb.subs();
    uint8_t* P = packed.data_ptr<uint8_t>();
    float* D = d.data_ptr<float>();
    float* Z = z.data_ptr<float>();
    int8_t* S = sub.data_ptr<int8_t>();
    sb.each([&](int64_t i, const uint8_t* p) {  // super-block i of the whole tensor
        uint16_t h[2];
        std::memcpy(h, p, 4);
        D[i] = _cvtsh_ss(h[0]);
        Z[i] = -_cvtsh_ss(h[1]);
        const uint8_t* sc = p + 4;
        int8_t* so = S + i * 16;
        for (int j = 0; j < 4; ++j) {
            so[2 * j] = (int8_t)(sc[j] & 63);
            so[2 * j + 1] = (int8_t)(sc[j + 4] & 63);
            so[2 * (j + 4)] = (int8_t)((sc[j + 8] & 15) | ((sc[j] >> 6) << 4));
            so[2 * (j + 4) + 1] = (int8_t)((sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4));
        }
        const uint8_t* qs = p + 16;
        uint8_t* po = P + i * 128;
        for (int c = 0; c < 4; ++c)
            for (int e = 0; e < 16; ++e) {
                const uint8_t lo = qs[c * 32 + e], hi = qs[c * 32 + 16 + e];
                po[(2 * c) * 16 + e] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
                po[(2 * c + 1) * 16 + e] = (uint8_t)((lo >> 4) | (hi & 0xF0));
            }
    });
    return {packed, d, z, sub};
}

// Q6_K, raw [rows, k/256 * 210] -> int6 [rows, 3k/4] (pack6's layout: per 128, the low nibbles of blocks
// 0 | 1 and 2 | 3, then bits 4-5 of block j at bits 2j), d float32 [rows, k/256], sub int8 [rows, k/16].
std::vector<torch::Tensor> gguf_q6_k(torch::Tensor raw, int64_t k) {
    const NoGil no_gil;
    const SuperBlocks sb(raw, k, 210, "gguf_q6_k");
    auto q = torch::empty({sb.rows, k / 4 * 3}, raw.options());
    auto d = sb.scales(), sub = sb.subs();
    uint8_t* Q = q.data_ptr<uint8_t>();
    float* D = d.data_ptr<float>();
    int8_t* S = sub.data_ptr<int8_t>();
    sb.each([&](int64_t i, const uint8_t* p) {
        for (int h = 0; h < 2; ++h) {  // two units of 128 elements
            const uint8_t* ql = p + h * 64;
            const uint8_t* qh = p + 128 + h * 32;
            uint8_t* o = Q + i * 192 + h * 96;
            for (int e = 0; e < 32; ++e) {
                o[e] = (uint8_t)((ql[e] & 15) | ((ql[32 + e] & 15) << 4));
                o[32 + e] = (uint8_t)((ql[e] >> 4) | (ql[32 + e] & 0xF0));
                o[64 + e] = qh[e];
            }
        }
        std::memcpy(S + i * 16, p + 192, 16);
        uint16_t h;
        std::memcpy(&h, p + 208, 2);
        D[i] = _cvtsh_ss(h);
    });
    return {q, d, sub};
}

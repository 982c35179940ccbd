#include "common.h"

// Decode's cache write, one token per row: for each b with i0[b] >= 0, src[b, :, 0] of every source
// [B, KV, 1, X] (any strides) goes to dst[i0[b], :, i1[b]] of its stored tensor [rows or blocks, KV, slots, X]
// (widened or narrowed to its dtype); with a position table [rows, slots], positions[b] goes to
// table[i0[b], i1[b]]. One call instead of a few indexing ops per tensor.
void put_tokens(std::vector<torch::Tensor> dsts, std::vector<torch::Tensor> srcs, std::vector<int64_t> i0,
                std::vector<int64_t> i1, c10::optional<torch::Tensor> pos_table, std::vector<int64_t> positions) {
    const NoGil no_gil;
    TORCH_CHECK(dsts.size() == srcs.size() && i0.size() == i1.size(), "put_tokens: mismatched arguments");
    TORCH_CHECK(!pos_table.has_value() || (pos_table->scalar_type() == torch::kLong && positions.size() == i0.size()),
                "put_tokens: bad position table");
    for (size_t b = 0; b < i0.size(); ++b) {
        if (i0[b] < 0) continue;
        for (size_t n = 0; n < dsts.size(); ++n) {
            torch::Tensor& d = dsts[n];
            const torch::Tensor& s = srcs[n];
            TORCH_CHECK(i0[b] < d.size(0) && i1[b] >= 0 && i1[b] < d.size(2) && (int64_t)b < s.size(0),
                        "put_tokens: slot out of range");
            if (d.scalar_type() == s.scalar_type() && d.dim() == 4 && s.dim() == 4 && d.stride(3) == 1 &&
                s.stride(3) == 1 && d.size(1) == s.size(1) && d.size(3) == s.size(3)) {  // rows copied as bytes
                const int64_t es = d.element_size(), X = d.size(3);
                char* dp = (char*)d.data_ptr() + (i0[b] * d.stride(0) + i1[b] * d.stride(2)) * es;
                const char* sp = (const char*)s.data_ptr() + (int64_t)b * s.stride(0) * es;
                for (int64_t h = 0; h < d.size(1); ++h) std::memcpy(dp + h * d.stride(1) * es, sp + h * s.stride(1) * es, X * es);
            } else {  // another dtype (widened or narrowed) or shape: torch's copy
                d.select(0, i0[b]).select(1, i1[b]).copy_(s.select(0, (int64_t)b).select(1, 0));
            }
        }
        if (pos_table.has_value())
            pos_table->data_ptr<int64_t>()[i0[b] * pos_table->stride(0) + i1[b] * pos_table->stride(1)] = positions[b];
    }
}

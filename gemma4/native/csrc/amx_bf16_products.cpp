// Many-row products of int4 weights (Q4_K; Q4_0/Q4_1 as held: groups of 32) on AMX bf16 tiles: each tile of 32
// weight rows is dequantised to bf16, a chunk of 8 blocks of 32 at a time, into a buffer that stays in L1 while
// the tile products of every row of the group pass over it; the activations are rounded to bf16 once per call.
// The dequantised values are QuantWeight.dequantize(bfloat16)'s bits (scale * q, + offset, in float32, rounded to
// nearest even), the products of two bf16 values exact in float32, the sums float32 in the tiles' order. Against
// the int8 tiles (amx_products.cpp) there is no float rescale per block of 32 (the scales are in the weights), and
// against the matrix engine's dequantise-then-GEMM no bf16 copy of the matrix is written out and packed again.
//
// The 4-bit dequantisation is a table lookup: a block's 16 possible values computed in float32 and rounded once,
// then picked by its nibbles (vpermw, 32 at a time). Within a pair of blocks the tiles take the elements in the
// nibbles' order, blocks b and b + 1's elements 0-15 as one step of 32 and their elements 16-31 as the next; the
// activations are laid out in the same order (pair_order), so each product pairs the same k.
#include "common.h"
#include "amx_tiles.h"

#include <memory>

#if defined(GEMMA4_AMX)

namespace {

#define AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
// the reference rounds scale * q before adding the offset: no fused multiply-add
#define NO_FMA __attribute__((optimize("fp-contract=off")))

constexpr int64_t TILE = RowTiles::ROWS;  // rows of an activation tile, and of each of a weight tile's two halves
constexpr int64_t WROWS = 2 * TILE;     // weight rows per work item
constexpr int64_t WSTEP = WROWS * 32;   // bf16 values of one step (32 k) of a weight tile: 32 rows x 32
constexpr int64_t XSTEP = TILE * 32;    // of one step of an activation tile: 16 pairs of k x 16 rows x 2
constexpr int64_t CHUNK = 8;            // steps dequantised at a time: 16 KB of bf16 weights, in L1

// Tiles 0-3: sums, 16 x 16 float32 (0: weight rows 0-15 x activation tile a, 1: 0-15 x b, 2: 16-31 x a, 3: 16-31
// x b); 4, 5: the weight rows 0-15 and 16-31 of one step (16 x 32 bf16); 6, 7: activation tiles a and b of the
// step (16 pairs of k x 16 rows x 2 bf16). Loaded per thread before its products.
AMX_BF16 void load_config() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

AMX_BF16 void release_tiles() { _tile_release(); }

// Row n's scale and offset per block of 32, interleaved: sz[2 b], sz[2 b + 1] (offset 0 where there is none).
AMX_BF16 void row_scales(const Weight& w, int64_t K, int64_t n, float* sz) {
    if (w.group == 256) {  // Q4_K: (block multiplier, block offset multiplier) x (group scale, group offset)
        const int8_t* sub = w.SUB + n * (K / 16);
        for (int64_t g = 0; g < w.G; ++g) {
            const __m512 dz = _mm512_mask_blend_ps(0xAAAA, _mm512_set1_ps(w.sc.f32[n * w.G + g]),
                                                   _mm512_set1_ps(w.sc.z32[n * w.G + g]));
            const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(sub + g * 16))));
            _mm512_storeu_ps(sz + g * 16, _mm512_mul_ps(dz, m));
        }
        return;
    }
    for (int64_t b = 0; b < w.G; ++b) {
        sz[2 * b] = w.sc.f32[n * w.G + b];
        sz[2 * b + 1] = w.sc.z32 != nullptr ? w.sc.z32[n * w.G + b] : 0.0f;
    }
}

// Blocks b0 .. b1 of one int4 row (qr: its bytes; byte j of a block holds element j, low nibble, and j + 16) as
// bf16, step s at out + (s - b0) * WSTEP: pairs of blocks in the nibbles' order, an odd last block of the row
// in its own.
template <bool ZERO>
NO_FMA AMX_BF16 void dequant_int4(const uint8_t* qr, const float* sz, int64_t b0, int64_t b1, uint16_t* out) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i m15 = _mm512_set1_epi16(15);
    const __m512i second = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);  // b + 1's table
    int64_t b = b0;
    for (; b + 2 <= b1; b += 2) {
        __m512 t0 = _mm512_mul_ps(iota, _mm512_set1_ps(sz[2 * b])), t1 = _mm512_mul_ps(iota, _mm512_set1_ps(sz[2 * b + 2]));
        if (ZERO) t0 = _mm512_add_ps(t0, _mm512_set1_ps(sz[2 * b + 1])), t1 = _mm512_add_ps(t1, _mm512_set1_ps(sz[2 * b + 3]));
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(t1, t0);  // words 0-15: block b's values, 16-31: b + 1's
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(qr + b * 16)));
        const __m512i lo = _mm512_ternarylogic_epi32(v, m15, second, 0xEA);  // (v & 15) | second
        const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), second);
        _mm512_storeu_si512(out + (b - b0) * WSTEP, _mm512_permutexvar_epi16(lo, table));
        _mm512_storeu_si512(out + (b + 1 - b0) * WSTEP, _mm512_permutexvar_epi16(hi, table));
    }
    if (b < b1) {  // the row's odd last block (b1 == B), its elements in order
        const __m512 t = _mm512_mul_ps(iota, _mm512_set1_ps(sz[2 * b]));
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(t, ZERO ? _mm512_add_ps(t, _mm512_set1_ps(sz[2 * b + 1])) : t);
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(qr + b * 16))));
        const __m512i idx = _mm512_inserti64x4(_mm512_and_si512(v, m15), _mm512_castsi512_si256(_mm512_srli_epi16(v, 4)), 1);
        _mm512_storeu_si512(out + (b - b0) * WSTEP, _mm512_permutexvar_epi16(idx, table));
    }
}

// Activation row x (K = 32 B values) rounded to bf16 into row m of its tile (dst: the row's first pair of the
// tile's first step), step s's pair p (two consecutive k of the step's order) at dword s * 256 + p * 16.
AMX_BF16 void activation_row(const float* x, int64_t B, uint16_t* dst) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    for (int64_t s = 0; s < B; ++s) {
        const float *lo = x + s * 32, *hi = x + s * 32 + 16;  // the step's k: in order, or (pair_order) ...
        if ((s & 1) == 0 && s + 1 < B) hi = x + (s + 1) * 32;                  // blocks s, s + 1's elements 0-15
        else if (s & 1) lo = x + (s - 1) * 32 + 16, hi = x + s * 32 + 16;       // their elements 16-31
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi), _mm512_loadu_ps(lo));
        _mm512_i32scatter_epi32((void*)(dst + s * XSTEP), idx, v, 4);
    }
}

// Steps 0 .. n of a weight tile's chunk (w) against one or two activation tiles (x0, x1: their chunk) into tiles
// 0-3; the sums come from c first where load_c, and go to c after where store_c (c: four 16 x 16 float32 tiles in
// the tiles' order). A group of one or two activation tiles keeps its sums in the tiles from chunk to chunk.
template <bool TWO>
AMX_BF16 void chunk_products(const uint16_t* w, const uint16_t* x0, const uint16_t* x1, int64_t n, float* c,
                             bool load_c, bool store_c) {
    if (load_c) {
        _tile_loadd(0, c, 64);
        _tile_loadd(2, c + 512, 64);
        if (TWO) {
            _tile_loadd(1, c + 256, 64);
            _tile_loadd(3, c + 768, 64);
        }
    }
    for (int64_t s = 0; s < n; ++s) {
        _tile_loadd(4, w + s * WSTEP, 64);
        _tile_loadd(5, w + s * WSTEP + TILE * 32, 64);
        _tile_loadd(6, x0 + s * XSTEP, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (TWO) {
            _tile_loadd(7, x1 + s * XSTEP, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    if (store_c) {
        _tile_stored(0, c, 64);
        _tile_stored(2, c + 512, 64);
        if (TWO) {
            _tile_stored(1, c + 256, 64);
            _tile_stored(3, c + 768, 64);
        }
    }
}

AMX_BF16 void zero_sums() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

// One activation tile's sums (c: weight rows 0-15, c + 512: 16-31, each [n][m]) into out[m][n], m < mr, n < nb.
AMX_BF16 void write_sums(const float* c, float* out, int64_t N, int64_t mr, int64_t nb) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)N));
    const __mmask16 rows = (__mmask16)((1u << mr) - 1);
    for (int64_t n = 0; n < nb; ++n)
        _mm512_mask_i32scatter_ps(out + n, rows, idx, _mm512_loadu_ps(c + (n / TILE) * 512 + (n % TILE) * TILE), 4);
}

}  // namespace

bool amx_bf16_ready() { return amx_permitted(); }

// Rows offsets[g] .. offsets[g + 1] of x [R, K] (float32; with rows (int64 [P]): row p is x[rows[p]]) times matrix
// ids[g] of the stacked int4 w [E, N, K / 2] (one matrix: E = 1) -> [P, N] float32, on AMX bf16 tiles.
torch::Tensor amx_bf16_grouped(torch::Tensor x, c10::optional<torch::Tensor> rows_opt, torch::Tensor q,
                               torch::Tensor scale, c10::optional<torch::Tensor> zero_opt, int64_t bits, int64_t group,
                               c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                               std::vector<int64_t> offsets) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "amx_bf16_grouped: x [R, K] float32");
    TORCH_CHECK(bits == 4 && (group == 32 || group == 256), "amx_bf16_grouped: int4 weights in groups of 32, or Q4_K's");
    TORCH_CHECK(scale.scalar_type() == torch::kFloat, "amx_bf16_grouped: float32 scales");
    TORCH_CHECK(offsets.size() == ids.size() + 1 && offsets.front() == 0, "amx_bf16_grouped: offsets");
    TORCH_CHECK(amx_permitted(), "amx_bf16_grouped: the kernel did not grant this process the tile registers");
    const int64_t R = x.size(0), K = x.size(1), B = K / 32;
    const int64_t P = offsets.back();
    const int64_t* rows = nullptr;
    if (rows_opt.has_value()) {
        TORCH_CHECK(rows_opt->scalar_type() == torch::kLong && rows_opt->dim() == 1 && rows_opt->is_contiguous() &&
                    rows_opt->size(0) == P, "amx_bf16_grouped: rows int64 [P]");
        rows = rows_opt->data_ptr<int64_t>();
        for (int64_t p = 0; p < P; ++p) TORCH_CHECK(rows[p] >= 0 && rows[p] < R, "amx_bf16_grouped: rows");
    } else {
        TORCH_CHECK(P == R, "amx_bf16_grouped: offsets end at x's rows");
    }
    const std::vector<Weight> ws = group_weights(q, scale, zero_opt, bits, group, sub_opt, ids, offsets, K, "amx_bf16_grouped");
    const NoGil no_gil;
    const int64_t N = q.size(q.dim() - 2);
    auto out = torch::empty({P, N}, x.options());
    if (ws.empty() || N == 0 || P == 0) return out;
    const bool has_zero = zero_opt.has_value() || group == 256;

    // The activations: per group, tiles of 16 rows in the steps' order (rows past the group zero), bf16.
    const RowTiles tiles(offsets);
    const int64_t T = tiles.count();
    std::unique_ptr<uint16_t[]> xb(new uint16_t[T * B * XSTEP]);  // every tile written below (no zero fill)
    const float* X = x.data_ptr<float>();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t m0 = tiles.row0(t), mr = tiles.rows_in(t);
            uint16_t* dst = xb.get() + t * B * XSTEP;
            if (mr < TILE) std::memset(dst, 0, B * XSTEP * sizeof(uint16_t));
            for (int64_t m = 0; m < mr; ++m) activation_row(X + (rows != nullptr ? rows[m0 + m] : m0 + m) * K, B, dst + 2 * m);
        }
    });

    // Work items: (group, tile of 32 weight rows); a thread's items are consecutive, so a group's activation tiles
    // stay in its caches while it goes through the group's weight tiles.
    const int64_t ntiles = (N + WROWS - 1) / WROWS;
    float* O = out.data_ptr<float>();
    at::parallel_for(0, (int64_t)ws.size() * ntiles, 1, [&](int64_t i0, int64_t i1) {
        std::vector<uint16_t> wbuf(CHUNK * WSTEP);
        std::vector<float> sz(WROWS * 2 * B), sums;
        load_config();
        for (int64_t it = i0; it < i1; ++it) {
            const int64_t g = it / ntiles, n0 = (it % ntiles) * WROWS, nb = std::min(WROWS, N - n0);
            if (offsets[g + 1] == offsets[g]) continue;
            const Weight& w = ws[g];
            const int64_t t0 = tiles.first[g], t1 = tiles.first[g + 1], pairs = (t1 - t0 + 1) / 2;
            sums.resize(pairs * 4 * TILE * TILE);
            for (int64_t r = 0; r < nb; ++r) row_scales(w, K, n0 + r, sz.data() + r * 2 * B);
            if (nb < WROWS) std::fill(wbuf.begin(), wbuf.end(), (uint16_t)0);  // rows past N stay zero
            for (int64_t c0 = 0; c0 < B; c0 += CHUNK) {
                const int64_t c1 = std::min(B, c0 + CHUNK);
                for (int64_t r = 0; r < nb; ++r) {
                    const uint8_t* qr = w.Q + (n0 + r) * w.row_bytes;
                    if (has_zero) dequant_int4<true>(qr, sz.data() + r * 2 * B, c0, c1, wbuf.data() + r * 32);
                    else dequant_int4<false>(qr, sz.data() + r * 2 * B, c0, c1, wbuf.data() + r * 32);
                }
                for (int64_t p = 0; p < pairs; ++p) {
                    const int64_t t = t0 + 2 * p;
                    const uint16_t* x0 = xb.get() + (t * B + c0) * XSTEP;
                    float* c = sums.data() + p * 4 * TILE * TILE;
                    if (c0 == 0) zero_sums();
                    const bool load_c = pairs > 1 && c0 > 0, store_c = pairs > 1 || c1 == B;
                    if (t + 1 < t1) chunk_products<true>(wbuf.data(), x0, x0 + B * XSTEP, c1 - c0, c, load_c, store_c);
                    else chunk_products<false>(wbuf.data(), x0, nullptr, c1 - c0, c, load_c, store_c);
                }
            }
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t p = (t - t0) / 2, h = (t - t0) % 2;  // tile t's pair, and its half of it
                write_sums(sums.data() + (p * 4 + h) * TILE * TILE, O + tiles.row0(t) * N + n0, N, tiles.rows_in(t), nb);
            }
        }
        release_tiles();
    });
    return out;
}

#else  // a host without AMX: the matrix engine's other ways serve

bool amx_bf16_ready() { return false; }

torch::Tensor amx_bf16_grouped(torch::Tensor, c10::optional<torch::Tensor>, torch::Tensor, torch::Tensor,
                               c10::optional<torch::Tensor>, int64_t, int64_t, c10::optional<torch::Tensor>,
                               std::vector<int64_t>, std::vector<int64_t>) {
    TORCH_CHECK(false, "amx_bf16_grouped: built for a CPU without AMX");
}

#endif

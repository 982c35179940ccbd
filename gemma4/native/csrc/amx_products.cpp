// Many-row products of quantised weights on AMX int8 tiles, the weights read as they are held (no bf16 copy): the
// activations rounded to int8 per block of 32 by quantize_rows (the very integers of the int8-activation kernels),
// each block's 16 x 16 integer sums from one tile product (tdpbssd, K = 32), then rescaled in float32 by weight
// scale x activation scale (and the offsets' share, weight offset x the activations' block sum) and summed over
// the blocks. Each tile of 16 weight rows is packed per block (int4 ones, Q4_0/Q4_1/Q4_K, unpacked to int8) into a
// buffer that stays in L1/L2 while every row of the chunk passes. Compiled where the host has AMX (GEMMA4_AMX, __init__.host_cflags);
// elsewhere amx_int8_ready() is false and the matrix engine's bf16 path serves.
#include "common.h"
#include "amx_tiles.h"

#include <memory>

#if defined(GEMMA4_AMX)

namespace {

#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))

constexpr int64_t TILE = RowTiles::ROWS;  // rows of a weight tile and of an activation tile
constexpr int64_t XTILE = 512;     // bytes of one block of an activation tile: 8 rows of 16 x 4 (VNNI order)

// Tiles 0, 3: A, 16 weight rows x 32 bytes (one block); 1, 4: B, one block of 16 activation rows (8 x 64 bytes,
// four consecutive k per row); 2, 5: C, 16 x 16 int32. The configuration is per thread: loaded by each thread
// before its tile products (another library's products on this thread may have loaded their own).
AMX_TARGET void load_config() {
    TileConfig c;
    c.rows[0] = c.rows[3] = 16, c.colsb[0] = c.colsb[3] = 32;
    c.rows[1] = c.rows[4] = 8, c.colsb[1] = c.colsb[4] = 64;
    c.rows[2] = c.rows[5] = 16, c.colsb[2] = c.colsb[5] = 64;
    __asm__ volatile("ldtilecfg %0" ::"m"(c));  // the whole struct as the operand: gcc 12's intrinsic names 8 bytes
}

// acc[n] (16 activation rows) += float(C[n]) * ws[n, b] * xd[b] (+ zs[n, b] * xs[b]): block b's share.
AMX_TARGET inline void rescale(__m512* acc, const int32_t* c, const float* ws, const float* zs, int64_t B,
                               const float* xd, const float* xs, int64_t b) {
    const __m512 xdv = _mm512_loadu_ps(xd + b * TILE);
    for (int n = 0; n < TILE; ++n) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + n * TILE));
        acc[n] = _mm512_fmadd_ps(v, _mm512_mul_ps(xdv, _mm512_set1_ps(ws[n * B + b])), acc[n]);
    }
    if (zs != nullptr) {
        const __m512 xsv = _mm512_loadu_ps(xs + b * TILE);
        for (int n = 0; n < TILE; ++n) acc[n] = _mm512_fmadd_ps(xsv, _mm512_set1_ps(zs[n * B + b]), acc[n]);
    }
}

// One weight tile (W [B][16][32]: block b of its 16 int8 rows, contiguous; scales ws, offsets zs [16][B]) against
// one activation tile (xb [B][512], xd, xs [B][16]) -> out[n][m], 16 x 16. Two blocks per step in two sets of tiles, so one block's
// tile product runs while the other's sums are rescaled.
AMX_TARGET void tile_product(const int8_t* W, const float* ws, const float* zs, int64_t B,
                             const int8_t* xb, const float* xd, const float* xs, float* out) {
    alignas(64) int32_t c[2][TILE * TILE];
    __m512 acc[TILE];
    for (int n = 0; n < TILE; ++n) acc[n] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {
        _tile_zero(2);
        _tile_zero(5);
        _tile_loadd(0, W + b * XTILE, 32);
        _tile_loadd(1, xb + b * XTILE, 64);
        _tile_loadd(3, W + (b + 1) * XTILE, 32);
        _tile_loadd(4, xb + (b + 1) * XTILE, 64);
        _tile_dpbssd(2, 0, 1);
        _tile_dpbssd(5, 3, 4);
        _tile_stored(2, c[0], 64);
        _tile_stored(5, c[1], 64);
        rescale(acc, c[0], ws, zs, B, xd, xs, b);
        rescale(acc, c[1], ws, zs, B, xd, xs, b + 1);
    }
    for (; b < B; ++b) {
        _tile_zero(2);
        _tile_loadd(0, W + b * XTILE, 32);
        _tile_loadd(1, xb + b * XTILE, 64);
        _tile_dpbssd(2, 0, 1);
        _tile_stored(2, c[0], 64);
        rescale(acc, c[0], ws, zs, B, xd, xs, b);
    }
    for (int n = 0; n < TILE; ++n) _mm512_storeu_ps(out + n * TILE, acc[n]);
}

AMX_TARGET void release_tiles() { _tile_release(); }

inline float scale_of(const Weight& w, bool zero, int64_t i) {
    if (w.sc.f16) return _cvtsh_ss((zero ? w.sc.z16 : w.sc.f16)[i]);
    return (zero ? w.sc.z32 : w.sc.f32)[i];
}

// Rows n0 .. n0 + nb of w (nb <= 16) as one weight tile: its int8 rows packed per block into qbuf [B][16][32]
// (int4 unpacked; zero rows past nb), read from w in one sequential pass (the 16 rows are contiguous there: a
// stream the prefetchers follow, where the tile loads' 16 rows a block would each wait on memory), and per
// block b its scale and offset (ws, zs [16][B]; zero past nb).
void weight_tile(const Weight& w, int64_t K, int64_t n0, int64_t nb, int8_t* qbuf, float* ws, float* zs) {
    const int64_t B = K / 32;
    const bool has_zero = w.sc.z16 || w.sc.z32;
    for (int64_t n = 0; n < TILE; ++n) {
        float* s = ws + n * B;
        float* z = zs != nullptr ? zs + n * B : nullptr;
        const int64_t row = n0 + n;
        if (n >= nb) {
            std::fill(s, s + B, 0.0f);
            if (z != nullptr) std::fill(z, z + B, 0.0f);
        } else if (w.group == 256) {  // Q4_K: the group's scale and offset times the block's integer multipliers
            const int8_t* sub = w.SUB + row * (K / 16);
            for (int64_t b = 0; b < B; ++b) {
                s[b] = w.sc.f32[row * w.G + b / 8] * (float)sub[2 * b];
                z[b] = w.sc.z32[row * w.G + b / 8] * (float)sub[2 * b + 1];
            }
        } else {
            for (int64_t b = 0; b < B; ++b) s[b] = scale_of(w, false, row * w.G + b);
            if (z != nullptr)
                for (int64_t b = 0; b < B; ++b) z[b] = has_zero ? scale_of(w, true, row * w.G + b) : 0.0f;
        }
    }
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int64_t n = 0; n < TILE; ++n) {
        int8_t* dst = qbuf + n * 32;  // block b of row n at dst + b * XTILE
        if (n >= nb) {
            for (int64_t b = 0; b < B; ++b) _mm256_storeu_si256((__m256i*)(dst + b * XTILE), _mm256_setzero_si256());
            continue;
        }
        const uint8_t* qr = w.Q + (n0 + n) * w.row_bytes;
        if (w.bits == 8) {
            for (int64_t b = 0; b < B; ++b) {
                if ((b & 1) == 0) prefetch_ahead(qr + b * 32);
                _mm256_storeu_si256((__m256i*)(dst + b * XTILE), _mm256_loadu_si256((const __m256i*)(qr + b * 32)));
            }
            continue;
        }
        // byte j of a block: element j (low nibble), element j + 16 (high); two blocks per 32-byte load
        int64_t b = 0;
        for (; b + 2 <= B; b += 2) {
            prefetch_ahead(qr + b * 16);
            const __m256i v = _mm256_loadu_si256((const __m256i*)(qr + b * 16));
            const __m256i lo = _mm256_and_si256(v, m15), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
            _mm256_storeu_si256((__m256i*)(dst + b * XTILE), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i*)(dst + (b + 1) * XTILE), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
        if (b < B) {  // an odd last block
            const __m128i v = _mm_loadu_si128((const __m128i*)(qr + b * 16)), m = _mm256_castsi256_si128(m15);
            _mm_storeu_si128((__m128i*)(dst + b * XTILE), _mm_and_si128(v, m));
            _mm_storeu_si128((__m128i*)(dst + b * XTILE + 16), _mm_and_si128(_mm_srli_epi16(v, 4), m));
        }
    }
}

}  // namespace

bool amx_int8_ready() { return amx_permitted(); }

// Rows offsets[g] .. offsets[g + 1] of x [P, K] (float32) times matrix ids[g] of the stacked w [E, N, K] (one
// matrix: E = 1) -> [P, N] float32, on AMX int8 tiles. Layouts: int8 with groups of 32 (f16 or float32 scales,
// offsets or none), int4 with groups of 32 (offsets) or 256 (Q4_K). With rows (int64 [P]), row p of the product
// is x[rows[p]]: x's rows are rounded to int8 once and picked as the tiles are packed (a prefill's routed experts
// read each token's row top_k times; a gathered copy of x would be top_k times its size).
static torch::Tensor amx_grouped(const torch::Tensor& x, const int64_t* rows, int64_t P, const torch::Tensor& q,
                                 const torch::Tensor& scale, const c10::optional<torch::Tensor>& zero_opt, int64_t bits,
                                 int64_t group, const c10::optional<torch::Tensor>& sub_opt,
                                 const std::vector<int64_t>& ids, const std::vector<int64_t>& offsets) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "amx_mm_grouped: x");
    TORCH_CHECK(offsets.size() == ids.size() + 1 && offsets.front() == 0 && offsets.back() == P,
                "amx_mm_grouped: offsets");
    TORCH_CHECK((bits == 8 && group == 32) || (bits == 4 && (group == 32 || group == 256)),
                "amx_mm_grouped: int8 or int4 weights with groups of 32, or Q4_K's");
    TORCH_CHECK(amx_permitted(), "amx_mm_grouped: the kernel did not grant this process the tile registers");
    const int64_t R = x.size(0), K = x.size(1), B = K / 32;
    for (int64_t p = 0; rows != nullptr && p < P; ++p) TORCH_CHECK(rows[p] >= 0 && rows[p] < R, "amx_mm_grouped: rows");
    const std::vector<Weight> ws = group_weights(q, scale, zero_opt, bits, group, sub_opt, ids, offsets, K, "amx_mm_grouped");
    const NoGil no_gil;
    const int64_t N = q.size(q.dim() - 2);
    auto out = torch::empty({P, N}, x.options());
    if (ws.empty() || N == 0 || P == 0) return out;
    const bool has_zero = zero_opt.has_value() || group == 256;

    // The activations: int8 per block of 32 as the row kernels round them, then per group tiles of 16 rows in
    // the tile's order (block b: row k4 holds 4 consecutive k of each of the 16 rows), zero rows past the group.
    auto xq = torch::empty({R, K}, x.options().dtype(torch::kInt8));
    auto xd = torch::empty({R, B}, x.options()), xs = torch::empty({R, B}, x.options());
    const int8_t* XQ = xq.data_ptr<int8_t>();
    const float* XD = xd.data_ptr<float>();
    const float* XS = xs.data_ptr<float>();
    at::parallel_for(0, R, 16, [&](int64_t p0, int64_t p1) {
        quantize_rows(x.data_ptr<float>() + p0 * K, p1 - p0, K, xq.data_ptr<int8_t>() + p0 * K,
                      xd.data_ptr<float>() + p0 * B, xs.data_ptr<float>() + p0 * B);
    });
    const RowTiles tiles(offsets);
    const int64_t T = tiles.count();
    std::unique_ptr<int8_t[]> xb(new int8_t[T * B * XTILE]);  // every tile written below (no zero fill)
    std::vector<float> xdt(T * B * TILE), xst(T * B * TILE);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t m0 = tiles.row0(t), mr = tiles.rows_in(t);
            int8_t* dst = xb.get() + t * B * XTILE;
            if (mr < TILE) {
                std::memset(dst, 0, B * XTILE);
                std::fill(xdt.begin() + t * B * TILE, xdt.begin() + (t + 1) * B * TILE, 0.0f);
                std::fill(xst.begin() + t * B * TILE, xst.begin() + (t + 1) * B * TILE, 0.0f);
            }
            for (int64_t m = 0; m < mr; ++m) {
                const int64_t r = rows != nullptr ? rows[m0 + m] : m0 + m;
                const int32_t* row = (const int32_t*)(XQ + r * K);
                for (int64_t b = 0; b < B; ++b) {
                    xdt[(t * B + b) * TILE + m] = XD[r * B + b];
                    xst[(t * B + b) * TILE + m] = XS[r * B + b];
                    int32_t* blk = (int32_t*)(dst + b * XTILE) + m;
                    for (int k4 = 0; k4 < 8; ++k4) blk[k4 * TILE] = row[b * 8 + k4];
                }
            }
        }
    });

    // Work items: (group, tile of 16 weight rows); a thread's items are consecutive, so a group's activation tiles
    // stay in its caches while it goes through the group's weight tiles.
    const int64_t ntiles = (N + TILE - 1) / TILE;
    float* O = out.data_ptr<float>();
    at::parallel_for(0, (int64_t)ws.size() * ntiles, 1, [&](int64_t i0, int64_t i1) {
        std::vector<int8_t> qbuf(TILE * K + 64);
        std::vector<float> wsc(TILE * B), zsc(has_zero ? TILE * B : 0);
        alignas(64) float tile_out[TILE * TILE];
        load_config();
        for (int64_t it = i0; it < i1; ++it) {
            const int64_t g = it / ntiles, n0 = (it % ntiles) * TILE, nb = std::min(TILE, N - n0);
            if (offsets[g + 1] == offsets[g]) continue;
            weight_tile(ws[g], K, n0, nb, qbuf.data(), wsc.data(), has_zero ? zsc.data() : nullptr);
            for (int64_t t = tiles.first[g]; t < tiles.first[g + 1]; ++t) {
                const int64_t m0 = tiles.row0(t), mr = tiles.rows_in(t);
                tile_product(qbuf.data(), wsc.data(), has_zero ? zsc.data() : nullptr, B, xb.get() + t * B * XTILE,
                             xdt.data() + t * B * TILE, xst.data() + t * B * TILE, tile_out);
                for (int64_t m = 0; m < mr; ++m)
                    for (int64_t n = 0; n < nb; ++n) O[(m0 + m) * N + n0 + n] = tile_out[n * TILE + m];
            }
        }
        release_tiles();
    });
    return out;
}

torch::Tensor amx_mm_grouped(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                             c10::optional<torch::Tensor> zero_opt, int64_t bits, int64_t group,
                             c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                             std::vector<int64_t> offsets) {
    return amx_grouped(x, nullptr, x.size(0), q, scale, zero_opt, bits, group, sub_opt, ids, offsets);
}

// amx_mm_grouped over the rows x[rows] (rows int64 [P]), without their gathered copy.
torch::Tensor amx_mm_gathered(torch::Tensor x, torch::Tensor rows, torch::Tensor q, torch::Tensor scale,
                              c10::optional<torch::Tensor> zero_opt, int64_t bits, int64_t group,
                              c10::optional<torch::Tensor> sub_opt, std::vector<int64_t> ids,
                              std::vector<int64_t> offsets) {
    TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.dim() == 1 && rows.is_contiguous(), "amx_mm_gathered: rows");
    return amx_grouped(x, rows.data_ptr<int64_t>(), rows.size(0), q, scale, zero_opt, bits, group, sub_opt, ids,
                       offsets);
}

#else  // a host without AMX: the matrix engine's bf16 path serves

bool amx_int8_ready() { return false; }

torch::Tensor amx_mm_grouped(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t,
                             int64_t, c10::optional<torch::Tensor>, std::vector<int64_t>, std::vector<int64_t>) {
    TORCH_CHECK(false, "amx_mm_grouped: built for a CPU without AMX");
}

torch::Tensor amx_mm_gathered(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                              int64_t, int64_t, c10::optional<torch::Tensor>, std::vector<int64_t>,
                              std::vector<int64_t>) {
    TORCH_CHECK(false, "amx_mm_gathered: built for a CPU without AMX");
}

#endif

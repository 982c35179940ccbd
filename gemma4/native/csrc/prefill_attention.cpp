// Attention of a prefill chunk (many queries) over the cache on the matrix engine: per work item (a row of the
// batch, a KV head, a run of queries of every head of its group), a flash-style loop over tiles of keys read from
// the cache as it is stored (a ring piece, or a full layer's paged pool through its block table, never gathered
// whole): the tile's keys and values rounded to bf16 into the thread's buffers (K=V layers: the keys rebuilt from
// the values, RoPE(v * w), in float32 first), scores = q k^T and P.V as MKL bf16 GEMMs (cblas_gemm_bf16bf16f32: AMX
// tiles, float32 sums and output), the running softmax in float32 (max, sum, rescaled sums). Tiles that every query
// of the item is masked from (causal, window, empty slots) are skipped; tiles that every query sees whole are not
// masked. Called only where the CPU has AVX-512 BF16 and AMX (ops.py decides); decode and verify steps keep
// attend_small.
#include "common.h"

#include <limits>

namespace {


// Query rows (heads of a group x queries) per work item at most: each item rebuilds and rounds every key tile it
// reads, so items are made as few as the threads allow (a KV head's queries split only to give every thread work).
constexpr int64_t ITEM_ROWS = 4096;
constexpr int64_t TILE_KEYS = 512;  // keys per tile (a multiple of 16)
// Keys per tile where the queries of an item do not all see a whole TILE_KEYS tile (the chunk's own keys, causal;
// a window's edge): each such tile is multiplied only with the queries that see some of it, so the masked part of
// the chunk's square of scores is mostly skipped. Smaller tiles elsewhere would cost a pass over the item's sums
// per tile.
constexpr int64_t EDGE_KEYS = 128;

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// e^x for x <= 0 (below -87: 0, -inf included): 2^n p(f), p a degree-6 polynomial, as attention.cpp's 8-wide one.
AVX512 inline __m512 exp16(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps(live, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

AVX512 inline __m512 load16(const void* p, bool bf16) {
    if (!bf16) return _mm512_loadu_ps((const float*)p);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

AVX512 inline void store_bf16(uint16_t* dst, __m512 x) {
    _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(x));
}

// One stored row (float32 or bf16, D a multiple of 16) in float32 into tmp [D]; with w (K=V layers) the key
// RoPE(row * w): the first R pairs (e, e + D/2) turned by cos c / sin s of its position, in float32.
AVX512 void float_row(const void* src, bool bf16, int64_t D, const float* w, const float* c, const float* s, int64_t R,
                      float* tmp) {
    const size_t es = bf16 ? 2 : 4;
    for (int64_t e = 0; e < D; e += 16) {
        const __m512 x = load16((const char*)src + e * es, bf16);
        _mm512_storeu_ps(tmp + e, w ? _mm512_mul_ps(x, _mm512_loadu_ps(w + e)) : x);
    }
    if (w == nullptr) return;
    const int64_t half = D / 2;
    for (int64_t e = 0; e < R; ++e) {
        const float x1 = tmp[e], x2 = tmp[e + half];
        tmp[e] = x1 * c[e] - x2 * s[e];
        tmp[e + half] = x2 * c[e] + x1 * s[e];
    }
}

// x [D] as bf16 into hi [D] and, with lo, the rounding's remainder into lo [D] (x = hi + lo to 16 bits).
AVX512 void split_row(const float* x, int64_t D, uint16_t* hi, uint16_t* lo) {
    for (int64_t e = 0; e < D; e += 16) {
        const __m512 v = _mm512_loadu_ps(x + e);
        const __m256bh h = _mm512_cvtneps_pbh(v);
        _mm256_storeu_si256((__m256i*)(hi + e), (__m256i)h);
        if (lo) {
            const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
            store_bf16(lo + e, _mm512_sub_ps(v, hf));
        }
    }
}

// Row r of the scores sc [n] (n a multiple of 16) into the running softmax: max m, sum l, probabilities p (bf16) and
// the factor the row's sums so far are to be multiplied by (1 when unchanged; 0 when the row has seen nothing).
AVX512 float softmax_row(float* sc, int64_t n, float& m, float& l, uint16_t* p) {
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < n; i += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sc + i));
    const float mt = std::max(m, _mm512_reduce_max_ps(top));
    if (mt == -std::numeric_limits<float>::infinity()) {  // nothing seen yet: no weights
        std::memset(p, 0, n * 2);
        return 1.0f;
    }
    const __m512 mv = _mm512_set1_ps(mt);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + i), mv));
        sum = _mm512_add_ps(sum, e);
        store_bf16(p + i, e);
    }
    const float corr = m == mt ? 1.0f : _mm512_cvtss_f32(exp16(_mm512_set1_ps(m - mt)));
    l = l * corr + _mm512_reduce_add_ps(sum);
    m = mt;
    return corr;
}

AVX512 void scale_row(float* a, int64_t D, float f) {
    const __m512 fv = _mm512_set1_ps(f);
    for (int64_t e = 0; e < D; e += 16) _mm512_storeu_ps(a + e, _mm512_mul_ps(_mm512_loadu_ps(a + e), fv));
}


}  // namespace

// q [B, H, T, D] float32; v [B, KV, S, D] (or a pool [blocks, KV, BS, D] with blocks [B, NBLK], S = NBLK * BS),
// float32 or bf16; k like v, or None on K=V layers with key_weight [D] and key_cos / key_sin [positions, R] (the keys
// rebuilt from v); qpos [B, T], kpos [B, S] (-1: empty); sees_until [B, T] (or None) the last position a query
// sees; window 0: none; terms: 1 (q and k rounded to bf16) or 3 (each split in two bf16 parts, see W below).
// -> [B, H, T, D] float32 (a query that sees nothing: zeros).
torch::Tensor prefill_attention(torch::Tensor q, c10::optional<torch::Tensor> k_opt, torch::Tensor v,
                                torch::Tensor qpos, torch::Tensor kpos, int64_t window,
                                c10::optional<torch::Tensor> sees_until, double scale,
                                c10::optional<torch::Tensor> blocks, c10::optional<torch::Tensor> key_weight,
                                c10::optional<torch::Tensor> key_cos, c10::optional<torch::Tensor> key_sin,
                                int64_t terms) {
    const GemmBf16 gemm = gemm_bf16();
    TORCH_CHECK(gemm != nullptr && __builtin_cpu_supports("avx512bf16"), "prefill_attention: no matrix engine here");
    TORCH_CHECK(q.scalar_type() == torch::kFloat && q.dim() == 4 && v.dim() == 4, "prefill_attention: q, v");
    const bool bf16 = v.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(bf16 || v.scalar_type() == torch::kFloat, "prefill_attention: values must be float32 or bfloat16");
    q = q.contiguous(); v = v.contiguous(); qpos = qpos.contiguous(); kpos = kpos.contiguous();
    torch::Tensor k = k_opt.has_value() ? k_opt->contiguous() : v;
    TORCH_CHECK(k.scalar_type() == v.scalar_type() && k.sizes() == v.sizes(), "prefill_attention: k and v differ");
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = v.size(1), S = kpos.size(1);
    TORCH_CHECK(D % 16 == 0 && H % KV == 0 && v.size(3) == D && qpos.size(0) == B && qpos.size(1) == T &&
                kpos.size(0) == B, "prefill_attention: unsupported shapes");
    torch::Tensor bt;
    int64_t BS = S, NBLK = 1;
    if (blocks.has_value()) {
        bt = blocks->contiguous();
        BS = v.size(2);
        NBLK = bt.size(1);
        TORCH_CHECK(bt.size(0) == B && NBLK * BS >= S, "prefill_attention: block table");
    } else {
        TORCH_CHECK(v.size(0) == B && v.size(2) == S, "prefill_attention: values do not match kpos");
    }
    torch::Tensor kw, kc, ks, su;
    int64_t R = 0;
    const bool rebuild = key_weight.has_value();
    TORCH_CHECK(!(rebuild && k_opt.has_value()), "prefill_attention: keys are either stored or rebuilt");
    if (rebuild) {
        kw = key_weight->contiguous().to(torch::kFloat); kc = key_cos->contiguous(); ks = key_sin->contiguous();
        R = kc.size(1);
        TORCH_CHECK(kw.numel() == D && R <= D / 2 && ks.sizes() == kc.sizes() &&
                    (S == 0 || kc.size(0) > kpos.max().item<int64_t>()), "prefill_attention: key rebuild");
    }
    if (sees_until.has_value()) {
        su = sees_until->contiguous();
        TORCH_CHECK(su.sizes() == qpos.sizes(), "prefill_attention: sees_until");
    }
    const NoGil no_gil;
    const float* Q = q.data_ptr<float>();
    const char* KB = (const char*)k.data_ptr();
    const char* VB = (const char*)v.data_ptr();
    const size_t es = bf16 ? 2 : 4;
    const int64_t* QP = qpos.data_ptr<int64_t>();
    const int64_t* KP = kpos.data_ptr<int64_t>();
    const int64_t* BT = blocks.has_value() ? bt.data_ptr<int64_t>() : nullptr;
    const int64_t* SU = sees_until.has_value() ? su.data_ptr<int64_t>() : nullptr;
    const float* KW = rebuild ? kw.data_ptr<float>() : nullptr;
    const float* KC = rebuild ? kc.data_ptr<float>() : nullptr;
    const float* KS = rebuild ? ks.data_ptr<float>() : nullptr;
    TORCH_CHECK(terms == 1 || terms == 3, "prefill_attention: terms is 1 or 3");
    // The scores' operands side by side (one GEMM over W columns): terms 1: q_hi . k_hi; keys stored in bf16 (exact):
    // [q_hi | q_lo] . [k | k]; else [q_hi | q_hi | q_lo] . [k_hi | k_lo | k_hi] (only q_lo . k_lo, ~2^-16 of a
    // product, is left out).
    const bool exact_keys = bf16 && !rebuild;
    const int64_t W = terms == 1 ? D : exact_keys ? 2 * D : 3 * D;
    const int64_t G = H / KV, threads = at::get_num_threads();
    // Where the chunk's own keys are much of what it reads (a short context), a later run of queries sees more keys
    // than an earlier one: a KV head's queries are then split in twice the runs the threads need, taken in the order
    // first, last, second, second to last, ..., so that the runs a thread is given see as many keys as another's.
    const bool causal_share = threads > 1 && S < 4 * T;
    const int64_t per_head = (threads + B * KV - 1) / (B * KV) * (causal_share ? 2 : 1);
    const int64_t parts = std::max((T * G + ITEM_ROWS - 1) / ITEM_ROWS, per_head);
    const int64_t TQ = std::max<int64_t>(1, (T + parts - 1) / parts), NT = (T + TQ - 1) / TQ;
    auto run_of = [NT](int64_t k) { return k % 2 == 0 ? k / 2 : NT - 1 - k / 2; };
    auto out = torch::empty({B, H, T, D}, q.options());  // every row written below (zeros where nothing is seen)
    float* O = out.data_ptr<float>();
    const float NEG = -std::numeric_limits<float>::infinity();

    at::parallel_for(0, B * KV * NT, 1, [&](int64_t i0, int64_t i1) {
        const int64_t MR = G * TQ;
        std::vector<uint16_t> qb(MR * W), kt(TILE_KEYS * W), vt(TILE_KEYS * D), pb(MR * TILE_KEYS), qlo(D);
        std::vector<float> sc(MR * TILE_KEYS), acc(MR * D), m(MR), l(MR), tmp(D);
        for (int64_t it = i0; it < i1; ++it) {
            const int64_t b = it / (KV * NT), kvh = (it / NT) % KV, t0 = run_of(it % NT) * TQ, tq = std::min(TQ, T - t0);
            const int64_t M = G * tq;  // row i * G + j: head kvh * G + j, query t0 + i (a run of queries: rows in a run)
            // Which keys the item's queries see: [lo, hi] over all of them, [all_lo, all_hi] seen by every one.
            int64_t lo = INT64_MAX, hi = -1, all_lo = -1, all_hi = INT64_MAX;
            bool every = true;
            for (int64_t i = 0; i < tq; ++i) {
                const int64_t p = QP[b * T + t0 + i];
                if (p < 0) { every = false; continue; }
                const int64_t from = window > 0 ? p - window + 1 : 0, until = SU ? SU[b * T + t0 + i] : p;
                lo = std::min(lo, from); hi = std::max(hi, until);
                all_lo = std::max(all_lo, from); all_hi = std::min(all_hi, until);
            }
            if (hi < 0) {  // padding queries only: zeros
                for (int64_t j = 0; j < G; ++j)
                    std::fill_n(O + (((b * H + kvh * G + j) * T) + t0) * D, tq * D, 0.0f);
                continue;
            }
            for (int64_t j = 0; j < G; ++j)
                for (int64_t i = 0; i < tq; ++i)
                {
                    uint16_t* qr = qb.data() + (i * G + j) * W;
                    split_row(Q + (((b * H + kvh * G + j) * T) + t0 + i) * D, D, qr, W > D ? qlo.data() : nullptr);
                    if (W == 3 * D) std::memcpy(qr + D, qr, D * 2);
                    if (W > D) std::memcpy(qr + W - D, qlo.data(), D * 2);
                }
            std::fill(acc.begin(), acc.begin() + M * D, 0.0f);
            std::fill(m.begin(), m.begin() + M, NEG);
            std::fill(l.begin(), l.begin() + M, 0.0f);
            for (int64_t s0 = 0, n = 0; s0 < S; s0 += n) {
                const int64_t* kp = KP + b * S + s0;
                int64_t kmin, kmax, valid;
                auto scan = [&](int64_t keys) {
                    n = keys, kmin = INT64_MAX, kmax = -1, valid = 0;
                    for (int64_t s = 0; s < n; ++s)
                        if (kp[s] >= 0) { kmin = std::min(kmin, kp[s]); kmax = std::max(kmax, kp[s]); ++valid; }
                    return every && valid == n && n % 16 == 0 && kmin >= all_lo && kmax <= all_hi;
                };
                bool whole = scan(std::min(TILE_KEYS, S - s0));
                if (!whole && n > EDGE_KEYS) whole = scan(EDGE_KEYS);
                const int64_t np = (n + 15) / 16 * 16;
                if (valid == 0 || kmin > hi || kmax < lo) continue;  // no query of the item sees this tile
                // The run of queries that see some of the tile (rows r0 .. r1): the others' sums would not change.
                int64_t i0 = tq, i1 = -1;
                for (int64_t i = 0; i < tq; ++i) {
                    const int64_t p = QP[b * T + t0 + i];
                    if (p < 0) continue;
                    const int64_t from = window > 0 ? p - window + 1 : 0, until = SU ? SU[b * T + t0 + i] : p;
                    if (from <= kmax && until >= kmin) i0 = std::min(i0, i), i1 = i;
                }
                if (i1 < 0) continue;
                const int64_t r0 = i0 * G, rows = (i1 + 1 - i0) * G;
                for (int64_t s = 0; s < np; ++s) {
                    uint16_t* kr = kt.data() + s * W;
                    uint16_t* vr = vt.data() + s * D;
                    if (s >= n || kp[s] < 0) {  // an empty slot: zeros (its weight is 0; 0 * garbage could be NaN)
                        std::memset(kr, 0, W * 2);
                        std::memset(vr, 0, D * 2);
                        continue;
                    }
                    const int64_t slot = s0 + s;
                    const int64_t row = BT ? ((BT[b * NBLK + slot / BS] * KV + kvh) * BS + slot % BS)
                                           : ((b * KV + kvh) * S + slot);
                    const int64_t p = kp[s];
                    if (exact_keys) {
                        std::memcpy(kr, KB + row * D * es, D * 2);
                        if (W > D) std::memcpy(kr + D, kr, D * 2);
                    } else {
                        float_row(KB + row * D * es, bf16, D, KW, rebuild ? KC + p * R : nullptr,
                                  rebuild ? KS + p * R : nullptr, R, tmp.data());
                        split_row(tmp.data(), D, kr, W > D ? kr + D : nullptr);
                        if (W > D) std::memcpy(kr + 2 * D, kr, D * 2);
                    }
                    if (bf16) {
                        std::memcpy(vr, VB + row * D * es, D * 2);
                    } else {
                        float_row(VB + row * D * es, false, D, nullptr, nullptr, nullptr, 0, tmp.data());
                        split_row(tmp.data(), D, vr, nullptr);
                    }
                }
                gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, (int)rows, (int)np, (int)W, (float)scale, qb.data() + r0 * W,
                     (int)W, kt.data(), (int)W, 0.0f, sc.data(), (int)np);
                if (!whole) {
                    for (int64_t i = i0; i <= i1; ++i) {
                        const int64_t p = QP[b * T + t0 + i];
                        const int64_t from = window > 0 ? p - window + 1 : 0, until = SU ? SU[b * T + t0 + i] : p;
                        for (int64_t j = 0; j < G; ++j) {
                            float* r = sc.data() + (i * G + j - r0) * np;
                            for (int64_t s = 0; s < np; ++s)
                                if (p < 0 || s >= n || kp[s] < 0 || kp[s] < from || kp[s] > until) r[s] = NEG;
                        }
                    }
                }
                for (int64_t r = r0; r < r0 + rows; ++r) {
                    const float corr = softmax_row(sc.data() + (r - r0) * np, np, m[r], l[r], pb.data() + (r - r0) * np);
                    if (corr != 1.0f) scale_row(acc.data() + r * D, D, corr);
                }
                gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_NO_TRANS, (int)rows, (int)D, (int)np, 1.0f, pb.data(), (int)np, vt.data(),
                     (int)D, 1.0f, acc.data() + r0 * D, (int)D);
            }
            for (int64_t j = 0; j < G; ++j)
                for (int64_t i = 0; i < tq; ++i) {
                    const int64_t r = i * G + j;
                    float* o = O + (((b * H + kvh * G + j) * T) + t0 + i) * D;
                    if (l[r] > 0) {
                        const float inv = 1.0f / l[r];
                        for (int64_t e = 0; e < D; ++e) o[e] = acc[r * D + e] * inv;
                    } else {
                        std::fill_n(o, D, 0.0f);
                    }
                }
        }
    });
    return out;
}

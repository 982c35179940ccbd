#include "common.h"

// ---- attention of a few queries (decode, verify) over one piece of the cache ----
// q [B, H, T, D] float32; k, v [B, KV, S, D] float32 or bf16 (rows contiguous); qpos [B, T], kpos [B, S]
// (-1: empty slot); a query at p sees keys p - window + 1 .. min(p or sees_until) (window 0: all).
// Keys are split in chunks of 64 across threads (flash-decoding): each chunk keeps, per query, its max
// score, sum of exponentials and weighted values; a second pass merges them in the order of the first
// position each chunk shows the query (a ring's slots wrap: slot order is a rotation that depends on the
// ring's size; position order does not). A query that sees nothing gets zeros. Every query's arithmetic
// is the same whatever the others (T, batch) are, and, over a ring of a multiple of 64 slots, whatever
// its size (a chunk of slots then holds the keys of one 64-position run that the query sees).

// e^x for x <= 0 (scores minus their maximum; -inf and anything below -87 give 0): 2^n * p(f), n = round(x / ln 2), f = x - n ln 2
// in two parts, p a degree-6 Taylor polynomial on |f| <= ln 2 / 2 (relative error < 2e-7, float32's own).
static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);  // below: e^x < 2^-125, 0
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Scores of RT query rows (rq[r]) against the keys kb + idx[i] * D (widened): sc[r * CH + idx[i]] = q . k * scale.
// NK keys per step give RT * NK independent FMA chains (one per row and key, each summed over e in the
// same order whatever RT and NK are, so a row's score never depends on the rows or keys beside it).
// With vb, the value rows of these keys and the next keys' rows are prefetched on the way (from memory they
// arrive while the scores are computed; the values pass reads each row in several strided sweeps).
constexpr int64_t CH_MAX = 64;  // keys per chunk (ATTENTION_CHUNK)

// K=V layers: the keys of stored values, k = RoPE(v * w) (the k_norm weight w, then the first R pairs
// (e, e + D/2) turned by the angle of the key's position: cos/sin tables [positions, R]). The same float32
// operations as the torch path (keys_from_values), one key at a time into kf [n, D].
template <typename KT>
static inline void rebuild_keys(const KT* vb, const int64_t* idx, int64_t n, const int64_t* kp, int64_t D,
                                const float* w, const float* cs, const float* sn, int64_t R, float* kf) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < n; ++t) {
        const KT* v = vb + idx[t] * D;
        float* k = kf + t * D;
        for (int64_t e = 0; e < D; e += 8) _mm256_storeu_ps(k + e, _mm256_mul_ps(widen8(v + e), _mm256_loadu_ps(w + e)));
        const int64_t p = std::max<int64_t>(0, kp[idx[t]]);
        const float* c = cs + p * R;
        const float* s = sn + p * R;
        for (int64_t e = 0; e < R; ++e) {
            const float x1 = k[e], x2 = k[e + half];
            k[e] = x1 * c[e] - x2 * s[e];
            k[e + half] = x2 * c[e] + x1 * s[e];
        }
    }
}

static inline void prefetch_row(const void* p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char*)p + o, _MM_HINT_T0);
}

template <typename KT, int RT, int NK>
static inline void score_tile(const float* const* rq, const KT* kb, const KT* vb, const int64_t* idx, int64_t n,
                              int64_t D, float scale, float* sc, int64_t CH, bool packed = false) {
    const KT* krow[CH_MAX];  // key i's row
    for (int64_t i = 0; i < n; ++i) krow[i] = kb + (packed ? i : idx[i]) * D;
    int64_t i = 0;
    for (; i + NK <= n; i += NK) {
        if (vb != nullptr) {
            for (int c = 0; c < NK; ++c) prefetch_row(vb + idx[i + c] * D, D * (int64_t)sizeof(KT));
            for (int c = 0; c < NK && i + NK + c < n; ++c) prefetch_row(krow[i + NK + c], D * (int64_t)sizeof(KT));
        }
        __m256 a[RT][NK];
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < NK; ++c) a[r][c] = _mm256_setzero_ps();
        for (int64_t e = 0; e < D; e += 8) {
            __m256 kv[NK];
            for (int c = 0; c < NK; ++c) kv[c] = widen8(krow[i + c] + e);
            for (int r = 0; r < RT; ++r) {
                const __m256 q = _mm256_loadu_ps(rq[r] + e);
                for (int c = 0; c < NK; ++c) a[r][c] = _mm256_fmadd_ps(q, kv[c], a[r][c]);
            }
        }
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < NK; ++c) sc[r * CH + idx[i + c]] = hsum(a[r][c]) * scale;
    }
    for (; i < n; ++i) {
        if (vb != nullptr) prefetch_row(vb + idx[i] * D, D * (int64_t)sizeof(KT));
        __m256 a[RT];
        for (int r = 0; r < RT; ++r) a[r] = _mm256_setzero_ps();
        for (int64_t e = 0; e < D; e += 8) {
            const __m256 kv = widen8(krow[i] + e);
            for (int r = 0; r < RT; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rq[r] + e), kv, a[r]);
        }
        for (int r = 0; r < RT; ++r) sc[r * CH + idx[i]] = hsum(a[r]) * scale;
    }
}

// pa[r * D + e] = sum over i of p[r * CH + idx[i]] * v[idx[i]][e], for RT rows, EV vectors of 8 channels at
// a time held in registers across the keys (each lane summed in key order whatever RT and EV are).
template <typename KT, int RT, int EV>
static inline void value_tile(const float* p, const KT* vb, const int64_t* idx, int64_t n, int64_t D, float* pa,
                              int64_t CH) {
    int64_t e = 0;
    for (; e + 8 * EV <= D; e += 8 * EV) {
        __m256 a[RT][EV];
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < EV; ++c) a[r][c] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
            const KT* vr = vb + idx[i] * D + e;
            __m256 vv[EV];
            for (int c = 0; c < EV; ++c) vv[c] = widen8(vr + 8 * c);
            for (int r = 0; r < RT; ++r) {
                const __m256 pr = _mm256_broadcast_ss(p + r * CH + idx[i]);
                for (int c = 0; c < EV; ++c) a[r][c] = _mm256_fmadd_ps(pr, vv[c], a[r][c]);
            }
        }
        for (int r = 0; r < RT; ++r)
            for (int c = 0; c < EV; ++c) _mm256_storeu_ps(pa + r * D + e + 8 * c, a[r][c]);
    }
    for (; e < D; e += 8) {
        __m256 a[RT];
        for (int r = 0; r < RT; ++r) a[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
            const __m256 vv = widen8(vb + idx[i] * D + e);
            for (int r = 0; r < RT; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * CH + idx[i]), vv, a[r]);
        }
        for (int r = 0; r < RT; ++r) _mm256_storeu_ps(pa + r * D + e, a[r]);
    }
}

// Scores of the tile's rows: keys in the stored dtype, or (rebuilt, K=V layers) float32 rows kf[t] for
// the t-th key of idx (written by rebuild_keys), their scores stored at idx[t] all the same.
template <typename KT, int RT>
static inline void chunk_tile(const float* const* rq, const KT* kb, const KT* vb, const int64_t* idx, int64_t n,
                              int64_t D, float scale, float* sc, float* pa, int64_t CH, int pass, bool fetch,
                              const float* kf) {
    if (pass == 0 && kf != nullptr) {
        if (RT <= 2) score_tile<float, RT, 4>(rq, kf, nullptr, idx, n, D, scale, sc, CH, true);
        else score_tile<float, RT, 2>(rq, kf, nullptr, idx, n, D, scale, sc, CH, true);
    } else if (pass == 0) {
        if (RT <= 2) score_tile<KT, RT, 4>(rq, kb, fetch ? vb : nullptr, idx, n, D, scale, sc, CH);
        else score_tile<KT, RT, 2>(rq, kb, fetch ? vb : nullptr, idx, n, D, scale, sc, CH);
    } else {
        if (RT <= 2) value_tile<KT, RT, 4>(sc, vb, idx, n, D, pa, CH);
        else value_tile<KT, RT, 2>(sc, vb, idx, n, D, pa, CH);
    }
}

// Key j of batch row b, KV head h: K + ((BT[b, j / BS] * KV + h) * BS + j % BS) * D with a block table BT
// (a paged pool [blocks, KV, BS, D]); without one, K is [B, KV, S, D] (one block of S per row).
template <typename KT>
static void attend_chunks(const float* Q, const KT* K, const KT* V, const int64_t* QP, const int64_t* KP,
                          const int64_t* SU, int64_t window, float scale, int64_t B, int64_t H, int64_t T,
                          int64_t KV, int64_t S, int64_t D, int64_t CH, int64_t NC, float* PM, float* PL, float* PA,
                          int64_t* PF, const int64_t* BT, int64_t BS, int64_t NBLK,
                          const float* KW, const float* KC, const float* KS, int64_t KR) {
    const int64_t G = H / KV, R = G * T;
    at::parallel_for(0, B * KV * NC, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc(R * CH), kf(KW ? CH * D : 0);
        std::vector<const float*> rq(R);
        std::vector<int64_t> rlo(R), rhi(R), idx(CH);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / (KV * NC), kv = (i / NC) % KV, c = i % NC;
            const int64_t j0 = c * CH, j1 = std::min(S, j0 + CH), n = j1 - j0;
            const int64_t first = BT ? ((BT[b * NBLK + j0 / BS] * KV + kv) * BS + j0 % BS) * D
                                     : ((b * KV + kv) * S + j0) * D;
            const KT* kb = K + first;  // the chunk's keys and values, rows of D
            const KT* vb = V + first;
            const int64_t* kp = KP + b * S + j0;
            float* pm = PM + i * R;
            float* pl = PL + i * R;
            int64_t* pf = PF + i * R;
            float* pa = PA + i * R * D;
            for (int64_t r = 0; r < R; ++r) {  // query row r: head kv * G + r / T, position t = r % T
                const int64_t t = r % T, qp = QP[b * T + t];
                rq[r] = Q + ((b * H + kv * G + r / T) * T + t) * D;
                rhi[r] = SU ? SU[b * T + t] : qp;  // sees keys at rlo .. rhi
                rlo[r] = window > 0 ? std::max<int64_t>(0, qp - window + 1) : 0;
            }
            std::fill(sc.begin(), sc.end(), -INFINITY);
            for (int64_t r0 = 0; r0 < R; r0 += 4) {
                const int RT = (int)std::min<int64_t>(4, R - r0);
                int64_t lo = INT64_MAX, hi = -1;
                for (int64_t r = r0; r < r0 + RT; ++r) lo = std::min(lo, rlo[r]), hi = std::max(hi, rhi[r]);
                int64_t m = 0;  // the keys some row of this tile may see
                for (int64_t j = 0; j < n; ++j)
                    if (kp[j] >= 0 && kp[j] >= lo && kp[j] <= hi) idx[m++] = j;
                if (KW) rebuild_keys(vb, idx.data(), m, kp, D, KW, KC, KS, KR, kf.data());
                const float* tkf = KW ? kf.data() : nullptr;
                for (int pass = 0; pass < 2; ++pass) {
                    if (pass == 1) {  // masks, maxima, exponentials of the tile's rows
                        for (int64_t r = r0; r < r0 + RT; ++r) {
                            float* x = sc.data() + r * CH;
                            float top = -INFINITY;
                            int64_t first = INT64_MAX;
                            for (int64_t t = 0; t < m; ++t) {
                                const int64_t j = idx[t];
                                if (kp[j] < rlo[r] || kp[j] > rhi[r]) x[j] = -INFINITY;
                                else top = std::max(top, x[j]), first = std::min(first, kp[j]);
                            }
                            pm[r] = top;
                            pf[r] = first;
                            if (top == -INFINITY) {
                                std::fill(x, x + n, 0.0f);
                                pl[r] = 0.0f;
                                continue;
                            }
                            const __m256 top8 = _mm256_set1_ps(top);
                            __m256 l8 = _mm256_setzero_ps();
                            int64_t j = 0;
                            for (; j + 8 <= n; j += 8) {
                                const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), top8));
                                _mm256_storeu_ps(x + j, e);
                                l8 = _mm256_add_ps(l8, e);
                            }
                            if (j < n) {  // the last keys through the same vector exp, hidden lanes at -inf (0)
                                float tail[8];
                                for (int64_t e = 0; e < 8; ++e) tail[e] = j + e < n ? x[j + e] : -INFINITY;
                                const __m256 e8 = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), top8));
                                _mm256_storeu_ps(tail, e8);
                                for (int64_t e = 0; j + e < n; ++e) x[j + e] = tail[e];
                                l8 = _mm256_add_ps(l8, e8);
                            }
                            pl[r] = hsum(l8);
                        }
                    }
                    const float* const* tq = rq.data() + r0;
                    float* tsc = sc.data() + r0 * CH;
                    float* tpa = pa + r0 * D;
                    switch (RT) {
                        case 1: chunk_tile<KT, 1>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                        case 2: chunk_tile<KT, 2>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                        case 3: chunk_tile<KT, 3>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                        default: chunk_tile<KT, 4>(tq, kb, vb, idx.data(), m, D, scale, tsc, tpa, CH, pass, r0 == 0, tkf); break;
                    }
                }
            }
        }
    });
}

torch::Tensor attend_small(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor qpos, torch::Tensor kpos,
                           int64_t window, c10::optional<torch::Tensor> sees_until, double scale,
                           c10::optional<torch::Tensor> blocks, c10::optional<torch::Tensor> key_weight,
                           c10::optional<torch::Tensor> key_cos, c10::optional<torch::Tensor> key_sin) {
    const NoGil no_gil;
    q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
    qpos = qpos.contiguous(); kpos = kpos.contiguous();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), S = kpos.size(1);
    const int64_t G = H / KV, R = G * T, CH = CH_MAX, NC = (S + CH - 1) / CH;
    TORCH_CHECK(D % 8 == 0 && H % KV == 0 && k.scalar_type() == v.scalar_type() && k.sizes() == v.sizes(),
                "attend_small: unsupported shapes");
    torch::Tensor bt;
    int64_t BS = S, NBLK = 1;
    if (blocks.has_value()) {  // k, v: pools [blocks, KV, BS, D]; blocks [B, NBLK] ids covering S slots
        bt = blocks->contiguous();
        BS = k.size(2);
        NBLK = bt.size(1);
        TORCH_CHECK(BS % CH == 0 && NBLK * BS >= S && bt.size(0) == B, "attend_small: unsupported block table");
    } else {
        TORCH_CHECK(k.size(0) == B && k.size(2) == S, "attend_small: keys do not match kpos");
    }
    const int64_t* BT = blocks.has_value() ? bt.data_ptr<int64_t>() : nullptr;
    // K=V: keys rebuilt from the values (k is v) with the k_norm weight [D] and cos/sin tables [positions, R]
    torch::Tensor kw, kc, ks;
    int64_t KR = 0;
    if (key_weight.has_value()) {
        kw = key_weight->contiguous(); kc = key_cos->contiguous(); ks = key_sin->contiguous();
        KR = kc.size(1);
        TORCH_CHECK(kw.numel() == D && KR <= D / 2 && ks.sizes() == kc.sizes() && kc.size(0) > kpos.max().item<int64_t>(),
                    "attend_small: unsupported key rebuild");
    }
    const float* KW = key_weight.has_value() ? kw.data_ptr<float>() : nullptr;
    const float* KC = key_weight.has_value() ? kc.data_ptr<float>() : nullptr;
    const float* KS = key_weight.has_value() ? ks.data_ptr<float>() : nullptr;
    auto f = q.options();
    auto pm = torch::empty({B * KV * NC, R}, f), pl = torch::empty({B * KV * NC, R}, f);
    auto pa = torch::empty({B * KV * NC, R, D}, f);
    auto pf = torch::empty({B * KV * NC, R}, q.options().dtype(torch::kLong));
    torch::Tensor su;
    if (sees_until.has_value()) su = sees_until->contiguous();
    const int64_t* SU = sees_until.has_value() ? su.data_ptr<int64_t>() : nullptr;
    if (k.scalar_type() == torch::kBFloat16)
        attend_chunks<uint16_t>(q.data_ptr<float>(), (const uint16_t*)k.data_ptr(), (const uint16_t*)v.data_ptr(),
                                qpos.data_ptr<int64_t>(), kpos.data_ptr<int64_t>(), SU, window, (float)scale,
                                B, H, T, KV, S, D, CH, NC, pm.data_ptr<float>(), pl.data_ptr<float>(), pa.data_ptr<float>(),
                                pf.data_ptr<int64_t>(), BT, BS, NBLK, KW, KC, KS, KR);
    else {
        TORCH_CHECK(k.scalar_type() == torch::kFloat, "attend_small: keys must be float32 or bfloat16");
        attend_chunks<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                             qpos.data_ptr<int64_t>(), kpos.data_ptr<int64_t>(), SU, window, (float)scale,
                             B, H, T, KV, S, D, CH, NC, pm.data_ptr<float>(), pl.data_ptr<float>(), pa.data_ptr<float>(),
                             pf.data_ptr<int64_t>(), BT, BS, NBLK, KW, KC, KS, KR);
    }
    auto out = torch::zeros({B, H, T, D}, f);
    const float* PM = pm.data_ptr<float>();
    const float* PL = pl.data_ptr<float>();
    const float* PA = pa.data_ptr<float>();
    const int64_t* PF = pf.data_ptr<int64_t>();
    float* O = out.data_ptr<float>();
    at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {  // merge the chunks of each query
        std::vector<std::pair<int64_t, int64_t>> order;  // (first position seen, chunk)
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / (H * T), h = (i / T) % H, t = i % T, kv = h / G, r = (h % G) * T + t;
            float top = -INFINITY;
            order.clear();
            for (int64_t c = 0; c < NC; ++c) {
                const int64_t pi = (b * KV + kv) * NC + c;
                if (PM[pi * R + r] == -INFINITY) continue;
                top = std::max(top, PM[pi * R + r]);
                order.emplace_back(PF[pi * R + r], c);
            }
            if (top == -INFINITY) continue;  // sees nothing: zeros
            std::sort(order.begin(), order.end());
            float l = 0.0f;
            float* o = O + i * D;
            for (const auto& fc : order) {
                const int64_t pi = (b * KV + kv) * NC + fc.second;
                const float m = PM[pi * R + r];
                const float w = std::exp(m - top);
                l += w * PL[pi * R + r];
                const float* a = PA + (pi * R + r) * D;
                for (int64_t e = 0; e < D; ++e) o[e] += w * a[e];
            }
            const float inv = 1.0f / l;
            for (int64_t e = 0; e < D; ++e) o[e] *= inv;
        }
    });
    return out;
}

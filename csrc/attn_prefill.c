/*
 * attn_prefill.c -- causal grouped-query attention over many new positions (prefill, evaluation,
 * training), the whole of softmax(q.K^T) V in one threaded call.
 *
 * q [B, nkv, g, T, hd] (already scaled) holds the queries at absolute positions pos0 .. pos0+T-1;
 * the keys and values of positions 0 .. pos0+T-1 are rows of k, v: group (b, kh) starts at
 * k + (b*nkv + kh) * kvs (a KV cache [B, nkv, max_len, hd] has kvs = max_len * hd).
 * For every query row: s_t = q . k_t for the keys it sees (t <= its position), p = softmax(s)
 * (tzq_expf, masked keys exactly 0), out = sum_t p_t v_t.
 *
 * First the keys are packed once, transposed in blocks of CB positions (pack_keys). Then the work
 * items are (b, kh, tile of TILE positions) with the g heads of the tile together, so each key
 * panel is loaded once for g*TILE query rows: the scores of the tile's rows are computed in
 * register blocks of RB rows x CB keys, softmaxed in place, and multiplied with V in
 * register blocks of RB rows x CB head dimensions. Every variant computes each dot product in the
 * same order, so all variants agree bit for bit; against BLAS (the NumPy path of tinyzq/model.py)
 * only summation orders differ (~1e-6 relative).
 * Every output row is computed by one thread, so results do not depend on the thread count.
 */
#include <stdlib.h>
#include "tzq_internal.h"

#define TZQ_AP_TILE 32 /* query positions per work item (x g heads) */
#define TZQ_AP_RB 4    /* query rows per register block */

/* Register blocks: RB rows x CB keys (q.K^T) and RB rows x CB head dimensions (P.V). The SIMD
   variants hold them in NV vectors of W floats per row (GCC vector extensions: the same source
   becomes AVX-512, AVX2 or NEON code); the reference is the same loops over scalars. Each product
   is a plain multiply then add in the same order in both (no FMA contraction), so they agree bit
   for bit. */
#if defined(TZQ_ISA_AVX512)
#define TZQ_AP_W 16
#define TZQ_AP_NV 4    /* 16 of 32 zmm registers */
#elif defined(TZQ_ISA_AVX2)
#define TZQ_AP_W 8
#define TZQ_AP_NV 2    /* 8 of 16 ymm registers */
#elif TZQ_KERN_ARM
#define TZQ_AP_W 4
#define TZQ_AP_NV 4    /* 16 of 32 q registers */
#endif
#ifdef TZQ_AP_W
#define TZQ_AP_CB (TZQ_AP_W * TZQ_AP_NV)
typedef float ap_vec __attribute__((vector_size(TZQ_AP_W * 4), aligned(4))); /* unaligned loads/stores */
#else
#define TZQ_AP_CB 8
#endif

/* softmax over the first vis scores of a row, in place; the rest of the row up to S becomes 0 */
static void causal_softmax_row(float *s, int64_t vis, int64_t S)
{
    const float mx = tzq_max8(s, vis);
    float inv;
    for (int64_t t = 0; t < vis; t++) s[t] = tzq_expf(s[t] - mx);
    inv = 1.0f / tzq_sum8(s, vis);
    for (int64_t t = 0; t < vis; t++) s[t] *= inv;
    for (int64_t t = vis; t < S; t++) s[t] = 0.0f;
}

typedef struct {
    const float *q, *k, *v;
    float *out, *kp;
    int64_t B, nkv, g, T, hd, pos0, kvs, tiles, kblocks;
    int error;
} ap_job;

/* kp [group][key block][hd][CB]: the keys of each block of CB positions transposed, so that a
   block's scores stream one contiguous hd x CB panel (zero columns past the last key) */
static void pack_keys(void *ctx, int64_t i0, int64_t i1)
{
    ap_job *a = (ap_job *)ctx;
    const int64_t hd = a->hd, S = a->pos0 + a->T;
    for (int64_t it = i0; it < i1; it++) {
        const int64_t grp = it / a->kblocks, j0 = (it % a->kblocks) * TZQ_AP_CB;
        const float *kg = a->k + grp * a->kvs;
        float *dst = a->kp + it * hd * TZQ_AP_CB;
        for (int64_t c = 0; c < TZQ_AP_CB; c++) {
            if (j0 + c < S)
                for (int64_t d = 0; d < hd; d++) dst[d * TZQ_AP_CB + c] = kg[(j0 + c) * hd + d];
            else
                for (int64_t d = 0; d < hd; d++) dst[d * TZQ_AP_CB + c] = 0.0f;
        }
    }
}

/* sc[r][c] = sum_d qr[r][d] kt[d][c] for r < RB, c < CB (rows padded to RB by the caller) */
static void qk_block(const float *const *qr, const float *kt, int64_t hd, float *sc, int64_t lds)
{
#ifdef TZQ_AP_W
    ap_vec acc[TZQ_AP_RB][TZQ_AP_NV];
    for (int r = 0; r < TZQ_AP_RB; r++)
        for (int c = 0; c < TZQ_AP_NV; c++) acc[r][c] = (ap_vec){0};
    for (int64_t d = 0; d < hd; d++) {
        const float *kd = kt + d * TZQ_AP_CB;
        ap_vec kv[TZQ_AP_NV];
        for (int c = 0; c < TZQ_AP_NV; c++) kv[c] = *(const ap_vec *)(kd + c * TZQ_AP_W);
        for (int r = 0; r < TZQ_AP_RB; r++) {
            const float x = qr[r][d];
            for (int c = 0; c < TZQ_AP_NV; c++) acc[r][c] += x * kv[c];
        }
    }
    for (int r = 0; r < TZQ_AP_RB; r++)
        for (int c = 0; c < TZQ_AP_NV; c++) *(ap_vec *)(sc + r * lds + c * TZQ_AP_W) = acc[r][c];
#else
    float acc[TZQ_AP_RB][TZQ_AP_CB];
    for (int r = 0; r < TZQ_AP_RB; r++)
        for (int c = 0; c < TZQ_AP_CB; c++) acc[r][c] = 0.0f;
    for (int64_t d = 0; d < hd; d++) {
        const float *kd = kt + d * TZQ_AP_CB;
        for (int r = 0; r < TZQ_AP_RB; r++) {
            const float x = qr[r][d];
            for (int c = 0; c < TZQ_AP_CB; c++) acc[r][c] += x * kd[c];
        }
    }
    for (int r = 0; r < TZQ_AP_RB; r++)
        for (int c = 0; c < TZQ_AP_CB; c++) sc[r * lds + c] = acc[r][c];
#endif
}

/* o[r][c] = sum_{t < S} p[r][t] v[t][c] for c < CB (v rows hd floats apart); rows with o[r] NULL
   are padding */
static void pv_block(const float *p, int64_t lds, const float *v, int64_t hd, int64_t S, float *const *o)
{
#ifdef TZQ_AP_W
    ap_vec acc[TZQ_AP_RB][TZQ_AP_NV];
    for (int r = 0; r < TZQ_AP_RB; r++)
        for (int c = 0; c < TZQ_AP_NV; c++) acc[r][c] = (ap_vec){0};
    for (int64_t t = 0; t < S; t++) {
        const float *vt = v + t * hd;
        ap_vec vv[TZQ_AP_NV];
        for (int c = 0; c < TZQ_AP_NV; c++) vv[c] = *(const ap_vec *)(vt + c * TZQ_AP_W);
        for (int r = 0; r < TZQ_AP_RB; r++) {
            const float x = p[r * lds + t];
            for (int c = 0; c < TZQ_AP_NV; c++) acc[r][c] += x * vv[c];
        }
    }
    for (int r = 0; r < TZQ_AP_RB; r++)
        if (o[r])
            for (int c = 0; c < TZQ_AP_NV; c++) *(ap_vec *)(o[r] + c * TZQ_AP_W) = acc[r][c];
#else
    float acc[TZQ_AP_RB][TZQ_AP_CB];
    for (int r = 0; r < TZQ_AP_RB; r++)
        for (int c = 0; c < TZQ_AP_CB; c++) acc[r][c] = 0.0f;
    for (int64_t t = 0; t < S; t++) {
        const float *vt = v + t * hd;
        for (int r = 0; r < TZQ_AP_RB; r++) {
            const float x = p[r * lds + t];
            for (int c = 0; c < TZQ_AP_CB; c++) acc[r][c] += x * vt[c];
        }
    }
    for (int r = 0; r < TZQ_AP_RB; r++)
        if (o[r])
            for (int c = 0; c < TZQ_AP_CB; c++) o[r][c] = acc[r][c];
#endif
}

/* tile rows are head-major: row r of the tile starting at t0 (n positions) is head r / n at position
   t0 + r % n; it sees keys 0 .. pos0 + t0 + r % n */
static int64_t row_offset(const ap_job *a, int64_t t0, int64_t n, int64_t r)
{
    return ((r / n) * a->T + t0 + r % n) * a->hd;
}

/* the most keys any real row of the register block r0 .. r0+RB-1 sees (rows >= rows are padding) */
static int64_t block_vis(const ap_job *a, int64_t t0, int64_t n, int64_t r0, int64_t rows)
{
    int64_t vis = 0;
    for (int64_t r = r0; r < r0 + TZQ_AP_RB && r < rows; r++)
        if (a->pos0 + t0 + r % n + 1 > vis) vis = a->pos0 + t0 + r % n + 1;
    return vis;
}

static void ap_range(void *ctx, int64_t i0, int64_t i1)
{
    ap_job *a = (ap_job *)ctx;
    const int64_t hd = a->hd, g = a->g, T = a->T, CB = TZQ_AP_CB, RB = TZQ_AP_RB;
    const int64_t ldk = a->kblocks * CB; /* scores row stride */
    const int64_t rows_max = (g * TZQ_AP_TILE + RB - 1) / RB * RB;
    /* scores [rows_max, ldk] | a zero query row */
    float *buf = (float *)malloc(sizeof(float) * (size_t)(rows_max * ldk + hd));
    const float **qr = (const float **)malloc(sizeof(float *) * (size_t)RB);
    if (!buf || !qr) {
        __atomic_store_n(&a->error, TZQ_ENOMEM, __ATOMIC_RELAXED);
        free(buf);
        free(qr);
        return;
    }
    float *sc = buf, *zero = sc + rows_max * ldk;
    for (int64_t d = 0; d < hd; d++) zero[d] = 0.0f;
    for (int64_t it = i0; it < i1; it++) {
        const int64_t grp = it / a->tiles, t0 = (it % a->tiles) * TZQ_AP_TILE;
        const int64_t n = T - t0 < TZQ_AP_TILE ? T - t0 : TZQ_AP_TILE, rows = g * n;
        const int64_t S1p = (a->pos0 + t0 + n + CB - 1) / CB * CB; /* keys seen by the tile, padded */
        const float *kpg = a->kp + grp * a->kblocks * hd * CB, *vg = a->v + grp * a->kvs;
        const float *qg = a->q + grp * g * T * hd;
        float *og = a->out + grp * g * T * hd;
        for (int64_t r = 0; r < rows; r += RB) { /* scores; padding rows multiply the zero row */
            const int64_t vis = block_vis(a, t0, n, r, rows);
            for (int64_t rr = r; rr < r + RB; rr++) qr[rr - r] = rr < rows ? qg + row_offset(a, t0, n, rr) : zero;
            for (int64_t j0 = 0; j0 < vis; j0 += CB) qk_block(qr, kpg + j0 * hd, hd, sc + r * ldk + j0, ldk);
        }
        for (int64_t r = 0; r < rows; r++) causal_softmax_row(sc + r * ldk, a->pos0 + t0 + r % n + 1, S1p);
        for (int64_t r0 = 0; r0 < rows; r0 += RB) { /* times V: masked weights are exactly 0 */
            const int64_t vis = block_vis(a, t0, n, r0, rows);
            for (int64_t c0 = 0; c0 < hd; c0 += CB) {
                if (c0 + CB <= hd) {
                    float *o[TZQ_AP_RB];
                    for (int64_t r = 0; r < RB; r++)
                        o[r] = r0 + r < rows ? og + row_offset(a, t0, n, r0 + r) + c0 : NULL;
                    pv_block(sc + r0 * ldk, ldk, vg + c0, hd, vis, o);
                    continue;
                }
                for (int64_t rr = r0; rr < r0 + RB && rr < rows; rr++) { /* head-dimension tail, same order */
                    float *dst = og + row_offset(a, t0, n, rr);
                    for (int64_t c = c0; c < hd; c++) {
                        float acc = 0.0f;
                        for (int64_t t = 0; t < vis; t++) acc += sc[rr * ldk + t] * vg[t * hd + c];
                        dst[c] = acc;
                    }
                }
            }
        }
    }
    free(qr);
    free(buf);
}

int tzq_attn_prefill(const float *q, const float *k, const float *v, int64_t B, int64_t nkv, int64_t g,
                     int64_t T, int64_t hd, int64_t pos0, int64_t kvs, float *out)
{
    ap_job a;
    if (B < 0 || nkv <= 0 || g <= 0 || T < 0 || hd <= 0 || pos0 < 0 || kvs < (pos0 + T) * hd) return TZQ_EINVAL;
    if (B == 0 || T == 0) return TZQ_OK;
    a.q = q; a.k = k; a.v = v; a.out = out;
    a.B = B; a.nkv = nkv; a.g = g; a.T = T; a.hd = hd; a.pos0 = pos0; a.kvs = kvs;
    a.tiles = (T + TZQ_AP_TILE - 1) / TZQ_AP_TILE;
    a.kblocks = (pos0 + T + TZQ_AP_CB - 1) / TZQ_AP_CB;
    a.error = TZQ_OK;
    a.kp = (float *)malloc(sizeof(float) * (size_t)(B * nkv * a.kblocks * hd * TZQ_AP_CB));
    if (!a.kp) return TZQ_ENOMEM;
    tzq_parallel_for(B * nkv * a.kblocks, 1, pack_keys, &a);
    tzq_parallel_for(B * nkv * a.tiles, 1, ap_range, &a);
    free(a.kp);
    return a.error;
}

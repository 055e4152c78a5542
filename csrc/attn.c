/*
 * attn.c -- one decode step of grouped-query attention with a KV cache (T = 1 new position).
 *
 * For every batch row b and query head h (KV head kh = h / (nh / nkv)):
 *   RoPE (rotate-half, Hugging Face layout) on q and on the new key, with cos/sin of this position:
 *     r[j] = x[j] cos[j] - x[j+hd/2] sin[j],  r[j+hd/2] = x[j+hd/2] cos[j] + x[j] sin[j]   (j < hd/2)
 *   the roped key and the value are written to the caches at position pos;
 *   qs = r(q) * scale;  s_t = qs . k_t  (t = 0..pos);  p_t = exp(s_t - max s) / sum exp(s - max s);
 *   out[b, h*hd + j] = sum_t p_t v_t[j].
 * Every operation is fp32 (compiled without FMA contraction) in the order tinyzq/model.py's NumPy
 * path uses; only the dot-product and sum orders may differ from BLAS/NumPy's (~1e-7 relative).
 * Heads are split over the thread pool when the cache is long enough to pay for it.
 */
#include <math.h>
#include <stdlib.h>
#include "tzq_internal.h"

typedef struct {
    const float *q, *k, *v, *cs, *sn;
    int64_t B, nh, nkv, hd, qs, ks, vs, max_len, pos;
    float scale;
    float *kc, *vc, *out;
    int error;
} attn_job;

static void rope(const float *x, const float *cs, const float *sn, int64_t hd, float *r)
{
    const int64_t half = hd / 2;
    for (int64_t j = 0; j < half; j++) {
        r[j] = x[j] * cs[j] - x[j + half] * sn[j];
        r[j + half] = x[j + half] * cs[j] + x[j] * sn[j];
    }
}

/* items are (b, kv head) pairs: the new key/value is stored, then its g query heads attend */
static void attn_range(void *ctx, int64_t i0, int64_t i1)
{
    attn_job *a = (attn_job *)ctx;
    const int64_t hd = a->hd, S = a->pos + 1, g = a->nh / a->nkv;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(hd + S));
    if (!buf) {
        __atomic_store_n(&a->error, TZQ_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t it = i0; it < i1; it++) {
        const int64_t b = it / a->nkv, kh = it % a->nkv;
        float *kc = a->kc + ((b * a->nkv + kh) * a->max_len) * hd;
        float *vc = a->vc + ((b * a->nkv + kh) * a->max_len) * hd;
        float *qr = buf, *p = buf + hd;
        const float *vnew = a->v + b * a->vs + kh * hd;
        rope(a->k + b * a->ks + kh * hd, a->cs, a->sn, hd, kc + a->pos * hd);
        for (int64_t j = 0; j < hd; j++) vc[a->pos * hd + j] = vnew[j];
        for (int64_t hh = 0; hh < g; hh++) {
            const int64_t h = kh * g + hh;
            float mx = -INFINITY, sum = 0.0f;
            float *o = a->out + b * a->nh * hd + h * hd;
            rope(a->q + b * a->qs + h * hd, a->cs, a->sn, hd, qr);
            for (int64_t j = 0; j < hd; j++) qr[j] = qr[j] * a->scale;
            for (int64_t t = 0; t < S; t++) {
                const float *kt = kc + t * hd;
                float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                int64_t j = 0;
                for (; j + 8 <= hd; j += 8) /* 8 independent lanes: vectorised without reassociation */
                    for (int l = 0; l < 8; l++) acc[l] += qr[j + l] * kt[j + l];
                for (; j < hd; j++) acc[0] += qr[j] * kt[j];
                p[t] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                mx = p[t] > mx ? p[t] : mx;
            }
            for (int64_t t = 0; t < S; t++) {
                p[t] = expf(p[t] - mx);
                sum += p[t];
            }
            for (int64_t j = 0; j < hd; j++) o[j] = 0.0f;
            for (int64_t t = 0; t < S; t++) {
                const float pt = p[t] / sum; /* NumPy divides by the sum */
                const float *vt = vc + t * hd;
                for (int64_t j = 0; j < hd; j++) o[j] += pt * vt[j];
            }
        }
    }
    free(buf);
}

int tzq_attn_decode(const float *q, const float *k, const float *v, int64_t B, int64_t nh, int64_t nkv,
                    int64_t hd, int64_t qs, int64_t ks, int64_t vs, const float *cos, const float *sin,
                    float *kcache, float *vcache, int64_t max_len, int64_t pos, float scale, float *out)
{
    attn_job a;
    int64_t work;
    if (B < 0 || nh <= 0 || nkv <= 0 || nh % nkv || hd <= 0 || hd % 2 || pos < 0 || pos >= max_len ||
        qs < nh * hd || ks < nkv * hd || vs < nkv * hd)
        return TZQ_EINVAL;
    if (B == 0) return TZQ_OK;
    a.q = q; a.k = k; a.v = v; a.cs = cos; a.sn = sin;
    a.B = B; a.nh = nh; a.nkv = nkv; a.hd = hd; a.qs = qs; a.ks = ks; a.vs = vs;
    a.max_len = max_len; a.pos = pos; a.scale = scale;
    a.kc = kcache; a.vc = vcache; a.out = out; a.error = TZQ_OK;
    /* ~2 * g * (pos+1) * hd multiply-adds per item: thread only when an item is worth ~16K of them */
    work = 2 * (nh / nkv) * (pos + 1) * hd;
    tzq_parallel_for(B * nkv, work >= 16384 ? 1 : (16384 + work - 1) / work, attn_range, &a);
    return a.error;
}

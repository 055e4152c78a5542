/*
 * ops.c -- the element-wise parts of a many-token forward pass (prefill, evaluation, training),
 * on the thread pool: RMSNorm, SiLU(gate) * up, RoPE in place and the online log-sum-exp of a vocabulary tile (cross-entropy without [tokens, vocab]).
 *
 * The matrix products stay in BLAS; these loops were single-threaded NumPy passes over
 * [tokens, width] arrays (about a third of a 4 x 512 forward of SmolLM2). Every row is computed by
 * one thread in a fixed order, so results do not depend on the thread count. The formulas are
 * those of tinyzq/model.py's NumPy fall-backs (kept as the reference the tests compare against);
 * sums run in 8 fp32 lanes (vectorised without reassociation) and exp is tzq_expf (tzq_internal.h), so results
 * differ from NumPy's by ~1e-7 relative. The loops vectorise because the module is compiled with
 * -fno-trapping-math (build_ext.py): GCC does not if-convert the clamps of tzq_expf otherwise.
 */
#include <math.h>
#include <string.h>
#include "tzq_internal.h"

/* ---------------------------------------------------------------- RMSNorm */
float tzq_sum_squares8(const float *x, int64_t n)
{
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[j + l] * x[j + l];
    for (; j < n; j++) acc[0] += x[j] * x[j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

typedef struct {
    const float *x, *w;
    float *out;
    int64_t d, xs, os;
    float eps;
} rms_job;

static void rms_range(void *ctx, int64_t i0, int64_t i1)
{
    const rms_job *a = (const rms_job *)ctx;
    for (int64_t i = i0; i < i1; i++) {
        const float *x = a->x + i * a->xs;
        float *o = a->out + i * a->os;
        const float inv = (float)(1.0 / sqrt((double)tzq_sum_squares8(x, a->d) / (double)a->d + (double)a->eps));
        for (int64_t j = 0; j < a->d; j++) o[j] = (x[j] * inv) * a->w[j];
    }
}

int tzq_rms_norm(const float *x, int64_t n, int64_t d, int64_t xs, const float *w, float eps, float *out,
                 int64_t os)
{
    rms_job a;
    if (n < 0 || d <= 0 || xs < d || os < d || !(eps >= 0.0f)) return TZQ_EINVAL;
    a.x = x; a.w = w; a.out = out; a.d = d; a.xs = xs; a.os = os; a.eps = eps;
    tzq_parallel_for(n, 1 + 8192 / d, rms_range, &a);
    return TZQ_OK;
}

/* ---------------------------------------------------------------- SiLU(g) * u */
typedef struct {
    const float *g, *u;
    float *out;
    int64_t f, gs, us, os;
} silu_job;

static void silu_range(void *ctx, int64_t i0, int64_t i1)
{
    const silu_job *a = (const silu_job *)ctx;
    for (int64_t i = i0; i < i1; i++) {
        const float *g = a->g + i * a->gs, *u = a->u + i * a->us;
        float *o = a->out + i * a->os;
        for (int64_t j = 0; j < a->f; j++) o[j] = (g[j] / (1.0f + tzq_expf(-g[j]))) * u[j];
    }
}

int tzq_silu_mul(const float *g, int64_t gs, const float *u, int64_t us, int64_t n, int64_t f, float *out,
                 int64_t os)
{
    silu_job a;
    if (n < 0 || f <= 0 || gs < f || us < f || os < f) return TZQ_EINVAL;
    a.g = g; a.u = u; a.out = out; a.f = f; a.gs = gs; a.us = us; a.os = os;
    tzq_parallel_for(n, 1 + 8192 / f, silu_range, &a);
    return TZQ_OK;
}

/* ---------------------------------------------------------------- RoPE, in place */
typedef struct {
    float *x;
    const float *cs, *sn;
    int64_t T, xs, heads, hd;
} rope_job;

static void rope_range(void *ctx, int64_t i0, int64_t i1)
{
    const rope_job *a = (const rope_job *)ctx;
    const int64_t half = a->hd / 2;
    for (int64_t i = i0; i < i1; i++) {
        const float *c = a->cs + (i % a->T) * half, *s = a->sn + (i % a->T) * half;
        for (int64_t h = 0; h < a->heads; h++) {
            float *x1 = a->x + i * a->xs + h * a->hd, *x2 = x1 + half;
            for (int64_t j = 0; j < half; j++) {
                const float p = x1[j], q = x2[j];
                x1[j] = p * c[j] - q * s[j];
                x2[j] = q * c[j] + p * s[j];
            }
        }
    }
}

int tzq_rope(float *x, int64_t n, int64_t T, int64_t xs, int64_t heads, int64_t hd, const float *cos,
             const float *sin)
{
    rope_job a;
    if (n < 0 || T <= 0 || heads <= 0 || hd <= 0 || hd % 2 || xs < heads * hd) return TZQ_EINVAL;
    a.x = x; a.cs = cos; a.sn = sin; a.T = T; a.xs = xs; a.heads = heads; a.hd = hd;
    tzq_parallel_for(n, 1 + 8192 / (heads * hd), rope_range, &a);
    return TZQ_OK;
}

/* ---------------------------------------------------------------- log-sum-exp of a vocabulary tile */
typedef struct {
    const float *z;
    int64_t n, w;
    double *mx, *sum;
} lse_job;

static void lse_range(void *ctx, int64_t i0, int64_t i1)
{
    const lse_job *a = (const lse_job *)ctx;
    for (int64_t i = i0; i < i1; i++) {
        const float *z = a->z + i * a->w;
        const float zm = tzq_max8(z, a->w);
        const float m = (double)zm > a->mx[i] ? zm : (float)a->mx[i];
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, s;
        int64_t j = 0;
        for (; j + 8 <= a->w; j += 8)
            for (int l = 0; l < 8; l++) acc[l] += tzq_expf(z[j + l] - m);
        for (; j < a->w; j++) acc[0] += tzq_expf(z[j] - m);
        s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        a->sum[i] = a->sum[i] * exp(a->mx[i] - (double)m) + (double)s;
        a->mx[i] = m;
    }
}

int tzq_lse_update(const float *z, int64_t n, int64_t w, double *run_max, double *run_sum)
{
    lse_job a;
    if (n < 0 || w <= 0) return TZQ_EINVAL;
    a.z = z; a.n = n; a.w = w; a.mx = run_max; a.sum = run_sum;
    tzq_parallel_for(n, 1 + 8192 / w, lse_range, &a);
    return TZQ_OK;
}

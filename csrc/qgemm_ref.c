/*
 * qgemm_ref.c -- the int8-activation product of docs/FORMAT.md, scalar reference.
 *
 * Activations are quantized once per call, Q8_0 style, in blocks of 32:
 *   d_b = max|x_b| / 127;  xi_j = round_half_away(x_j * (1/d_b)) in [-127, 127]  (0 if d_b == 0)
 * and for every output row o and group g of the row:
 *   acc_g = sum_{b in g} d_b * (sum_{j in b} q_j * xi_j)      (integer inner sums are exact)
 *   sx_g  = sum_{b in g} d_b * (sum_{j in b} xi_j)
 *   y    += scales[o, g] * (acc_g - zeros[o, g] * sx_g)
 * with every float operation in fp32, in this order, without FMA contraction (build_ext.py
 * compiles with -ffp-contract=off). The NumPy reference (tinyzq/quant/packing.py) performs the
 * same operations in the same order and matches this code bit for bit.
 *
 * The activation quantizer and sx are shared by every variant (so xi, d are bit-identical across
 * modules); the SIMD row kernels only reorder float additions.
 */
#include <stdlib.h>
#include "tzq_internal.h"

#ifndef TZQ_QUANT_ROW /* else a SIMD version, bit-identical to this one, is used (qgemm_x86.c) */
static void quantize_row(const float *x, int64_t cols, int8_t *xi, float *d)
{
    for (int64_t b = 0; b < cols / 32; b++) {
        const float *xb = x + 32 * b;
        int8_t *qb = xi + 32 * b;
        float amax = 0.0f, db, inv;
        for (int j = 0; j < 32; j++) {
            const float a = xb[j] < 0.0f ? -xb[j] : xb[j];
            amax = a > amax ? a : amax;
        }
        db = amax / 127.0f;
        inv = db != 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
        for (int j = 0; j < 32; j++) {
            float v = xb[j] * inv;
            if (v != v) v = 0.0f; /* 0 * inf when d_b is subnormal */
            v = v > 127.0f ? 127.0f : v;
            v = v < -127.0f ? -127.0f : v;
            qb[j] = (int8_t)tzq_round_half_away(v);
        }
    }
}
#endif

int tzq_quantize_activations(const float *x, int64_t n, int64_t cols, int8_t *xi, float *d)
{
    if (tzq_check_layout(cols, 8, 0) != TZQ_OK || n < 0) return TZQ_EINVAL;
#ifdef TZQ_QUANT_ROW /* a SIMD version, bit-identical */
    for (int64_t i = 0; i < n; i++) TZQ_QUANT_ROW(x + i * cols, cols, xi + i * cols, d + i * (cols / 32));
#else
    for (int64_t i = 0; i < n; i++) quantize_row(x + i * cols, cols, xi + i * cols, d + i * (cols / 32));
#endif
    return TZQ_OK;
}

static inline int32_t dot32(const uint8_t *q, const int8_t *x)
{
    int32_t s = 0;
    for (int j = 0; j < 32; j++) s += (int32_t)q[j] * (int32_t)x[j];
    return s;
}

#define REF_NT 8 /* activation rows handled together (weights unpacked once per row) */

void tzq_ref_qmm_rows(tzq_qmm *m, int64_t r0, int64_t r1)
{
    const int64_t rb = tzq_row_bytes(m->cols, m->bits), bpg = m->group / 32;
    uint8_t *q = (uint8_t *)malloc((size_t)m->cols);
    if (!q) {
        __atomic_store_n(&m->error, TZQ_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t o = r0; o < r1; o++) {
        const float *s = m->scales + o * m->ng, *z = m->zeros + o * m->ng;
        tzq_unpack_row(m->codes + o * rb, q, m->cols, m->bits);
        for (int64_t n0 = 0; n0 < m->n; n0 += REF_NT) {
            const int nt = (int)(m->n - n0 < REF_NT ? m->n - n0 : REF_NT);
            float y[REF_NT] = {0}, acc[REF_NT];
            for (int64_t g = 0; g < m->ng; g++) {
                for (int t = 0; t < nt; t++) acc[t] = 0.0f;
                for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
                    for (int t = 0; t < nt; t++) {
                        const int32_t isum = dot32(q + 32 * b, m->xi + (n0 + t) * m->cols + 32 * b);
                        acc[t] += m->d[(n0 + t) * m->nb + b] * (float)isum;
                    }
                }
                for (int t = 0; t < nt; t++)
                    y[t] += s[g] * (acc[t] - z[g] * m->sx[(n0 + t) * m->ng + g]);
            }
            for (int t = 0; t < nt; t++) m->y[(n0 + t) * m->rows + o] = y[t];
        }
    }
    free(q);
}

static void qmm_range(void *ctx, int64_t r0, int64_t r1) { TZQ_QMM_ROWS((tzq_qmm *)ctx, r0, r1); }

int tzq_qmatmul(const float *x, int64_t n, const uint8_t *codes, const float *scales,
                const float *zeros, int64_t rows, int64_t cols, int bits, int group, float *y)
{
    tzq_qmm m;
    int8_t *xi;
    float *d, *sx;
    int rc;
    int64_t grain;
    if (tzq_check_layout(cols, bits, group) != TZQ_OK || group == 0 || n < 0 || rows < 0)
        return TZQ_EINVAL;
    if (n == 0 || rows == 0) return TZQ_OK;
    m.n = n; m.rows = rows; m.cols = cols; m.nb = cols / 32; m.ng = cols / group;
    m.bits = bits; m.group = group;
    m.codes = codes; m.scales = scales; m.zeros = zeros; m.y = y;
    m.kern = NULL; m.error = TZQ_OK;

    xi = (int8_t *)malloc((size_t)(n * cols));
    d = (float *)malloc(sizeof(float) * (size_t)(n * m.nb));
    sx = (float *)malloc(sizeof(float) * (size_t)(n * m.ng));
    if (!xi || !d || !sx) {
        free(xi); free(d); free(sx);
        return TZQ_ENOMEM;
    }
    tzq_quantize_activations(x, n, cols, xi, d);
    for (int64_t i = 0; i < n; i++) {
        const int64_t bpg = group / 32;
        for (int64_t g = 0; g < m.ng; g++) {
            float acc = 0.0f;
            for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
                const int8_t *xb = xi + i * cols + 32 * b;
                int32_t s = 0;
                for (int j = 0; j < 32; j++) s += xb[j];
                acc += d[i * m.nb + b] * (float)s;
            }
            sx[i * m.ng + g] = acc;
        }
    }
    m.xi = xi; m.d = d; m.sx = sx;

    rc = TZQ_QMM_PREPARE(&m);
    if (rc == TZQ_OK) {
        /* ~32 KiB of packed weights per chunk, per activation row */
        grain = (32768 / (tzq_row_bytes(cols, bits) * (n < 8 ? n : 8))) + 1;
        tzq_parallel_for(rows, grain, qmm_range, &m);
        rc = m.error;
    }
    TZQ_QMM_RELEASE(&m);
    free(xi); free(d); free(sx);
    return rc;
}

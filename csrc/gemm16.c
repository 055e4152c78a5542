/*
 * gemm16.c -- the many-row product with int16 activations (prefill, evaluation, training).
 *
 * Why int16: the fp32 path (dequantized weights + BLAS sgemm) runs at the core's fp32 FMA peak,
 * and a ZO step is two such forwards. AVX-512 VNNI's vpdpwssd does 32 int16 multiply-adds per
 * instruction against 16 for an fp32 FMA, and the weights are small integers already. int8
 * activations (the decode kernel's) would be faster still, but their rounding drowns the loss
 * differences ZO measures: on SmolLM2 W3g64 the projected gradient of the same directions
 * correlated 0.26 between the fp32 and the int8 forward, and 0.9997 with int16 (README).
 *
 * Definition (docs/FORMAT.md, "int16-activation product"), every float operation in fp32, in this
 * order, without FMA (build_ext.py compiles with -ffp-contract=off):
 *   per activation row i and group g of `group` inputs:
 *     a[i,g]  = max|x[i,k in g]| / 32767;  xq = round_half_away(x * (1/a)) in [-32767, 32767]
 *               (a == 0: xq = 0);  sq[i,g] = sum_k xq  (exact int32)
 *   per weight row o: centred codes c = q - 2^(bits-1) and zero z' = zeros[o,g] - 2^(bits-1), so
 *     the integer sums stay small and the zero term cancels less;
 *     acc = sum_{k in g} xq[i,k] * c[o,k]                         (exact int32)
 *     y[i,o] = sum_g ((float)acc - z' * (float)sq[i,g]) * (scales[o,g] * a[i,g])   (g ascending)
 * The integer sums are exact, so the SIMD variant (AVX-512) and the scalar reference give the
 * same bits. int32 cannot overflow while group * 2^(bits-1) * 32767 < 2^31: tzq_gemm16 checks it.
 *
 * Only the AVX-512 module has a fast variant (tzq_gemm16_fast() == 1); elsewhere the model keeps
 * the fp32 BLAS path (AVX2's vpmaddwd is no faster than an fp32 FMA; NEON has no int16 dot) and
 * this reference serves the tests.
 */
#include <stdlib.h>
#include <string.h>
#include "tzq_internal.h"

#define G16_QMAX 32767.0f
#define G16_T 8   /* activation rows per register block (SIMD) */
#define G16_R 16  /* weight rows per panel (one zmm of int32 / fp32 lanes) */

typedef struct {
    const int16_t *xq;   /* [n rounded up to G16_T, cols] quantized activations, rows >= n are zero */
    const float *a;      /* [same rows, ng] */
    const float *sq;     /* [same rows, ng] (float)sum of xq per group, exact */
    int64_t n, rows, cols, ng;
    int bits, group;
    const uint8_t *codes;
    const float *scales, *zeros;
    float *y;
    int16_t *panels;     /* SIMD: the whole weight as centred int16 panels, built once per call */
    float *ps, *pz;      /* SIMD: the panels' scales and z' [npanels, ng, 16] */
    int error;
} tzq_g16;

#if defined(TZQ_ISA_AVX512)
#include <immintrin.h>

/* The same quantizer 16 values at a time: every step is exact or rounds like the scalar code
   (max and the int32 sum in any order; d and 1/d computed as scalars), so xq, a and sq are equal. */
static void g16_quantize(const float *x, int64_t cols, int group, int16_t *xq, float *a, float *sq)
{
    const __m512 qmax = _mm512_set1_ps(G16_QMAX), nqmax = _mm512_set1_ps(-G16_QMAX);
    const __m512 half = _mm512_set1_ps(0.5f), nhalf = _mm512_set1_ps(-0.5f), one = _mm512_set1_ps(1.0f);
    for (int64_t g = 0; g < cols / group; g++) {
        const float *xg = x + g * group;
        int16_t *qg = xq + g * group;
        __m512 m = _mm512_setzero_ps();
        __m512i sum = _mm512_setzero_si512();
        float amax, d, inv;
        for (int j = 0; j < group; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xg + j)));
        amax = _mm512_reduce_max_ps(m);
        d = amax / G16_QMAX;
        inv = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < group; j += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xg + j), _mm512_set1_ps(inv)), t, f;
            __m512i r;
            v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v); /* NaN -> 0 */
            v = _mm512_max_ps(_mm512_min_ps(v, qmax), nqmax);
            t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            f = _mm512_sub_ps(v, t);
            t = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask(f, half, _CMP_GE_OQ), t, one);
            t = _mm512_mask_sub_ps(t, _mm512_cmp_ps_mask(f, nhalf, _CMP_LE_OQ), t, one);
            r = _mm512_cvttps_epi32(t);
            sum = _mm512_add_epi32(sum, r);
            _mm256_storeu_si256((__m256i *)(qg + j), _mm512_cvtepi32_epi16(r));
        }
        a[g] = d;
        sq[g] = (float)_mm512_reduce_add_epi32(sum);
    }
}


/* One panel of R weight rows as centred int16 pairs: p[(k/2)*32 + 2*l + (k&1)] = c[o0+l, k] (rows
   past the end are 0): the rows are unpacked and centred contiguously into r16 [R, cols], then each
   pair column is gathered (16 32-bit loads). Its scales and z' go to s[g*16 + l], z[g*16 + l]. */
static void g16_panel(const tzq_g16 *m, int64_t o0, int16_t *p, float *s, float *z, uint8_t *q, int16_t *r16)
{
    const int64_t rb = tzq_row_bytes(m->cols, m->bits), cols = m->cols;
    const int16_t c = (int16_t)(1 << (m->bits - 1));
    const float cf = (float)c;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)(cols / 2)));
    for (int l = 0; l < G16_R; l++) {
        const int64_t o = o0 + l;
        int16_t *r = r16 + l * cols;
        if (o < m->rows) {
            tzq_unpack_row(m->codes + o * rb, q, cols, m->bits);
            for (int64_t k = 0; k < cols; k++) r[k] = (int16_t)(q[k] - c);
            for (int64_t g = 0; g < m->ng; g++) {
                s[g * G16_R + l] = m->scales[o * m->ng + g];
                z[g * G16_R + l] = m->zeros[o * m->ng + g] - cf;
            }
        } else {
            memset(r, 0, sizeof(int16_t) * (size_t)cols);
            for (int64_t g = 0; g < m->ng; g++) s[g * G16_R + l] = z[g * G16_R + l] = 0.0f;
        }
    }
    for (int64_t k = 0; k < cols / 2; k++)
        _mm512_storeu_si512((void *)(p + k * 32), _mm512_i32gather_epi32(idx, (const void *)(r16 + 2 * k), 4));
}

/* y rows i0..i0+T-1 (those < n), columns o0..o0+15 (those < rows) */
static void g16_block(const tzq_g16 *m, int64_t i0, int64_t o0, const int16_t *p, const float *s,
                      const float *z)
{
    const int64_t cols = m->cols, ng = m->ng, pairs = m->group / 2;
    const int32_t *x = (const int32_t *)(m->xq + i0 * cols);  /* int16 pairs */
    const int64_t xs = cols / 2;
    __m512 f[G16_T];
    for (int t = 0; t < G16_T; t++) f[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i acc[G16_T];
        const int16_t *w = p + g * pairs * 32;
        const int32_t *xg = x + g * pairs;
        for (int t = 0; t < G16_T; t++) acc[t] = _mm512_setzero_si512();
        for (int64_t k = 0; k < pairs; k++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(w + k * 32));
            for (int t = 0; t < G16_T; t++)
                acc[t] = _mm512_dpwssd_epi32(acc[t], wv, _mm512_set1_epi32(xg[t * xs + k]));
        }
        {
            const __m512 sv = _mm512_loadu_ps(s + g * G16_R), zv = _mm512_loadu_ps(z + g * G16_R);
            for (int t = 0; t < G16_T; t++) {
                const int64_t ia = (i0 + t) * ng + g;
                const __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_mul_ps(zv, _mm512_set1_ps(m->sq[ia])));
                f[t] = _mm512_add_ps(f[t], _mm512_mul_ps(v, _mm512_mul_ps(sv, _mm512_set1_ps(m->a[ia]))));
            }
        }
    }
    {
        const int64_t left = m->rows - o0;
        const __mmask16 mask = left >= G16_R ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        for (int t = 0; t < G16_T && i0 + t < m->n; t++) _mm512_mask_storeu_ps(m->y + (i0 + t) * m->rows + o0, mask, f[t]);
    }
}

/* Phase 1: every panel of the weight, once per call, into m->panels (rows rounded up to 16). */
static void g16_pack_range(void *ctx, int64_t p0, int64_t p1)
{
    tzq_g16 *m = (tzq_g16 *)ctx;
    uint8_t *q = (uint8_t *)malloc((size_t)m->cols);
    int16_t *r16 = (int16_t *)malloc(sizeof(int16_t) * (size_t)(m->cols * G16_R));
    if (!q || !r16) {
        __atomic_store_n(&m->error, TZQ_ENOMEM, __ATOMIC_RELAXED);
    } else {
        for (int64_t pi = p0; pi < p1; pi++)
            g16_panel(m, pi * G16_R, m->panels + pi * m->cols * G16_R, m->ps + pi * m->ng * G16_R,
                      m->pz + pi * m->ng * G16_R, q, r16);
    }
    free(q); free(r16);
}

/* Phase 2: tiles of G16_MB activation rows x G16_PB panels, so a tile's activations stay in L2 and
   each panel in L1 while it meets them (a panel pass over all rows streamed them from L3). */
#define G16_MB 128
#define G16_PB 8
static void g16_tile_range(void *ctx, int64_t t0, int64_t t1)
{
    tzq_g16 *m = (tzq_g16 *)ctx;
    const int64_t npanels = (m->rows + G16_R - 1) / G16_R, pgroups = (npanels + G16_PB - 1) / G16_PB;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t i_lo = (t / pgroups) * G16_MB, p_lo = (t % pgroups) * G16_PB;
        const int64_t i_hi = i_lo + G16_MB < m->n ? i_lo + G16_MB : m->n;
        const int64_t p_hi = p_lo + G16_PB < npanels ? p_lo + G16_PB : npanels;
        for (int64_t pi = p_lo; pi < p_hi; pi++)
            for (int64_t i0 = i_lo; i0 < i_hi; i0 += G16_T)
                g16_block(m, i0, pi * G16_R, m->panels + pi * m->cols * G16_R, m->ps + pi * m->ng * G16_R,
                          m->pz + pi * m->ng * G16_R);
    }
}

static int g16_run(tzq_g16 *m)
{
    const int64_t npanels = (m->rows + G16_R - 1) / G16_R;
    const int64_t tiles = ((m->n + G16_MB - 1) / G16_MB) * ((npanels + G16_PB - 1) / G16_PB);
    m->panels = (int16_t *)malloc(sizeof(int16_t) * (size_t)(npanels * G16_R * m->cols));
    m->ps = (float *)malloc(sizeof(float) * (size_t)(npanels * G16_R * m->ng));
    m->pz = (float *)malloc(sizeof(float) * (size_t)(npanels * G16_R * m->ng));
    if (m->panels && m->ps && m->pz) {
        tzq_parallel_for(npanels, 1, g16_pack_range, m);
        if (m->error == TZQ_OK) tzq_parallel_for(tiles, 1, g16_tile_range, m);
    } else {
        m->error = TZQ_ENOMEM;
    }
    free(m->panels); free(m->ps); free(m->pz);
    return m->error;
}
#define G16_FAST 1
#else
static void g16_quantize(const float *x, int64_t cols, int group, int16_t *xq, float *a, float *sq)
{
    for (int64_t g = 0; g < cols / group; g++) {
        const float *xg = x + g * group;
        int16_t *qg = xq + g * group;
        float amax = 0.0f, d, inv;
        int32_t s = 0;
        for (int j = 0; j < group; j++) {
            const float v = xg[j] < 0.0f ? -xg[j] : xg[j];
            amax = v > amax ? v : amax;
        }
        d = amax / G16_QMAX;
        inv = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < group; j++) {
            float v = xg[j] * inv;
            if (v != v) v = 0.0f; /* 0 * inf when d is subnormal */
            v = v > G16_QMAX ? G16_QMAX : v;
            v = v < -G16_QMAX ? -G16_QMAX : v;
            qg[j] = (int16_t)tzq_round_half_away(v);
            s += qg[j];
        }
        a[g] = d;
        sq[g] = (float)s;
    }
}

/* scalar reference: rows o0..o1-1 */
static void g16_range(void *ctx, int64_t o0, int64_t o1)
{
    tzq_g16 *m = (tzq_g16 *)ctx;
    const int64_t rb = tzq_row_bytes(m->cols, m->bits);
    const int32_t c = 1 << (m->bits - 1);
    const float cf = (float)c;
    uint8_t *q = (uint8_t *)malloc((size_t)m->cols);
    if (!q) {
        __atomic_store_n(&m->error, TZQ_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t o = o0; o < o1; o++) {
        tzq_unpack_row(m->codes + o * rb, q, m->cols, m->bits);
        for (int64_t i = 0; i < m->n; i++) {
            const int16_t *x = m->xq + i * m->cols;
            float f = 0.0f;
            for (int64_t g = 0; g < m->ng; g++) {
                const int64_t ia = i * m->ng + g;
                int32_t acc = 0;
                for (int64_t k = g * m->group; k < (g + 1) * m->group; k++) acc += (int32_t)x[k] * ((int32_t)q[k] - c);
                {
                    const float zc = m->zeros[o * m->ng + g] - cf;
                    const float v = (float)acc - zc * m->sq[ia];
                    f = f + v * (m->scales[o * m->ng + g] * m->a[ia]);
                }
            }
            m->y[i * m->rows + o] = f;
        }
    }
    free(q);
}
static int g16_run(tzq_g16 *m)
{
    tzq_parallel_for(m->rows, 1, g16_range, m);
    return m->error;
}
#define G16_FAST 0
#endif

int tzq_gemm16_fast(void) { return G16_FAST; }

typedef struct {
    const float *x;
    tzq_g16 *m;
    int16_t *xq;
    float *a, *sq;
} tzq_g16q;

static void g16_quant_rows(void *ctx, int64_t i0, int64_t i1)
{
    tzq_g16q *j = (tzq_g16q *)ctx;
    const int64_t cols = j->m->cols, ng = j->m->ng;
    for (int64_t i = i0; i < i1; i++)
        g16_quantize(j->x + i * cols, cols, j->m->group, j->xq + i * cols, j->a + i * ng, j->sq + i * ng);
}

int tzq_gemm16(const float *x, int64_t n, const uint8_t *codes, const float *scales, const float *zeros,
               int64_t rows, int64_t cols, int bits, int group, float *y)
{
    tzq_g16 m;
    tzq_g16q j;
    int16_t *xq;
    float *a, *sq;
    int64_t n_pad;
    int rc;
    if (tzq_check_layout(cols, bits, group) != TZQ_OK || group == 0 || n < 0 || rows < 0)
        return TZQ_EINVAL;
    if ((int64_t)group * (1 << (bits - 1)) * 32767 >= ((int64_t)1 << 31)) return TZQ_EINVAL; /* int32 sums */
    if (n == 0 || rows == 0) return TZQ_OK;
    n_pad = (n + G16_T - 1) / G16_T * G16_T;
    memset(&m, 0, sizeof m);
    m.n = n; m.rows = rows; m.cols = cols; m.ng = cols / group;
    m.bits = bits; m.group = group; m.codes = codes; m.scales = scales; m.zeros = zeros; m.y = y;
    xq = (int16_t *)calloc((size_t)(n_pad * cols), sizeof(int16_t));
    a = (float *)calloc((size_t)(n_pad * m.ng), sizeof(float));
    sq = (float *)calloc((size_t)(n_pad * m.ng), sizeof(float));
    if (!xq || !a || !sq) {
        free(xq); free(a); free(sq);
        return TZQ_ENOMEM;
    }
    j.x = x; j.m = &m; j.xq = xq; j.a = a; j.sq = sq;
    tzq_parallel_for(n, 1 + 16384 / cols, g16_quant_rows, &j);
    m.xq = xq; m.a = a; m.sq = sq; m.error = TZQ_OK;
    rc = g16_run(&m);
    free(xq); free(a); free(sq);
    return rc;
}

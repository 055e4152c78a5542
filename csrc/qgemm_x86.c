/*
 * qgemm_x86.c -- AVX2 (maddubs/madd) and AVX-512 VNNI (dpbusd) variants of the row kernels.
 *
 * Compiled with real code only into tinyzq._tzq_avx2 (TZQ_ISA_AVX2: -mavx2 -mfma -mf16c) and
 * tinyzq._tzq_avx512 (TZQ_ISA_AVX512: + -mavx512f -mavx512bw -mavx512vl -mavx512vnni); in every
 * other module this file is empty. The AVX-512 variant uses the same 256-bit data layout and
 * only replaces maddubs+madd by vpdpbusd, so for 2/3/4 bits its int32 lane sums and therefore its
 * float results are bit-identical to AVX2's (8-bit: x stays int8 and lanes hold other partial
 * sums, equal up to float reordering). The VNNI path can be built with vpdpbusd emulated in
 * AVX2 (TZQ_EMULATE_VNNI, used by the tests) to test it on machines without AVX-512.
 *
 * Dequantization: 8 outputs at a time: broadcast the 32-bit word that holds their codes,
 * variable right shifts (vpsrlvd) put each code at the bottom of its lane, mask, convert,
 * then (q - z) * s -- a subtraction and a multiplication, no FMA, so the result is bit-identical
 * to the scalar reference.
 *
 * Product: the activation side is prepared once per call (it is shared by all weight rows):
 * quantized activations are permuted to match the byte order of the packed codes, so a "step"
 * of 32 code bytes needs only shifts and masks:
 *   4-bit, step = 64 inputs  (2 blocks):  x_even[32] x_odd[32]; int32 lanes = [b0 x4, b1 x4]
 *   2/3-bit, step = 128 inputs (4 blocks): x_t[k] = xi[4k+t], t = 0..3; lanes = [b0,b0,b1,b1,..]
 *   8-bit, step = 32 inputs (1 block):   xi as int16 (AVX2: vpmovzxbw + vpmaddwd, because
 *                                         maddubs would saturate at 255*127*2) or int8 (VNNI)
 * For 3-bit the bit-2 plane (16 bytes per step) is expanded to one nibble per byte and turned
 * into 0/4 with a vpshufb table per t. Each step's int32 sums are converted to fp32 and
 * accumulated with FMA against a per-lane multiplier d_b * s_g (d_b from the prepared
 * activations, s_g broadcast, or gathered with vpermps when a step straddles groups); the zero
 * points are applied once per row as sum_g s_g * z_g * sx_g. When every step holds two whole
 * groups (2/3-bit g64, 4-bit g32) s_g is one 64-bit broadcast + an in-lane permute. The last step
 * of a row is read from a zero-padded copy when the row does not fill it (the padded activations
 * are 0 and d_b = 0), except for 2/3-bit rows that end half-way into it (cols % 128 == 64, e.g.
 * 576; group % 64 == 0): that half step is done for two rows at once, one per 128-bit lane
 * (half_step; ~1/3 of the 2/3-bit cost at 576 columns went into the padded copies and the wasted
 * half). The 2/3-bit activation permutation is vectorised (permute23).
 * Work is done in tiles of RT weight rows x NT activation rows, (RT, NT) = (4,1), (2,2), (1,4)
 * (+ (1,2), (1,1) for leftovers): every (row, activation) pair has its own accumulator, so
 * several FMA chains are in flight, and a weight row is read from memory once per call (the
 * passes for further activation tiles hit L1). The horizontal sums are associated the same way
 * in every tile shape, so results do not depend on how rows were split between threads.
 */
#include <stdlib.h>
#include <string.h>
#include "tzq_internal.h"

#if TZQ_KERN_X86

#include <immintrin.h>

#if defined(TZQ_ISA_AVX512)
#define TZQ_VNNI 1
#define DPBUSD _mm256_dpbusd_epi32
#elif defined(TZQ_EMULATE_VNNI)
/* Tests only (tests/test_kernels.py builds a throw-away module with this): run the VNNI data
   layout on an AVX2-only machine, with vpdpbusd emulated exactly (no saturation). */
#define TZQ_VNNI 1
static inline __m256i DPBUSD(__m256i acc, __m256i u, __m256i s)
{
    const __m256i a = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(u)),
                                        _mm256_cvtepi8_epi16(_mm256_castsi256_si128(s)));
    const __m256i b = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1)),
                                        _mm256_cvtepi8_epi16(_mm256_extracti128_si256(s, 1)));
    return _mm256_add_epi32(acc, _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xd8));
}
#else
#define TZQ_VNNI 0
#endif

static inline uint32_t ld_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint32_t ld_u16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ------------------------------------------------------------------ dequantize */

TZQ_INLINE void store_deq(float *out, __m256i q, __m256 zv, __m256 sv)
{
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zv), sv));
}

static void deq4(const uint8_t *row, const float *s, const float *z, int64_t cols, int group,
                 float *out)
{
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), m = _mm256_set1_epi32(15);
    for (int64_t g = 0; g < cols / group; g++) {
        const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
        for (int64_t j = g * group; j < (g + 1) * group; j += 16) {
            const __m256i w0 = _mm256_set1_epi32((int)ld_u32(row + j / 2));
            const __m256i w1 = _mm256_set1_epi32((int)ld_u32(row + j / 2 + 4));
            store_deq(out + j, _mm256_and_si256(_mm256_srlv_epi32(w0, sh), m), zv, sv);
            store_deq(out + j + 8, _mm256_and_si256(_mm256_srlv_epi32(w1, sh), m), zv, sv);
        }
    }
}

static void deq2(const uint8_t *row, const float *s, const float *z, int64_t cols, int group,
                 float *out)
{
    const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256i m = _mm256_set1_epi32(3);
    for (int64_t g = 0; g < cols / group; g++) {
        const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
        for (int64_t j = g * group; j < (g + 1) * group; j += 16) {
            const __m256i w = _mm256_set1_epi32((int)ld_u32(row + j / 4));
            store_deq(out + j, _mm256_and_si256(_mm256_srlv_epi32(w, sh0), m), zv, sv);
            store_deq(out + j + 8, _mm256_and_si256(_mm256_srlv_epi32(w, sh1), m), zv, sv);
        }
    }
}

static void deq3(const uint8_t *row, const float *s, const float *z, int64_t cols, int group,
                 float *out)
{
    const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256i hs0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i hs1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i m = _mm256_set1_epi32(3), one = _mm256_set1_epi32(1);
    const uint8_t *hi = row + cols / 4;
    for (int64_t g = 0; g < cols / group; g++) {
        const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
        for (int64_t j = g * group; j < (g + 1) * group; j += 16) {
            const __m256i w = _mm256_set1_epi32((int)ld_u32(row + j / 4));
            const __m256i h = _mm256_set1_epi32((int)ld_u16(hi + j / 8));
            const __m256i h0 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(h, hs0), one), 2);
            const __m256i h1 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(h, hs1), one), 2);
            store_deq(out + j, _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(w, sh0), m), h0), zv, sv);
            store_deq(out + j + 8, _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(w, sh1), m), h1), zv, sv);
        }
    }
}

static void deq8(const uint8_t *row, const float *s, const float *z, int64_t cols, int group,
                 float *out)
{
    for (int64_t g = 0; g < cols / group; g++) {
        const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
        for (int64_t j = g * group; j < (g + 1) * group; j += 16) {
            const __m128i w = _mm_loadu_si128((const __m128i *)(row + j));
            store_deq(out + j, _mm256_cvtepu8_epi32(w), zv, sv);
            store_deq(out + j + 8, _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(w, w)), zv, sv);
        }
    }
}

void tzq_x86_dequant_row(const uint8_t *row, const float *s, const float *z, int64_t cols,
                         int bits, int group, float *out)
{
    switch (bits) {
    case 4: deq4(row, s, z, cols, group, out); break;
    case 2: deq2(row, s, z, cols, group, out); break;
    case 3: deq3(row, s, z, cols, group, out); break;
    default: deq8(row, s, z, cols, group, out); break;
    }
}

/* ------------------------------------------------------------------ activation quantizer */

/* qgemm_ref.c's quantize_row, 32 values at a time, bit-identical: the same fp32 operations
   (amax of |x| ignoring NaN, d = amax / 127, inv = 1 / d or 0, v = x * inv, NaN -> 0, clamp to
   [-127, 127], round half away from zero via truncation) on 8 lanes. The scalar loop does not
   vectorise and cost ~3 us per 576 values, about as much as a small decode product. */
TZQ_INLINE __m256i quant8(__m256 x, __m256 inv)
{
    __m256 v = _mm256_mul_ps(x, inv);
    __m256 t, f;
    __m256i r;
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q)); /* NaN -> 0 */
    v = _mm256_min_ps(v, _mm256_set1_ps(127.0f));
    v = _mm256_max_ps(v, _mm256_set1_ps(-127.0f));
    t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    f = _mm256_sub_ps(v, t);
    r = _mm256_cvttps_epi32(t);
    r = _mm256_sub_epi32(r, _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(0.5f), _CMP_GE_OQ)));
    return _mm256_add_epi32(r, _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(-0.5f), _CMP_LE_OQ)));
}

void tzq_x86_quantize_row(const float *x, int64_t cols, int8_t *xi, float *d)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < cols / 32; b++) {
        const float *xb = x + 32 * b;
        const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_setzero_ps();
        __m128 h;
        float amax, db, inv;
        __m256i q01, q23;
        /* max_ps returns its second operand when either is NaN: NaN lanes of |x| are skipped */
        m = _mm256_max_ps(_mm256_and_ps(x0, absmask), m);
        m = _mm256_max_ps(_mm256_and_ps(x1, absmask), m);
        m = _mm256_max_ps(_mm256_and_ps(x2, absmask), m);
        m = _mm256_max_ps(_mm256_and_ps(x3, absmask), m);
        h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        amax = _mm_cvtss_f32(h);
        db = amax / 127.0f;
        inv = db != 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
        {
            const __m256 iv = _mm256_set1_ps(inv);
            q01 = _mm256_packs_epi32(quant8(x0, iv), quant8(x1, iv)); /* int16, lanes interleaved */
            q23 = _mm256_packs_epi32(quant8(x2, iv), quant8(x3, iv));
            q01 = _mm256_packs_epi16(q01, q23);                       /* int8 [0 2 4 6 | 1 3 5 7] x 4 */
            q01 = _mm256_permutevar8x32_epi32(q01, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(xi + 32 * b), q01);
        }
    }
}

/* ------------------------------------------------------------------ product */

typedef struct {
    int S;                 /* 32-blocks per step */
    int uniform;           /* 1: every step lies inside one group; 2: every full step holds exactly
                              two groups (lanes 0-3 in the first, 4-7 in the second); 0: other */
    int half;              /* 2/3-bit, group % 64 == 0, and the rows end half-way into their last
                              step (cols % 128 == 64, e.g. 576): the last step is done for two
                              rows at once, one per 128-bit lane (see tile) */
    int64_t nsteps, full;  /* steps per row; steps fully inside the row (nsteps - full <= 1) */
    int64_t xstride;       /* bytes of prepared activations per step */
    int64_t pfrow;         /* decode prefetch: bytes of one row per full step, rounded up */
    int8_t *xs;            /* [n][nsteps][xstride] */
    float *dv;             /* [n][nsteps][8] d_b of each int32 lane's block */
    int32_t *g0;           /* [nsteps] group of the step's first block */
    int32_t *lidx;         /* [nsteps][8] group of each lane, relative to g0 */
    int32_t *lmask;        /* [nsteps][8] -1 where g0 + lane < ng (for maskload) */
    void *mem;
} x86_prep;

static int lane_block(int bits, int lane)
{
    return bits == 4 ? lane / 4 : bits == 8 ? 0 : lane / 2;
}

static size_t align32(size_t v) { return (v + 31) & ~(size_t)31; }

/* dst[32t + k] = src[4k + t], t = 0..3, k = 0..31 (the 2/3-bit step layout) */
static inline void permute23(const int8_t *src, int8_t *dst)
{
    /* per 128-bit lane: bytes t, t+4, t+8, t+12 to dword t; then per 256-bit register the two
       lanes' dwords t side by side (qword t = 8 consecutive k for one t); then a 4x4 qword transpose */
    const __m256i byt = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                         0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i dw = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i a[4], t0, t1, t2, t3;
    for (int i = 0; i < 4; i++)
        a[i] = _mm256_permutevar8x32_epi32(
            _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(src + 32 * i)), byt), dw);
    t0 = _mm256_unpacklo_epi64(a[0], a[1]); /* [q0 of a0, q0 of a1 | q2 of a0, q2 of a1] */
    t1 = _mm256_unpackhi_epi64(a[0], a[1]); /* [q1 .. | q3 ..] */
    t2 = _mm256_unpacklo_epi64(a[2], a[3]);
    t3 = _mm256_unpackhi_epi64(a[2], a[3]);
    _mm256_store_si256((__m256i *)dst, _mm256_permute2x128_si256(t0, t2, 0x20));
    _mm256_store_si256((__m256i *)(dst + 32), _mm256_permute2x128_si256(t1, t3, 0x20));
    _mm256_store_si256((__m256i *)(dst + 64), _mm256_permute2x128_si256(t0, t2, 0x31));
    _mm256_store_si256((__m256i *)(dst + 96), _mm256_permute2x128_si256(t1, t3, 0x31));
}

int tzq_x86_qmm_prepare(tzq_qmm *m)
{
    x86_prep *p;
    size_t off_xs, off_dv, off_g0, off_li, off_lm, total;
    char *base;
    const int bits = m->bits;
    const int64_t n = m->n, cols = m->cols, nb = m->nb, ng = m->ng;

    p = (x86_prep *)calloc(1, sizeof(x86_prep));
    if (!p) return TZQ_ENOMEM;
    p->S = bits == 4 ? 2 : bits == 8 ? 1 : 4;
    p->nsteps = (nb + p->S - 1) / p->S;
    p->full = nb / p->S;
    p->uniform = m->group % (32 * p->S) == 0 ? 1 : 2 * m->group == 32 * p->S ? 2 : 0;
    p->half = (bits == 2 || bits == 3) && m->group % 64 == 0 && nb % 4 == 2;
    p->xstride = bits == 8 ? (TZQ_VNNI ? 32 : 64) : 32 * p->S;
    p->pfrow = p->full > 0 ? (cols * bits / 8 + p->full - 1) / p->full : 0;

    off_xs = 0;
    off_dv = align32(off_xs + (size_t)(n * p->nsteps * p->xstride));
    off_g0 = align32(off_dv + sizeof(float) * (size_t)(n * p->nsteps * 8));
    off_li = align32(off_g0 + sizeof(int32_t) * (size_t)p->nsteps);
    off_lm = align32(off_li + sizeof(int32_t) * (size_t)(p->nsteps * 8));
    total = align32(off_lm + sizeof(int32_t) * (size_t)(p->nsteps * 8));
    p->mem = malloc(total + 32);
    if (!p->mem) {
        free(p);
        return TZQ_ENOMEM;
    }
    base = (char *)(((uintptr_t)p->mem + 31) & ~(uintptr_t)31);
    p->xs = (int8_t *)(base + off_xs);
    p->dv = (float *)(base + off_dv);
    p->g0 = (int32_t *)(base + off_g0);
    p->lidx = (int32_t *)(base + off_li);
    p->lmask = (int32_t *)(base + off_lm);

    for (int64_t s = 0; s < p->nsteps; s++) {
        const int64_t g0 = (s * p->S * 32) / m->group;
        p->g0[s] = (int32_t)g0;
        for (int l = 0; l < 8; l++) {
            const int64_t b = s * p->S + lane_block(bits, l);
            p->lidx[s * 8 + l] = b < nb ? (int32_t)((b * 32) / m->group - g0) : 0;
            p->lmask[s * 8 + l] = g0 + l < ng ? -1 : 0;
        }
    }
    for (int64_t i = 0; i < n; i++) {
        const int8_t *src = m->xi + i * cols;
        for (int64_t s = 0; s < p->nsteps; s++) {
            int8_t *dst = p->xs + (i * p->nsteps + s) * p->xstride;
            float *dv = p->dv + (i * p->nsteps + s) * 8;
            const int64_t e0 = s * p->S * 32;
            if (bits == 4) {
                for (int k = 0; k < 32; k++) {
                    const int64_t e = e0 + 2 * k;
                    dst[k] = e < cols ? src[e] : 0;
                    dst[32 + k] = e + 1 < cols ? src[e + 1] : 0;
                }
            } else if (bits == 8) {
                for (int k = 0; k < 32; k++) {
                    if (TZQ_VNNI) dst[k] = src[e0 + k];
                    else {
                        const int16_t v = src[e0 + k];
                        memcpy(dst + 2 * k, &v, 2);
                    }
                }
            } else if (s < p->full) { /* x_t[k] = src[e0 + 4k + t]: a 4-way byte deinterleave */
                permute23(src + e0, dst);
            } else {
                const int dup = p->half && s == p->full; /* upper lane = lower lane */
                for (int t = 0; t < 4; t++)
                    for (int k = 0; k < 32; k++) {
                        const int64_t e = e0 + 4 * (dup ? k & 15 : k) + t;
                        dst[32 * t + k] = e < cols ? src[e] : 0;
                    }
            }
            for (int l = 0; l < 8; l++) {
                const int64_t b = s * p->S + lane_block(bits, p->half && s == p->full ? l & 3 : l);
                dv[l] = b < nb ? m->d[i * nb + b] : 0.0f;
            }
        }
    }
    m->kern = p;
    return TZQ_OK;
}

void tzq_x86_qmm_release(tzq_qmm *m)
{
    x86_prep *p = (x86_prep *)m->kern;
    if (p) {
        free(p->mem);
        free(p);
    }
    m->kern = NULL;
}

/* sum of the 8 lanes, associated exactly like one lane of hsum4x8 (results must not depend on
   which tile shape computed a row: tiles follow thread chunk boundaries) */
TZQ_INLINE float hsum8(__m256 v)
{
    __m256 t = _mm256_hadd_ps(v, v);
    t = _mm256_hadd_ps(t, t);
    return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

/* [sum(a), sum(b), sum(c), sum(d)] */
TZQ_INLINE __m128 hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d)
{
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* a vector whose lanes add up to sum_g s_g * z_g * sx_g (the zero-point term of one row) */
TZQ_INLINE __m256 zero_vec(const float *s, const float *z, const float *sx, int64_t ng)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8)
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + g), _mm256_loadu_ps(z + g)),
                              _mm256_loadu_ps(sx + g), acc);
    if (g < ng) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(ng - g)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_maskload_ps(s + g, mask), _mm256_maskload_ps(z + g, mask)),
                              _mm256_maskload_ps(sx + g, mask), acc);
    }
    return acc;
}

/* int32 block sums of one step for one activation row; q[] are the unpacked weight vectors */
TZQ_INLINE __m256i step_isum(const int bits, const __m256i *q, const int8_t *x)
{
#if TZQ_VNNI
    __m256i acc = _mm256_setzero_si256();
    if (bits == 8) return DPBUSD(acc, q[0], _mm256_loadu_si256((const __m256i *)x));
    acc = DPBUSD(acc, q[0], _mm256_loadu_si256((const __m256i *)x));
    acc = DPBUSD(acc, q[1], _mm256_loadu_si256((const __m256i *)(x + 32)));
    if (bits == 4) return acc;
    acc = DPBUSD(acc, q[2], _mm256_loadu_si256((const __m256i *)(x + 64)));
    acc = DPBUSD(acc, q[3], _mm256_loadu_si256((const __m256i *)(x + 96)));
    return acc;
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p;
    if (bits == 8)
        return _mm256_add_epi32(_mm256_madd_epi16(q[0], _mm256_loadu_si256((const __m256i *)x)),
                                _mm256_madd_epi16(q[1], _mm256_loadu_si256((const __m256i *)(x + 32))));
    /* int16 partial sums stay below 2 * (2 * 15 * 127) = 7620 (4-bit), 4 * 2 * 7 * 127 = 7112 (3-bit) */
    p = _mm256_maddubs_epi16(q[0], _mm256_loadu_si256((const __m256i *)x));
    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(q[1], _mm256_loadu_si256((const __m256i *)(x + 32))));
    if (bits != 4) {
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(q[2], _mm256_loadu_si256((const __m256i *)(x + 64))));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(q[3], _mm256_loadu_si256((const __m256i *)(x + 96))));
    }
    return _mm256_madd_epi16(p, ones);
#endif
}

/* 2/3-bit unpack of a step from its 32 code bytes v and (3-bit) its 16 bit-2 bytes h */
TZQ_INLINE void step_weights23(const int bits, __m256i v, __m128i h, __m256i *q)
{
    const __m256i m2 = _mm256_set1_epi8(3);
    q[0] = _mm256_and_si256(v, m2);
    q[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m2);
    q[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m2);
    q[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m2);
    if (bits == 3) {
        /* byte k of the step holds element 4k+t in vector t; its bit 2 is bit 4*(k&1)+t of
           high-plane byte k>>1. Spread the 16 high bytes to one nibble per byte (even k: low
           nibble, odd k: high nibble): zero-extend to 16 bits (word j = byte j), w | w << 4 puts
           the high nibble in the word's high byte, the mask clears the low byte's copy. Then look
           up ((nibble >> t) & 1) << 2. */
        const __m256i w = _mm256_cvtepu8_epi16(h);
        const __m256i nib = _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi16(w, 4)), _mm256_set1_epi8(15));
#define LUT(t) _mm256_setr_epi8( \
    ((0 >> t) & 1) << 2, ((1 >> t) & 1) << 2, ((2 >> t) & 1) << 2, ((3 >> t) & 1) << 2, \
    ((4 >> t) & 1) << 2, ((5 >> t) & 1) << 2, ((6 >> t) & 1) << 2, ((7 >> t) & 1) << 2, \
    ((8 >> t) & 1) << 2, ((9 >> t) & 1) << 2, ((10 >> t) & 1) << 2, ((11 >> t) & 1) << 2, \
    ((12 >> t) & 1) << 2, ((13 >> t) & 1) << 2, ((14 >> t) & 1) << 2, ((15 >> t) & 1) << 2, \
    ((0 >> t) & 1) << 2, ((1 >> t) & 1) << 2, ((2 >> t) & 1) << 2, ((3 >> t) & 1) << 2, \
    ((4 >> t) & 1) << 2, ((5 >> t) & 1) << 2, ((6 >> t) & 1) << 2, ((7 >> t) & 1) << 2, \
    ((8 >> t) & 1) << 2, ((9 >> t) & 1) << 2, ((10 >> t) & 1) << 2, ((11 >> t) & 1) << 2, \
    ((12 >> t) & 1) << 2, ((13 >> t) & 1) << 2, ((14 >> t) & 1) << 2, ((15 >> t) & 1) << 2)
        q[0] = _mm256_or_si256(q[0], _mm256_shuffle_epi8(LUT(0), nib));
        q[1] = _mm256_or_si256(q[1], _mm256_shuffle_epi8(LUT(1), nib));
        q[2] = _mm256_or_si256(q[2], _mm256_shuffle_epi8(LUT(2), nib));
        q[3] = _mm256_or_si256(q[3], _mm256_shuffle_epi8(LUT(3), nib));
#undef LUT
    }
}

/* unpack the weights of one step: lo = 32 code bytes (bit-2 plane: 16 bytes at hi for 3-bit) */
TZQ_INLINE void step_weights(const int bits, const uint8_t *lo, const uint8_t *hi, __m256i *q)
{
    if (bits == 8) {
#if TZQ_VNNI
        q[0] = _mm256_loadu_si256((const __m256i *)lo);
#else
        q[0] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)lo));
        q[1] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(lo + 16)));
#endif
    } else if (bits == 4) {
        const __m256i m4 = _mm256_set1_epi8(15);
        const __m256i v = _mm256_loadu_si256((const __m256i *)lo);
        q[0] = _mm256_and_si256(v, m4);
        q[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    } else {
        step_weights23(bits, _mm256_loadu_si256((const __m256i *)lo),
                       bits == 3 ? _mm_loadu_si128((const __m128i *)hi) : _mm_setzero_si128(), q);
    }
}

#if defined(__clang__)
#define UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define UNROLL _Pragma("GCC unroll 4")
#else
#define UNROLL
#endif

#define RT_MAX 4 /* weight rows per tile */
#define NT_MAX 4 /* activation rows per tile; tiles are (RT, NT) = (4,1), (2,2), (1,4), (1,2), (1,1) */
/* Decode tiles (NT = 1) prefetch 2 cache lines per step, PF_AHEAD bytes past the start of the next
   tile's weight rows (rows are contiguous, so the prefetches run one tile's bytes ahead of the reads,
   RT*rb/nsteps = 128 bytes per step for 4- and 8-bit). The hardware prefetchers alone do not keep up
   with RT interleaved row streams: measured on a 2-core EPYC (AVX2, busy machine), one thread, weights
   not in cache, the 8-bit 49152x576 lm_head took 4.7-5.0 ms without and 1.9-2.0 ms with this
   (0 / 2 / 4 / 8 KiB ahead: 2.5 / 2.3 / 2.5 / 2.7 ms in another run; 4-bit 3072x576 ~1.25x faster).
   Prefetching the scales/zeros as well did not help. */
#define PF_AHEAD 2048
#define TAIL 48  /* zero-padded copy of a row's last, partial step: 32 code bytes + 16 bit-2 bytes */

/* one step s of a tile: weights of row r at lo[r] (+ bit-2 plane at hi[r] for 3-bit) */
TZQ_INLINE void tile_step(const x86_prep *p, const int bits, const int RT, const int NT, const int uni,
                          int64_t s, const uint8_t *const *lo, const uint8_t *const *hi,
                          const float *const *srow, const int8_t *const *xs, const float *const *dv,
                          __m256 (*acc)[NT_MAX])
{
    __m256i q[4];
    UNROLL
    for (int r = 0; r < RT; r++) {
        __m256 sv;
        step_weights(bits, lo[r], hi[r], q);
        if (uni == 1) sv = _mm256_broadcast_ss(srow[r] + p->g0[s]);
        else if (uni == 2) /* [a b a b ..] -> [a a a a b b b b] */
            sv = _mm256_permutevar_ps(_mm256_castpd_ps(_mm256_broadcast_sd((const double *)(srow[r] + p->g0[s]))),
                                      _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
        else sv = _mm256_permutevar8x32_ps(
            _mm256_maskload_ps(srow[r] + p->g0[s], _mm256_load_si256((const __m256i *)(p->lmask + 8 * s))),
            _mm256_load_si256((const __m256i *)(p->lidx + 8 * s)));
        UNROLL
        for (int t = 0; t < NT; t++) {
            const __m256i isum = step_isum(bits, q, xs[t] + s * p->xstride);
            const __m256 mult = _mm256_mul_ps(_mm256_load_ps(dv[t] + 8 * s), sv);
            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), mult, acc[r][t]);
        }
    }
}

/* The last, half step of rows r (and r + 1 if two): the 16 code bytes (+ 8 bit-2 bytes) of row r in
   the low 128-bit lane, of row r + 1 in the high lane (row r again if one); the prepared activations
   and d_b of this step hold the same values in both lanes. Lanes 0-3 of a row's accumulator get the
   step's 4 lane products, lanes 4-7 are left alone: a row gets bit-identical sums in either lane. */
TZQ_INLINE void half_step(const x86_prep *p, const int bits, const int NT, const int two,
                          const uint8_t *lo0, const uint8_t *hi0, const uint8_t *lo1, const uint8_t *hi1,
                          const float *s0, const float *s1, const int8_t *const *xs, const float *const *dv,
                          __m256 (*acc)[NT_MAX])
{
    const int64_t s = p->full;
    const int g0 = p->g0[s];
    __m256i q[4];
    __m128i h = _mm_setzero_si128();
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo0)),
                                              _mm_loadu_si128((const __m128i *)lo1), 1);
    const __m256 sv = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(s0 + g0)),
                                           _mm_broadcast_ss(s1 + g0), 1);
    if (bits == 3) h = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)hi0), _mm_loadl_epi64((const __m128i *)hi1));
    step_weights23(bits, v, h, q);
    UNROLL
    for (int t = 0; t < NT; t++) {
        const __m256 prod = _mm256_cvtepi32_ps(step_isum(bits, q, xs[t] + s * p->xstride));
        const __m256 mult = _mm256_mul_ps(_mm256_load_ps(dv[t] + 8 * s), sv);
        acc[0][t] = _mm256_blend_ps(acc[0][t], _mm256_fmadd_ps(prod, mult, acc[0][t]), 0x0f);
        if (two)
            acc[1][t] = _mm256_blend_ps(acc[1][t], _mm256_fmadd_ps(_mm256_permute2f128_ps(prod, prod, 1),
                                                                   _mm256_permute2f128_ps(mult, mult, 1), acc[1][t]), 0x0f);
    }
}

/* y[n0 .. n0+NT, o .. o+RT]: one pass over RT weight rows for NT activation rows; independent
   accumulators per (row, activation) keep several FMA chains in flight. uni: p->uniform. */
TZQ_INLINE void tile(const tzq_qmm *m, const x86_prep *p, const int bits, const int RT, const int NT,
                     const int uni, int64_t o, int64_t n0, uint8_t (*tails)[TAIL])
{
    const int64_t cols = m->cols, rb = cols * bits / 8, ng = m->ng;
    const int64_t nsteps = p->nsteps, full = p->full, xstride = p->xstride;
    const uint8_t *lo[RT_MAX], *hi[RT_MAX];
    const float *srow[RT_MAX];
    const int8_t *xs[NT_MAX];
    const float *dv[NT_MAX];
    __m256 acc[RT_MAX][NT_MAX];
    UNROLL
    for (int r = 0; r < RT; r++) {
        lo[r] = m->codes + (o + r) * rb;
        hi[r] = lo[r] + cols / 4;
        srow[r] = m->scales + (o + r) * ng;
        UNROLL
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    }
    UNROLL
    for (int t = 0; t < NT; t++) {
        xs[t] = p->xs + (n0 + t) * nsteps * xstride;
        dv[t] = p->dv + (n0 + t) * nsteps * 8;
    }
    /* decode prefetch: the next tile's RT * rb bytes spread over this tile's full steps */
    const int64_t pfstep = RT * p->pfrow;
    for (int64_t s = 0; s < full; s++) {
        if (NT == 1) { /* decode: software prefetch, see PF_AHEAD */
            const char *pf = (const char *)((uintptr_t)m->codes + (uintptr_t)((o + RT) * rb + PF_AHEAD + s * pfstep));
            _mm_prefetch(pf, _MM_HINT_T0);
            _mm_prefetch(pf + 64, _MM_HINT_T0);
            if ((bits == 2 || bits == 3) && pfstep > 128) _mm_prefetch(pf + 128, _MM_HINT_T0);
            if (bits == 3 && pfstep > 192) _mm_prefetch(pf + 192, _MM_HINT_T0);
        }
        tile_step(p, bits, RT, NT, uni, s, lo, hi, srow, xs, dv, acc);
        UNROLL
        for (int r = 0; r < RT; r++) {
            lo[r] += 32;
            hi[r] += 16;
        }
    }
    if ((bits == 2 || bits == 3) && p->half) { /* the last, half step: two rows at once */
        UNROLL
        for (int r = 0; r < RT; r += 2) {
            const int r1 = r + 1 < RT ? r + 1 : r;
            half_step(p, bits, NT, r + 1 < RT, lo[r], hi[r], lo[r1], hi[r1], srow[r], srow[r1], xs, dv, acc + r);
        }
    } else if (full < nsteps) { /* the last step, from the zero-padded copies */
        UNROLL
        for (int r = 0; r < RT; r++) {
            lo[r] = tails[r];
            hi[r] = tails[r] + 32;
        }
        tile_step(p, bits, RT, NT, uni == 2 ? 0 : uni, full, lo, hi, srow, xs, dv, acc);
    }
    UNROLL
    for (int t = 0; t < NT; t++) {
        const float *sx = m->sx + (n0 + t) * ng;
        float *y = m->y + (n0 + t) * m->rows + o;
        UNROLL
        for (int r = 0; r < RT; r++)
            acc[r][t] = _mm256_sub_ps(acc[r][t], zero_vec(srow[r], m->zeros + (o + r) * ng, sx, ng));
        if (RT == 4) _mm_storeu_ps(y, hsum4x8(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
        else
            UNROLL
            for (int r = 0; r < RT; r++) y[r] = hsum8(acc[r][t]);
    }
}

TZQ_INLINE void rows_bits(tzq_qmm *m, const int bits, const int uni, int64_t r0, int64_t r1)
{
    const x86_prep *p = (const x86_prep *)m->kern;
    const int64_t cols = m->cols, rb = cols * bits / 8, full = p->full;
    uint8_t tails[RT_MAX][TAIL];
    memset(tails, 0, sizeof(tails));
    for (int64_t o = r0; o < r1; o += RT_MAX) {
        const int nr = r1 - o < RT_MAX ? (int)(r1 - o) : RT_MAX;
        if (full < p->nsteps && !p->half) /* the rows end inside the last step: zero-padded copies */
            for (int r = 0; r < nr; r++) {
                const uint8_t *row = m->codes + (o + r) * rb;
                if (bits == 3) {
                    memcpy(tails[r], row + 32 * full, (size_t)(cols / 4 - 32 * full));
                    memcpy(tails[r] + 32, row + cols / 4 + 16 * full, (size_t)(cols / 8 - 16 * full));
                } else {
                    memcpy(tails[r], row + 32 * full, (size_t)(rb - 32 * full));
                }
            }
        for (int64_t n0 = 0; n0 < m->n;) {
            const int64_t left = m->n - n0;
            if (left >= 4) {
                for (int r = 0; r < nr; r++) tile(m, p, bits, 1, 4, uni, o + r, n0, tails + r);
                n0 += 4;
            } else if (left >= 2) {
                if (nr == 4) {
                    tile(m, p, bits, 2, 2, uni, o, n0, tails);
                    tile(m, p, bits, 2, 2, uni, o + 2, n0, tails + 2);
                } else
                    for (int r = 0; r < nr; r++) tile(m, p, bits, 1, 2, uni, o + r, n0, tails + r);
                n0 += 2;
            } else {
                if (nr == 4) tile(m, p, bits, 4, 1, uni, o, n0, tails);
                else
                    for (int r = 0; r < nr; r++) tile(m, p, bits, 1, 1, uni, o + r, n0, tails + r);
                n0 += 1;
            }
        }
    }
}

#define ROWS(b)                                                                         \
    static void rows##b(tzq_qmm *m, int64_t r0, int64_t r1)                             \
    {                                                                                   \
        const int u = ((const x86_prep *)m->kern)->uniform;                            \
        if (u == 1) rows_bits(m, b, 1, r0, r1);                                         \
        else if (u == 2) rows_bits(m, b, 2, r0, r1);                                    \
        else rows_bits(m, b, 0, r0, r1);                                                \
    }
ROWS(4)
ROWS(3)
ROWS(2)
ROWS(8)

void tzq_x86_qmm_rows(tzq_qmm *m, int64_t r0, int64_t r1)
{
    switch (m->bits) {
    case 4: rows4(m, r0, r1); break;
    case 3: rows3(m, r0, r1); break;
    case 2: rows2(m, r0, r1); break;
    default: rows8(m, r0, r1); break;
    }
}

#else
typedef int tzq_qgemm_x86_empty_unit; /* ISO C forbids an empty translation unit */
#endif

/*
 * qgemm_arm.c -- aarch64 NEON and dotprod variants of the row kernels.
 *
 * Compiled with real code only into tinyzq._tzq_neon (TZQ_ISA_NEON: -march=armv8-a) and
 * tinyzq._tzq_dotprod (TZQ_ISA_DOTPROD: -march=armv8.2-a+dotprod); in every other module this
 * file is empty. The NEON variant must run on Cortex-A72 / A53 (Raspberry Pi 3/4), which have
 * no SDOT: it multiplies with vmull_s8/vmlal_s8 into int16 and widens with vpaddl/vpadal. The
 * dotprod variant replaces exactly that by vdotq_s32. Both variants produce the exact integer
 * block sums of docs/FORMAT.md; only the float additions are reordered, as on x86.
 *
 * Dequantization: 32 codes at a time are unpacked to bytes in natural order (4-bit: and/shift
 * + zip, 2/3-bit: shifts + st4 interleave, bit-2 plane: table lookup + vtst), widened to fp32,
 * then (q - z) * s -- a subtraction and a multiplication, which no compiler can contract into
 * an FMA, so the result is bit-identical to the scalar reference.
 *
 * Product: a "step" is 4 blocks (128 inputs). The activations (shared by all weight rows) are
 * permuted once per call so that the codes need only shifts and masks:
 *   8-bit: natural order; codes are made signed as q ^ 0x80 = q - 128 and the exact
 *          correction 128 * sum(xi_b) is added to each block sum (no unsigned x signed
 *          multiply without i8mm; |(q-128) * xi| <= 16256 keeps two products per int16 lane);
 *   4-bit: per block [xi even (16)] [xi odd (16)] to match low / high nibbles;
 *   2/3-bit: per pair of blocks x_t[k] = xi[4k + t], t = 0..3 (lanes 0-7: first block,
 *          8-15: second), to match the four 2-bit fields of a byte; bit 2 of 3-bit codes is
 *          spread from the plane with a table lookup and vtst.
 * Each step yields an int32x4 whose lane i is the exact sum of block i (pairwise adds), which
 * is converted to fp32 and accumulated with FMA against d_b * s_g (per lane, so groups of 32
 * or 64 that split a step work); the zero points are applied once per row as
 * sum_g s_g * z_g * sx_g. The last, partial step of a row is read from a zero-padded copy
 * (padded activations are 0, their d_b is 0). Tiles of (RT weight rows) x (NT activation rows)
 * = (4,1), (2,2), (1,4), (1,2), (1,1) keep several FMA chains in flight; every (row,
 * activation) pair is computed with the same operations in the same order whatever the tile,
 * so results do not depend on how rows were split between threads.
 */
#include <stdlib.h>
#include <string.h>
#include "tzq_internal.h"

#if TZQ_KERN_ARM

#if !defined(__aarch64__)
#error "TZQ_ISA_NEON / TZQ_ISA_DOTPROD are aarch64 variants"
#endif
#if defined(TZQ_ISA_DOTPROD) && !defined(__ARM_FEATURE_DOTPROD)
#error "TZQ_ISA_DOTPROD needs -march=armv8.2-a+dotprod"
#endif

#include <arm_neon.h>

#if defined(TZQ_ISA_DOTPROD)
#define TZQ_SDOT 1
#else
#define TZQ_SDOT 0
#endif

/* ------------------------------------------------------------------ dequantize */

/* out[0..16) = ((float)q - z) * s */
TZQ_INLINE void deq16(uint8x16_t q, float32x4_t zv, float32x4_t sv, float *out)
{
    const uint16x8_t l = vmovl_u8(vget_low_u8(q)), h = vmovl_high_u8(q);
    vst1q_f32(out, vmulq_f32(vsubq_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(l))), zv), sv));
    vst1q_f32(out + 4, vmulq_f32(vsubq_f32(vcvtq_f32_u32(vmovl_high_u16(l)), zv), sv));
    vst1q_f32(out + 8, vmulq_f32(vsubq_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))), zv), sv));
    vst1q_f32(out + 12, vmulq_f32(vsubq_f32(vcvtq_f32_u32(vmovl_high_u16(h)), zv), sv));
}

/* the 32 codes of block b in natural order: n[0] = elements 0..15, n[1] = 16..31 */
TZQ_INLINE void block_codes(const uint8_t *row, int64_t cols, const int bits, int64_t b, uint8x16_t *n)
{
    if (bits == 8) {
        n[0] = vld1q_u8(row + 32 * b);
        n[1] = vld1q_u8(row + 32 * b + 16);
    } else if (bits == 4) {
        const uint8x16_t v = vld1q_u8(row + 16 * b);
        const uint8x16_t lo = vandq_u8(v, vdupq_n_u8(15)), hi = vshrq_n_u8(v, 4);
        n[0] = vzip1q_u8(lo, hi);
        n[1] = vzip2q_u8(lo, hi);
    } else {
        uint8_t tmp[32];
        uint8x8x4_t c;
        const uint8x8_t v = vld1_u8(row + 8 * b), m2 = vdup_n_u8(3);
        c.val[0] = vand_u8(v, m2);
        c.val[1] = vand_u8(vshr_n_u8(v, 2), m2);
        c.val[2] = vand_u8(vshr_n_u8(v, 4), m2);
        c.val[3] = vshr_n_u8(v, 6);
        vst4_u8(tmp, c); /* tmp[4k + t] = field t of byte k */
        n[0] = vld1q_u8(tmp);
        n[1] = vld1q_u8(tmp + 16);
        if (bits == 3) {
            /* element 8m + i has its bit 2 at bit i of plane byte m: replicate bytes 0,1 (2,3)
               over 8 lanes each, then test bit i */
            static const uint8_t idx0[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
            static const uint8_t idx1[16] = {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
            static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
            uint32_t w;
            uint8x16_t h;
            memcpy(&w, row + cols / 4 + 4 * b, 4);
            h = vreinterpretq_u8_u32(vdupq_n_u32(w));
            n[0] = vorrq_u8(n[0], vandq_u8(vtstq_u8(vqtbl1q_u8(h, vld1q_u8(idx0)), vld1q_u8(bit)), vdupq_n_u8(4)));
            n[1] = vorrq_u8(n[1], vandq_u8(vtstq_u8(vqtbl1q_u8(h, vld1q_u8(idx1)), vld1q_u8(bit)), vdupq_n_u8(4)));
        }
    }
}

TZQ_INLINE void deq_bits(const uint8_t *row, const float *s, const float *z, int64_t cols,
                         const int bits, int group, float *out)
{
    const int64_t bpg = group / 32;
    for (int64_t g = 0; g < cols / group; g++) {
        const float32x4_t sv = vdupq_n_f32(s[g]), zv = vdupq_n_f32(z[g]);
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            uint8x16_t n[2];
            block_codes(row, cols, bits, b, n);
            deq16(n[0], zv, sv, out + 32 * b);
            deq16(n[1], zv, sv, out + 32 * b + 16);
        }
    }
}

void tzq_arm_dequant_row(const uint8_t *row, const float *s, const float *z, int64_t cols,
                         int bits, int group, float *out)
{
    switch (bits) {
    case 4: deq_bits(row, s, z, cols, 4, group, out); break;
    case 3: deq_bits(row, s, z, cols, 3, group, out); break;
    case 2: deq_bits(row, s, z, cols, 2, group, out); break;
    default: deq_bits(row, s, z, cols, 8, group, out); break;
    }
}

/* ------------------------------------------------------------------ product */

#define STEP 128 /* inputs per step (4 blocks); also bytes of prepared activations per step */

typedef struct {
    int uniform;          /* group % 128 == 0: every step lies inside one group */
    int64_t nsteps, full; /* steps per row; steps fully inside the row (nsteps - full <= 1) */
    int8_t *xs;           /* [n][nsteps][128] permuted activations (0 past the row) */
    float *dv;            /* [n][nsteps][4] d_b of each lane's block (0 past the row) */
    int32_t *xsum;        /* [n][nsteps][4] sum of xi over each lane's block (8-bit only) */
    int32_t *lg;          /* [nsteps][4] group of each lane's block (clamped to ng - 1) */
    void *mem;
} arm_prep;

static size_t align16(size_t v) { return (v + 15) & ~(size_t)15; }

int tzq_arm_qmm_prepare(tzq_qmm *m)
{
    arm_prep *p;
    size_t off_dv, off_xsum, off_lg, total;
    char *base;
    const int bits = m->bits;
    const int64_t n = m->n, cols = m->cols, nb = m->nb, ng = m->ng;

    p = (arm_prep *)calloc(1, sizeof(arm_prep));
    if (!p) return TZQ_ENOMEM;
    p->nsteps = (nb + 3) / 4;
    p->full = nb / 4;
    p->uniform = m->group % STEP == 0;
    off_dv = align16((size_t)(n * p->nsteps * STEP));
    off_xsum = align16(off_dv + sizeof(float) * (size_t)(n * p->nsteps * 4));
    off_lg = align16(off_xsum + sizeof(int32_t) * (size_t)(n * p->nsteps * 4));
    total = align16(off_lg + sizeof(int32_t) * (size_t)(p->nsteps * 4));
    p->mem = malloc(total + 16);
    if (!p->mem) {
        free(p);
        return TZQ_ENOMEM;
    }
    base = (char *)(((uintptr_t)p->mem + 15) & ~(uintptr_t)15);
    p->xs = (int8_t *)base;
    p->dv = (float *)(base + off_dv);
    p->xsum = (int32_t *)(base + off_xsum);
    p->lg = (int32_t *)(base + off_lg);

    for (int64_t s = 0; s < p->nsteps; s++)
        for (int l = 0; l < 4; l++) {
            const int64_t g = ((4 * s + l) * 32) / m->group;
            p->lg[4 * s + l] = (int32_t)(g < ng ? g : ng - 1);
        }
    for (int64_t i = 0; i < n; i++) {
        const int8_t *src = m->xi + i * cols;
        for (int64_t s = 0; s < p->nsteps; s++) {
            int8_t *dst = p->xs + (i * p->nsteps + s) * STEP;
            const int64_t e0 = s * STEP;
#define X(e) ((e) < cols ? src[e] : 0)
            for (int k = 0; k < STEP; k++) {
                int64_t e;
                if (bits == 8) e = e0 + k;
                else if (bits == 4) e = e0 + 32 * (k / 32) + 2 * (k % 16) + (k / 16) % 2;
                else e = e0 + 64 * (k / 64) + 4 * (k % 16) + (k / 16) % 4; /* k = 64p + 16t + kk */
                dst[k] = X(e);
            }
#undef X
            for (int l = 0; l < 4; l++) {
                const int64_t b = 4 * s + l;
                int32_t sum = 0;
                if (b < nb)
                    for (int j = 0; j < 32; j++) sum += src[32 * b + j];
                p->dv[(i * p->nsteps + s) * 4 + l] = b < nb ? m->d[i * nb + b] : 0.0f;
                p->xsum[(i * p->nsteps + s) * 4 + l] = sum;
            }
        }
    }
    m->kern = p;
    return TZQ_OK;
}

void tzq_arm_qmm_release(tzq_qmm *m)
{
    arm_prep *p = (arm_prep *)m->kern;
    if (p) {
        free(p->mem);
        free(p);
    }
    m->kern = NULL;
}

/* the weights of one step as 8 signed byte vectors in the order of the prepared activations
   (lo: the step's code bytes; hi: its 16 bytes of the bit-2 plane for 3-bit) */
TZQ_INLINE void step_weights(const int bits, const uint8_t *lo, const uint8_t *hi, int8x16_t *w)
{
    if (bits == 8) {
        for (int i = 0; i < 8; i++)
            w[i] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(lo + 16 * i), vdupq_n_u8(0x80)));
    } else if (bits == 4) {
        for (int j = 0; j < 4; j++) {
            const uint8x16_t v = vld1q_u8(lo + 16 * j);
            w[2 * j] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
            w[2 * j + 1] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        }
    } else {
        /* byte k of a pair holds elements 4k + t; with 3 bits, element 4k + t has its bit 2 at
           bit 4*(k&1) + t of plane byte k/2 */
        static const uint8_t dup2[16] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7};
        static const uint8_t bit[4][16] = {
            {1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16},
            {2, 32, 2, 32, 2, 32, 2, 32, 2, 32, 2, 32, 2, 32, 2, 32},
            {4, 64, 4, 64, 4, 64, 4, 64, 4, 64, 4, 64, 4, 64, 4, 64},
            {8, 128, 8, 128, 8, 128, 8, 128, 8, 128, 8, 128, 8, 128, 8, 128}};
        for (int pr = 0; pr < 2; pr++) {
            const uint8x16_t v = vld1q_u8(lo + 16 * pr), m2 = vdupq_n_u8(3);
            uint8x16_t c[4];
            c[0] = vandq_u8(v, m2);
            c[1] = vandq_u8(vshrq_n_u8(v, 2), m2);
            c[2] = vandq_u8(vshrq_n_u8(v, 4), m2);
            c[3] = vshrq_n_u8(v, 6);
            if (bits == 3) {
                const uint8x16_t h = vqtbl1q_u8(vcombine_u8(vld1_u8(hi + 8 * pr), vdup_n_u8(0)), vld1q_u8(dup2));
                for (int t = 0; t < 4; t++)
                    c[t] = vorrq_u8(c[t], vandq_u8(vtstq_u8(h, vld1q_u8(bit[t])), vdupq_n_u8(4)));
            }
            for (int t = 0; t < 4; t++) w[4 * pr + t] = vreinterpretq_s8_u8(c[t]);
        }
    }
}

/* int32x4 of the exact block sums sum_j q_j * xi_j of the step's 4 blocks (8-bit: without the
   128 * sum(xi) correction) */
TZQ_INLINE int32x4_t step_isum(const int bits, const int8x16_t *w, const int8_t *xp)
{
    int8x16_t x[8];
    int32x4_t a[4];
    for (int i = 0; i < 8; i++) x[i] = vld1q_s8(xp + 16 * i);
    if (bits == 8 || bits == 4) { /* vectors 2j, 2j+1 hold block j */
        for (int j = 0; j < 4; j++) {
#if TZQ_SDOT
            a[j] = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w[2 * j], x[2 * j]), w[2 * j + 1], x[2 * j + 1]);
#else
            int16x8_t p = vmull_s8(vget_low_s8(w[2 * j]), vget_low_s8(x[2 * j]));
            p = vmlal_high_s8(p, w[2 * j], x[2 * j]);
            if (bits == 4) { /* 4 products of |15 * 127| per int16 lane: no overflow */
                p = vmlal_s8(p, vget_low_s8(w[2 * j + 1]), vget_low_s8(x[2 * j + 1]));
                p = vmlal_high_s8(p, w[2 * j + 1], x[2 * j + 1]);
                a[j] = vpaddlq_s16(p);
            } else { /* 8-bit: at most 2 products of |128 * 127| per int16 lane */
                int16x8_t p2 = vmull_s8(vget_low_s8(w[2 * j + 1]), vget_low_s8(x[2 * j + 1]));
                p2 = vmlal_high_s8(p2, w[2 * j + 1], x[2 * j + 1]);
                a[j] = vpadalq_s16(vpaddlq_s16(p), p2);
            }
#endif
        }
        return vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
    }
    /* 2/3-bit: vectors 4p..4p+3 hold blocks 2p (lanes 0-7) and 2p+1 (lanes 8-15) */
    for (int pr = 0; pr < 2; pr++) {
#if TZQ_SDOT
        int32x4_t acc = vdupq_n_s32(0); /* lanes [2p, 2p, 2p+1, 2p+1] */
        for (int t = 0; t < 4; t++) acc = vdotq_s32(acc, w[4 * pr + t], x[4 * pr + t]);
        a[pr] = acc;
#else
        /* 4 products of |7 * 127| per int16 lane: no overflow */
        int16x8_t pl = vmull_s8(vget_low_s8(w[4 * pr]), vget_low_s8(x[4 * pr]));
        int16x8_t ph = vmull_high_s8(w[4 * pr], x[4 * pr]);
        for (int t = 1; t < 4; t++) {
            pl = vmlal_s8(pl, vget_low_s8(w[4 * pr + t]), vget_low_s8(x[4 * pr + t]));
            ph = vmlal_high_s8(ph, w[4 * pr + t], x[4 * pr + t]);
        }
        a[2 * pr] = vpaddlq_s16(pl);
        a[2 * pr + 1] = vpaddlq_s16(ph);
#endif
    }
#if TZQ_SDOT
    return vpaddq_s32(a[0], a[1]);
#else
    return vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
#endif
}

/* lanes add up to sum_g s_g * z_g * sx_g (the zero-point term of one row) */
TZQ_INLINE float32x4_t zero_vec(const float *s, const float *z, const float *sx, int64_t ng)
{
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t g = 0;
    for (; g + 4 <= ng; g += 4)
        acc = vfmaq_f32(acc, vmulq_f32(vld1q_f32(s + g), vld1q_f32(z + g)), vld1q_f32(sx + g));
    if (g < ng) {
        float ts[4] = {0}, tz[4] = {0}, tx[4] = {0};
        for (int l = 0; g + l < ng; l++) {
            ts[l] = s[g + l];
            tz[l] = z[g + l];
            tx[l] = sx[g + l];
        }
        acc = vfmaq_f32(acc, vmulq_f32(vld1q_f32(ts), vld1q_f32(tz)), vld1q_f32(tx));
    }
    return acc;
}

#define RT_MAX 4
#define NT_MAX 4
#define TAIL 128 /* zero-padded copy of a row's last step: up to 128 code bytes (3-bit: 32 + 16) */

TZQ_INLINE void tile_step(const arm_prep *p, const int bits, const int RT, const int NT, int64_t s,
                          const uint8_t *const *lo, const uint8_t *const *hi,
                          const float *const *srow, const int8_t *const *xs, const float *const *dv,
                          const int32_t *const *xsum, float32x4_t (*acc)[NT_MAX])
{
    int8x16_t w[8];
    for (int r = 0; r < RT; r++) {
        float32x4_t sv;
        step_weights(bits, lo[r], hi[r], w);
        if (p->uniform) sv = vld1q_dup_f32(srow[r] + p->lg[4 * s]);
        else {
            const int32_t *li = p->lg + 4 * s;
            sv = vld1q_dup_f32(srow[r] + li[0]);
            sv = vld1q_lane_f32(srow[r] + li[1], sv, 1);
            sv = vld1q_lane_f32(srow[r] + li[2], sv, 2);
            sv = vld1q_lane_f32(srow[r] + li[3], sv, 3);
        }
        for (int t = 0; t < NT; t++) {
            int32x4_t isum = step_isum(bits, w, xs[t] + s * STEP);
            if (bits == 8) isum = vaddq_s32(isum, vshlq_n_s32(vld1q_s32(xsum[t] + 4 * s), 7));
            acc[r][t] = vfmaq_f32(acc[r][t], vcvtq_f32_s32(isum), vmulq_f32(vld1q_f32(dv[t] + 4 * s), sv));
        }
    }
}

/* y[n0 .. n0+NT, o .. o+RT] */
TZQ_INLINE void tile(const tzq_qmm *m, const arm_prep *p, const int bits, const int RT, const int NT,
                     int64_t o, int64_t n0, uint8_t (*tails)[TAIL])
{
    const int64_t cols = m->cols, rb = cols * bits / 8, ng = m->ng, nsteps = p->nsteps;
    const int64_t lo_step = bits == 3 ? 32 : 16 * bits;
    const uint8_t *lo[RT_MAX], *hi[RT_MAX];
    const float *srow[RT_MAX];
    const int8_t *xs[NT_MAX];
    const float *dv[NT_MAX];
    const int32_t *xsum[NT_MAX];
    float32x4_t acc[RT_MAX][NT_MAX];
    for (int r = 0; r < RT; r++) {
        lo[r] = m->codes + (o + r) * rb;
        hi[r] = lo[r] + cols / 4;
        srow[r] = m->scales + (o + r) * ng;
        for (int t = 0; t < NT; t++) acc[r][t] = vdupq_n_f32(0.0f);
    }
    for (int t = 0; t < NT; t++) {
        xs[t] = p->xs + (n0 + t) * nsteps * STEP;
        dv[t] = p->dv + (n0 + t) * nsteps * 4;
        xsum[t] = p->xsum + (n0 + t) * nsteps * 4;
    }
    for (int64_t s = 0; s < p->full; s++) {
        tile_step(p, bits, RT, NT, s, lo, hi, srow, xs, dv, xsum, acc);
        for (int r = 0; r < RT; r++) {
            lo[r] += lo_step;
            hi[r] += 16;
        }
    }
    if (p->full < nsteps) {
        for (int r = 0; r < RT; r++) {
            lo[r] = tails[r];
            hi[r] = tails[r] + 32;
        }
        tile_step(p, bits, RT, NT, p->full, lo, hi, srow, xs, dv, xsum, acc);
    }
    for (int t = 0; t < NT; t++) {
        const float *sx = m->sx + (n0 + t) * ng;
        float *y = m->y + (n0 + t) * m->rows + o;
        for (int r = 0; r < RT; r++)
            y[r] = vaddvq_f32(vsubq_f32(acc[r][t], zero_vec(srow[r], m->zeros + (o + r) * ng, sx, ng)));
    }
}

TZQ_INLINE void rows_bits(tzq_qmm *m, const int bits, int64_t r0, int64_t r1)
{
    const arm_prep *p = (const arm_prep *)m->kern;
    const int64_t cols = m->cols, rb = cols * bits / 8, full = p->full;
    const int64_t lo_step = bits == 3 ? 32 : 16 * bits;
    uint8_t tails[RT_MAX][TAIL];
    memset(tails, 0, sizeof(tails));
    for (int64_t o = r0; o < r1; o += RT_MAX) {
        const int nr = r1 - o < RT_MAX ? (int)(r1 - o) : RT_MAX;
        if (full < p->nsteps) /* the rows end inside the last step: zero-padded copies */
            for (int r = 0; r < nr; r++) {
                const uint8_t *row = m->codes + (o + r) * rb;
                if (bits == 3) {
                    memcpy(tails[r], row + 32 * full, (size_t)(cols / 4 - 32 * full));
                    memcpy(tails[r] + 32, row + cols / 4 + 16 * full, (size_t)(cols / 8 - 16 * full));
                } else {
                    memcpy(tails[r], row + lo_step * full, (size_t)(rb - lo_step * full));
                }
            }
        for (int64_t n0 = 0; n0 < m->n;) {
            const int64_t left = m->n - n0;
            if (left >= 4) {
                for (int r = 0; r < nr; r++) tile(m, p, bits, 1, 4, o + r, n0, tails + r);
                n0 += 4;
            } else if (left >= 2) {
                if (nr == 4) {
                    tile(m, p, bits, 2, 2, o, n0, tails);
                    tile(m, p, bits, 2, 2, o + 2, n0, tails + 2);
                } else
                    for (int r = 0; r < nr; r++) tile(m, p, bits, 1, 2, o + r, n0, tails + r);
                n0 += 2;
            } else {
                if (nr == 4) tile(m, p, bits, 4, 1, o, n0, tails);
                else
                    for (int r = 0; r < nr; r++) tile(m, p, bits, 1, 1, o + r, n0, tails + r);
                n0 += 1;
            }
        }
    }
}

static void rows4(tzq_qmm *m, int64_t r0, int64_t r1) { rows_bits(m, 4, r0, r1); }
static void rows3(tzq_qmm *m, int64_t r0, int64_t r1) { rows_bits(m, 3, r0, r1); }
static void rows2(tzq_qmm *m, int64_t r0, int64_t r1) { rows_bits(m, 2, r0, r1); }
static void rows8(tzq_qmm *m, int64_t r0, int64_t r1) { rows_bits(m, 8, r0, r1); }

void tzq_arm_qmm_rows(tzq_qmm *m, int64_t r0, int64_t r1)
{
    switch (m->bits) {
    case 4: rows4(m, r0, r1); break;
    case 3: rows3(m, r0, r1); break;
    case 2: rows2(m, r0, r1); break;
    default: rows8(m, r0, r1); break;
    }
}

#else
typedef int tzq_qgemm_arm_empty_unit; /* ISO C forbids an empty translation unit */
#endif

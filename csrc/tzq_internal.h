/*
 * tzq_internal.h -- declarations shared by the C sources (not part of the public API).
 *
 * Variant selection: build_ext.py compiles the same sources once per ISA level with exactly one
 * of these macros defined (none means the portable reference):
 *   TZQ_ISA_AVX2     x86-64, -mavx2 -mfma -mf16c            (qgemm_x86.c)
 *   TZQ_ISA_AVX512   x86-64, + -mavx512f/bw/vl/vnni          (qgemm_x86.c, VNNI dpbusd)
 *   TZQ_ISA_NEON     aarch64 armv8-a, no sdot (Cortex-A72/A53) (qgemm_arm.c, vmull/vpadal)
 *   TZQ_ISA_DOTPROD  aarch64 armv8.2-a+dotprod               (qgemm_arm.c, vdotq_s32)
 * A module only ever runs on a CPU that has its features (kernels.py checks before importing).
 *
 * Each variant provides the row kernels below; the public entry points (pack.c, qgemm_ref.c)
 * validate arguments, do the variant-independent work (activation quantization) and split rows
 * over the thread pool.
 */
#ifndef TZQ_INTERNAL_H
#define TZQ_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "tinyzq.h"

#if defined(__GNUC__) || defined(__clang__)
#define TZQ_HIDDEN __attribute__((visibility("hidden")))
#define TZQ_INLINE static inline __attribute__((always_inline))
#else
#define TZQ_HIDDEN
#define TZQ_INLINE static inline
#endif

#if defined(TZQ_ISA_AVX2) || defined(TZQ_ISA_AVX512)
#define TZQ_KERN_X86 1
#else
#define TZQ_KERN_X86 0
#endif
#if defined(TZQ_ISA_NEON) || defined(TZQ_ISA_DOTPROD)
#define TZQ_KERN_ARM 1
#else
#define TZQ_KERN_ARM 0
#endif

/* ---- common checks (pack.c) ---- */
/* TZQ_OK if bits in {2,3,4,8}, cols > 0, cols % 32 == 0; group too unless group == 0. */
TZQ_HIDDEN int tzq_check_layout(int64_t cols, int bits, int group);
/* bytes of one packed row */
TZQ_HIDDEN int64_t tzq_row_bytes(int64_t cols, int bits);
/* unpack one packed row of `cols` codes */
TZQ_HIDDEN void tzq_unpack_row(const uint8_t *row, uint8_t *q, int64_t cols, int bits);
/* unpack 32 codes of block b (elements 32b .. 32b+31) of one packed row */
TZQ_HIDDEN void tzq_unpack_block(const uint8_t *row, int64_t cols, int bits, int64_t b, uint8_t q[32]);
/* reference dequantization of one row (exact: s * ((float)q - z)) */
TZQ_HIDDEN void tzq_ref_dequant_row(const uint8_t *row, const float *s, const float *z,
                                    int64_t cols, int bits, int group, float *out);

/* ---- ops.c, attn_prefill.c: fp32 helpers (vectorise without reassociation; ops.c says why) ---- */
#include <math.h>
#include <string.h>
/* e^x in fp32 without libm, branch-free so that compilers vectorise the loops that call it:
   x = k ln2 + r (|r| <= ln2/2; k rounded with the 1.5 * 2^23 trick, ln2 split hi/lo), e^r by a
   degree-7 Taylor polynomial (relative error < 2e-9 on that range, below fp32 rounding), 2^k by
   building the exponent bits. x is clamped to [-87.3, 88.3] so 2^k stays a normal number; the
   result is 0 below -87.3 (e^(-inf) = 0, as the softmax masks need) and e^88.3 above 88.3. */
TZQ_INLINE float tzq_expf(float x)
{
    const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (xc - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667163e-1f + r * (4.1666667908e-2f +
                    r * (8.3333337680e-3f + r * (1.3888889225e-3f + r * 1.9841270114e-4f))))));
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, 4);
    return x > -87.3f ? p * two_k : 0.0f;
}

/* round half away from zero (== roundf) of a value already clamped to |v| < 2^31: the int8 and int16
   activation quantizers (qgemm_ref.c, gemm16.c) */
TZQ_INLINE int32_t tzq_round_half_away(float v)
{
    const float t = (float)(int32_t)v; /* truncation toward zero, exact */
    const float f = v - t;             /* exact: |f| < 1 */
    return (int32_t)t + (f >= 0.5f) - (f <= -0.5f);
}

/* sum and max of a row in 8 independent lanes (combined in a fixed order) */
TZQ_INLINE float tzq_sum8(const float *x, int64_t n)
{
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[j + l];
    for (; j < n; j++) acc[0] += x[j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

TZQ_INLINE float tzq_max8(const float *x, int64_t n)
{
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    for (; j < n; j++) m[0] = x[j] > m[0] ? x[j] : m[0];
    for (int l = 1; l < 8; l++) m[0] = m[l] > m[0] ? m[l] : m[0];
    return m[0];
}

/* ---- ops.c ---- */
/* sum of x[j]^2 in 8 independent fp32 lanes combined in a fixed order (vectorises without
   reassociation); the RMSNorm of ops.c and of the decode step (decode.c) both use it */
TZQ_HIDDEN float tzq_sum_squares8(const float *x, int64_t n);

/* ---- threads.c ---- */
typedef void (*tzq_range_fn)(void *ctx, int64_t i0, int64_t i1);
/* Calls fn(ctx, i0, i1) on disjoint ranges covering [0, n), on the pool (the caller takes part).
   Ranges hold at least `grain` items (except the last). Runs inline when single-threaded, when
   n <= grain, or when the pool is busy (another thread's job, or a nested call). */
TZQ_HIDDEN void tzq_parallel_for(int64_t n, int64_t grain, tzq_range_fn fn, void *ctx);

/* ---- the int8-activation product ---- */
typedef struct tzq_qmm {
    /* problem */
    int64_t n, rows, cols, nb, ng; /* nb = cols/32 blocks, ng = cols/group groups */
    int bits, group;
    const uint8_t *codes;
    const float *scales, *zeros;
    float *y;                      /* [n, rows] */
    /* activations quantized once per call (qgemm_ref.c, identical in every variant) */
    const int8_t *xi;              /* [n, cols] */
    const float *d;                /* [n, nb] block scales d_b */
    const float *sx;               /* [n, ng] sx_g = sum_{b in g} d_b * sum_{j in b} xi_j (in order) */
    /* variant-private data built by the prepare step */
    void *kern;
    int error;                     /* set by row kernels on failure (TZQ_E*) */
} tzq_qmm;

TZQ_HIDDEN void tzq_ref_qmm_rows(tzq_qmm *m, int64_t r0, int64_t r1);

#if TZQ_KERN_X86
TZQ_HIDDEN void tzq_x86_dequant_row(const uint8_t *row, const float *s, const float *z,
                                    int64_t cols, int bits, int group, float *out);
TZQ_HIDDEN int tzq_x86_qmm_prepare(tzq_qmm *m);
TZQ_HIDDEN void tzq_x86_qmm_rows(tzq_qmm *m, int64_t r0, int64_t r1);
TZQ_HIDDEN void tzq_x86_qmm_release(tzq_qmm *m);
TZQ_HIDDEN void tzq_x86_quantize_row(const float *x, int64_t cols, int8_t *xi, float *d);
#define TZQ_QUANT_ROW tzq_x86_quantize_row
#define TZQ_DEQUANT_ROW tzq_x86_dequant_row
#define TZQ_QMM_PREPARE tzq_x86_qmm_prepare
#define TZQ_QMM_ROWS tzq_x86_qmm_rows
#define TZQ_QMM_RELEASE tzq_x86_qmm_release
#elif TZQ_KERN_ARM
TZQ_HIDDEN void tzq_arm_dequant_row(const uint8_t *row, const float *s, const float *z,
                                    int64_t cols, int bits, int group, float *out);
TZQ_HIDDEN int tzq_arm_qmm_prepare(tzq_qmm *m);
TZQ_HIDDEN void tzq_arm_qmm_rows(tzq_qmm *m, int64_t r0, int64_t r1);
TZQ_HIDDEN void tzq_arm_qmm_release(tzq_qmm *m);
#define TZQ_DEQUANT_ROW tzq_arm_dequant_row
#define TZQ_QMM_PREPARE tzq_arm_qmm_prepare
#define TZQ_QMM_ROWS tzq_arm_qmm_rows
#define TZQ_QMM_RELEASE tzq_arm_qmm_release
#else
#define TZQ_DEQUANT_ROW tzq_ref_dequant_row
#define TZQ_QMM_PREPARE(m) TZQ_OK
#define TZQ_QMM_ROWS tzq_ref_qmm_rows
#define TZQ_QMM_RELEASE(m) ((void)0)
#endif

#endif /* TZQ_INTERNAL_H */

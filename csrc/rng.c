/*
 * rng.c -- counter-based random directions for zeroth-order training: z = f(seed, tensor_id, index).
 *
 * The generator is a SplitMix64 stream (Steele, Lea, Flood 2014; passes BigCrush) whose starting
 * state is a hash of (seed, tensor_id), evaluated at an arbitrary position without any state:
 *
 *   mix(x)  = x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27; x *= 0x94D049BB133111EB; x ^ (x >> 31)
 *   G       = 0x9E3779B97F4A7C15
 *   key     = mix(mix(seed + G) + (tensor_id + 1) * G)
 *   r[i]    = mix(key + (i + 1) * G)                          (all arithmetic mod 2^64)
 *
 * Rademacher: z = -1 if the top bit of r is set, else +1 (exact in every build).
 * Gaussian:   Box-Muller on two 23-bit fields of r, entirely in fp32 with our own log and cos
 *             (plain +,-,*,/ and sqrt, no libm), so every ISA build and a NumPy float32 evaluation
 *             of the same steps give the same bits, and the loop vectorises:
 *             u1 = (2 (r >> 41) + 1) / 2^24,  u2 = (2 ((r >> 18) & (2^23 - 1)) + 1) / 2^24   (exact)
 *             z  = sqrt(-2 log u1) * cos(2 pi u2)                                         (|z| <= 5.77)
 *             log u1 = e ln2 + 2 atanh(s), u1 = m 2^e, m in [sqrt(1/2), sqrt(2)), s = (m-1)/(m+1),
 *             atanh by its series to s^9; cos(2 pi u2) = +-cos(2 pi y), y = distance of u2 to the
 *             nearest of 0, 1/2, 1 (<= 1/4), cos by its Taylor series to x^12 (error < 1e-8).
 * Because z depends only on (seed, tensor_id, index), elements are independent: the work is split
 * over the thread pool and the results do not depend on the thread count or the order.
 * The arithmetic on parameters is plain fp32, one rounding per operation, no FMA (-ffp-contract=off):
 *   add:  dst[i] = src[i] + (a * z[i])
 *   mult: dst[i] = src[i] + (a * z[i]) * src[i]      (a relative step: src * (1 + a z) to first order)
 * dst may be src (in place). The NumPy expressions `src + np.float32(a) * z` and
 * `src + (np.float32(a) * z) * src` give the same bits.
 */
#include <math.h>
#include "tzq_internal.h"

#define TZQ_G 0x9E3779B97F4A7C15ULL

static inline uint64_t tzq_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint64_t rng_key(uint64_t seed, uint64_t tensor_id)
{
    return tzq_mix64(tzq_mix64(seed + TZQ_G) + (tensor_id + 1) * TZQ_G);
}

/* r[i] of the stream with key `key` (see the header) */
static inline uint64_t rng_draw(uint64_t key, int64_t i)
{
    return tzq_mix64(key + ((uint64_t)i + 1) * TZQ_G);
}

static inline float bits_float(uint32_t b) { union { uint32_t u; float f; } v; v.u = b; return v.f; }
static inline uint32_t float_bits(float f) { union { uint32_t u; float f; } v; v.f = f; return v.u; }

/* log(u) for a normal positive float u < 1 (see the header: exact steps, fp32) */
static inline float rng_log(float u)
{
    const uint32_t b = float_bits(u);
    const int big = (b & 0x7fffffu) >= 0x3504f3u;          /* 1.mantissa >= sqrt(2) */
    const float m = bits_float((b & 0x7fffffu) | (big ? 0x3f000000u : 0x3f800000u)); /* [0.707, 1.414) */
    const float e = (float)((int32_t)(b >> 23) - (big ? 126 : 127));
    const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    const float p = 1.0f + s2 * (0.33333334f + s2 * (0.2f + s2 * (0.14285715f + s2 * 0.11111111f)));
    return e * 0.6931472f + (2.0f * s) * p;
}

/* cos(2 pi u) for u in (0, 1) */
static inline float rng_cos2pi(float u)
{
    const float w = fabsf(u - 0.5f);                        /* cos(2 pi u) = -cos(2 pi w), w in [0, 1/2) */
    const int far = w > 0.25f;
    const float y = far ? 0.5f - w : w;                     /* cos(2 pi w) = -cos(2 pi y) when far */
    const float x = 6.2831855f * y, x2 = x * x;
    const float c = 1.0f + x2 * (-0.5f + x2 * (0.041666668f + x2 * (-0.0013888889f + x2 * (2.4801588e-05f
                    + x2 * (-2.7557319e-07f + x2 * 2.0876757e-09f)))));
    return far ? c : -c;
}

static inline float rng_rademacher(uint64_t key, int64_t i)
{
    return (rng_draw(key, i) >> 63) ? -1.0f : 1.0f;
}

static inline float rng_gaussian(uint64_t key, int64_t i)
{
    const uint64_t r = rng_draw(key, i);
    const float u1 = (float)(2u * (uint32_t)(r >> 41) + 1u) * 5.9604645e-08f;           /* 2^-24 */
    const float u2 = (float)(2u * ((uint32_t)(r >> 18) & 0x7fffffu) + 1u) * 5.9604645e-08f;
    return sqrtf(-2.0f * rng_log(u1)) * rng_cos2pi(u2);
}

typedef struct {
    const float *src;
    float *dst;
    uint64_t key;
    int dist, mult;
    float a;
} rng_job;

/* one loop per (distribution, operation) with everything in locals, so that each vectorises */
static void fill_range(void *ctx, int64_t i0, int64_t i1)
{
    const rng_job *j = (const rng_job *)ctx;
    float *dst = j->dst;
    const uint64_t key = j->key;
    int64_t i;
    if (j->dist == TZQ_RNG_RADEMACHER)
        for (i = i0; i < i1; i++) dst[i] = rng_rademacher(key, i);
    else
        for (i = i0; i < i1; i++) dst[i] = rng_gaussian(key, i);
}

#define AXPY_LOOPS(ZFN)                                                                  \
    if (mult)                                                                            \
        for (i = i0; i < i1; i++) { const float s = src[i]; dst[i] = s + (a * ZFN(key, i)) * s; } \
    else                                                                                 \
        for (i = i0; i < i1; i++) dst[i] = src[i] + a * ZFN(key, i);

static void axpy_range(void *ctx, int64_t i0, int64_t i1)
{
    const rng_job *j = (const rng_job *)ctx;
    const float *src = j->src;
    float *dst = j->dst;
    const uint64_t key = j->key;
    const float a = j->a;
    const int mult = j->mult;
    int64_t i;
    if (j->dist == TZQ_RNG_RADEMACHER) {
        AXPY_LOOPS(rng_rademacher)
    } else {
        AXPY_LOOPS(rng_gaussian)
    }
}

#define RNG_GRAIN 16384

uint64_t tzq_rng_bits(uint64_t seed, uint64_t tensor_id, int64_t index)
{
    return rng_draw(rng_key(seed, tensor_id), index);
}

int tzq_rng_fill(float *out, int64_t n, uint64_t seed, uint64_t tensor_id, int dist)
{
    rng_job j;
    if (n < 0 || !out || (dist != TZQ_RNG_GAUSSIAN && dist != TZQ_RNG_RADEMACHER))
        return TZQ_EINVAL;
    j.src = NULL;
    j.dst = out;
    j.key = rng_key(seed, tensor_id);
    j.dist = dist;
    j.mult = 0;
    j.a = 0.0f;
    tzq_parallel_for(n, RNG_GRAIN, fill_range, &j);
    return TZQ_OK;
}

int tzq_rng_axpy(const float *src, float *dst, int64_t n, uint64_t seed, uint64_t tensor_id, int dist,
                 float a, int mult)
{
    rng_job j;
    if (n < 0 || !src || !dst || (dist != TZQ_RNG_GAUSSIAN && dist != TZQ_RNG_RADEMACHER))
        return TZQ_EINVAL;
    j.src = src;
    j.dst = dst;
    j.key = rng_key(seed, tensor_id);
    j.dist = dist;
    j.mult = mult ? 1 : 0;
    j.a = a;
    tzq_parallel_for(n, RNG_GRAIN, axpy_range, &j);
    return TZQ_OK;
}

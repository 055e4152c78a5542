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
 * Gaussian:   Box-Muller on the two 32-bit halves of r, in double precision, rounded once to float:
 *             u1 = ((r >> 32) + 0.5) / 2^32,  u2 = ((r & 0xffffffff) + 0.5) / 2^32,
 *             z  = (float)(sqrt(-2 log u1) * cos(2 pi u2))    (|z| <= 6.8)
 *             Equal to a NumPy float64 evaluation of the same formula up to libm's last-ulp
 *             differences in log/cos, which survive the rounding to float only rarely (1 float ulp).
 *
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

static inline float rng_z(uint64_t key, int64_t i, int dist)
{
    uint64_t r = tzq_mix64(key + ((uint64_t)i + 1) * TZQ_G);
    if (dist == TZQ_RNG_RADEMACHER)
        return (r >> 63) ? -1.0f : 1.0f;
    {
        const double two32 = 4294967296.0;
        double u1 = ((double)(r >> 32) + 0.5) / two32;
        double u2 = ((double)(r & 0xffffffffULL) + 0.5) / two32;
        double rad = sqrt(-2.0 * log(u1));
        return (float)(rad * cos(6.283185307179586 * u2));
    }
}

typedef struct {
    const float *src;
    float *dst;
    uint64_t key;
    int dist, mult;
    float a;
} rng_job;

static void fill_range(void *ctx, int64_t i0, int64_t i1)
{
    const rng_job *j = (const rng_job *)ctx;
    int64_t i;
    for (i = i0; i < i1; i++)
        j->dst[i] = rng_z(j->key, i, j->dist);
}

static void axpy_range(void *ctx, int64_t i0, int64_t i1)
{
    const rng_job *j = (const rng_job *)ctx;
    const float a = j->a;
    int64_t i;
    if (j->mult) {
        for (i = i0; i < i1; i++) {
            float s = j->src[i];
            float t = a * rng_z(j->key, i, j->dist);
            j->dst[i] = s + t * s;
        }
    } else {
        for (i = i0; i < i1; i++) {
            float t = a * rng_z(j->key, i, j->dist);
            j->dst[i] = j->src[i] + t;
        }
    }
}

#define RNG_GRAIN 16384

uint64_t tzq_rng_bits(uint64_t seed, uint64_t tensor_id, int64_t index)
{
    return tzq_mix64(rng_key(seed, tensor_id) + ((uint64_t)index + 1) * TZQ_G);
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

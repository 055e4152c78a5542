/*
 * tinyzq.h -- the C API of the tinyzq kernels.
 *
 * Every extension module (tinyzq._tzq_ref, _tzq_avx2, _tzq_avx512, _tzq_neon, _tzq_dotprod) is
 * built from the same sources and exports exactly this API; only the inner loops differ.
 * The packed layout and the int8-activation product are specified in docs/FORMAT.md.
 *
 * The part between the CDEF markers is read verbatim by build_ext.py and fed to cffi's
 * ffi.cdef(): keep it to plain prototypes, an enum and stdint types (no macros, no
 * attributes, no #if).
 *
 * Conventions:
 *  - sizes and indices are int64_t; arrays are C-contiguous, row-major;
 *  - codes are uint8 [rows, cols*bits/8] in the canonical layout of docs/FORMAT.md;
 *  - scales and zeros are float32 [rows, cols/group];
 *  - cols % 32 == 0, group % 32 == 0, cols % group == 0, bits in {2, 3, 4, 8};
 *  - functions returning int return TZQ_OK (0) or a negative TZQ_E* code; they never print,
 *    never abort and never touch Python;
 *  - work is split over rows on the module's thread pool (tzq_set_threads); callers do not
 *    care how many threads there are: results do not depend on the thread count.
 */
#ifndef TINYZQ_H
#define TINYZQ_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* BEGIN CDEF */
enum {
    TZQ_OK = 0,
    TZQ_EINVAL = -1,   /* bad argument: bits, group, sizes or an id out of range */
    TZQ_ENOMEM = -2,   /* out of memory */

    /* bits of tzq_cpu_features(); a bit is set only if the CPU has the feature AND the OS
       saves the matching register state (XCR0 via xgetbv for AVX / AVX-512). */
    TZQ_CPU_SSE2 = 1,
    TZQ_CPU_SSSE3 = 2,
    TZQ_CPU_SSE41 = 4,
    TZQ_CPU_AVX = 8,
    TZQ_CPU_AVX2 = 16,
    TZQ_CPU_FMA = 32,
    TZQ_CPU_F16C = 64,
    TZQ_CPU_AVX512F = 128,
    TZQ_CPU_AVX512BW = 256,
    TZQ_CPU_AVX512VL = 512,
    TZQ_CPU_AVX512VNNI = 1024,
    TZQ_CPU_NEON = 4096,       /* aarch64 AdvSIMD (HWCAP_ASIMD) */
    TZQ_CPU_DOTPROD = 8192,    /* aarch64 SDOT/UDOT (HWCAP_ASIMDDP) */
    TZQ_CPU_I8MM = 16384       /* aarch64 SMMLA (HWCAP2_I8MM) */
};

/* ---- cpu.c: run-time feature detection and the variant compiled into this module ---- */
unsigned int tzq_cpu_features(void);       /* TZQ_CPU_* bits of the running CPU */
const char *tzq_isa_name(void);            /* "ref", "avx2", "avx512", "neon" or "dotprod" */
unsigned int tzq_isa_requires(void);       /* TZQ_CPU_* bits this module needs to run */
const char *tzq_cpu_arch(void);            /* "x86_64", "aarch64" or "other" */

/* ---- threads.c: persistent pthread pool, one per module ---- */
void tzq_set_threads(int n);               /* n >= 1; threads are started lazily */
int tzq_get_threads(void);
void tzq_set_spin_us(int us);              /* how long idle workers spin before sleeping */

/* ---- pack.c: canonical layout (scalar, exact, identical in every module) ---- */
/* q: uint8 [rows, cols] with q < 2^bits (higher bits are ignored); codes: [rows, cols*bits/8] */
int tzq_pack(const uint8_t *q, uint8_t *codes, int64_t rows, int64_t cols, int bits);
int tzq_unpack(const uint8_t *codes, uint8_t *q, int64_t rows, int64_t cols, int bits);

/* out[r - row_start, j] = scales[r, j/group] * (q[r, j] - zeros[r, j/group]) for
   row_start <= r < row_stop; out is float32 [row_stop - row_start, cols].
   Bit-exact in every module (no FMA: a subtraction then a multiplication in fp32). */
int tzq_dequantize(const uint8_t *codes, const float *scales, const float *zeros,
                   int64_t rows, int64_t cols, int bits, int group,
                   int64_t row_start, int64_t row_stop, float *out);

/* out[i, :] = dequantized row ids[i]; 0 <= ids[i] < rows else TZQ_EINVAL (out undefined). */
int tzq_gather_rows(const uint8_t *codes, const float *scales, const float *zeros,
                    int64_t rows, int64_t cols, int bits, int group,
                    const int64_t *ids, int64_t k, float *out);

/* ---- qgemm_ref.c (+ qgemm_x86.c / qgemm_arm.c): the int8-activation product ---- */
/* Q8_0-style activation quantizer of docs/FORMAT.md: x float32 [n, cols] ->
   xi int8 [n, cols], d float32 [n, cols/32]. Bit-exact in every module. */
int tzq_quantize_activations(const float *x, int64_t n, int64_t cols, int8_t *xi, float *d);

/* y float32 [n, rows] = x float32 [n, cols] . W^T with x quantized once per call
   (docs/FORMAT.md, "int8-activation product"). */
int tzq_qmatmul(const float *x, int64_t n,
                const uint8_t *codes, const float *scales, const float *zeros,
                int64_t rows, int64_t cols, int bits, int group, float *y);
/* ---- gemm16.c: the many-row product with int16 activations (prefill, evaluation, training) ---- */
/* y float32 [n, rows] = x float32 [n, cols] . W^T with x quantized to int16 per row and group
   (docs/FORMAT.md, "int16-activation product"); bit-identical in every module. TZQ_EINVAL also
   when group * 2^(bits-1) * 32767 >= 2^31 (the int32 sums could overflow). */
int tzq_gemm16(const float *x, int64_t n, const uint8_t *codes, const float *scales, const float *zeros,
               int64_t rows, int64_t cols, int bits, int group, float *y);
/* 1 if this module's tzq_gemm16 is a SIMD kernel faster than fp32 BLAS (AVX-512 VNNI), else 0 */
int tzq_gemm16_fast(void);
/* ---- membw.c: memory bandwidth probe (tinyzq bench) ---- */
/* reads all n bytes of buf once on the thread pool; returns the wrapping sum of its 64-bit words */
uint64_t tzq_stream_read(const uint8_t *buf, int64_t n);
/* ---- attn.c: one decode step (T = 1) of grouped-query attention with a KV cache ---- */
/* q [B, nh*hd] (row stride qs), k/v [B, nkv*hd] (strides ks, vs): this position's projections;
   cos/sin [hd/2] of position pos; RoPE on q and k, roped k and v stored at pos of kcache/vcache
   [B, nkv, max_len, hd]; out [B, nh*hd] = softmax(scale * q.K^T) V over positions 0..pos. */
int tzq_attn_decode(const float *q, const float *k, const float *v, int64_t B, int64_t nh, int64_t nkv,
                    int64_t hd, int64_t qs, int64_t ks, int64_t vs, const float *cos, const float *sin,
                    float *kcache, float *vcache, int64_t max_len, int64_t pos, float scale, float *out);
/* ---- attn_prefill.c: causal GQA attention of T new positions (prefill, evaluation, training) ---- */
/* q [B, nkv, g, T, hd] (scaled) at positions pos0 .. pos0+T-1; keys/values of positions 0 .. pos0+T-1
   are the rows of k/v, group (b, kh) starting at k/v + (b*nkv + kh)*kvs; out [B, nkv, g, T, hd] =
   softmax over the visible keys (t <= the query's position) of q.k_t, times V */
int tzq_attn_prefill(const float *q, const float *k, const float *v, int64_t B, int64_t nkv, int64_t g,
                     int64_t T, int64_t hd, int64_t pos0, int64_t kvs, float *out);
/* ---- decode.c: the decoder layers of one decode step (T = 1) in one call ---- */
/* a packed linear y = x . W^T (+ bias): W as in tzq_qmatmul; bias float32 [rows] or NULL */
typedef struct {
    const uint8_t *codes;
    const float *scales;
    const float *zeros;
    const float *bias;
    int64_t rows;
    int64_t cols;
    int32_t bits;
    int32_t group;
} tzq_linear;
/* one decoder layer: norms [d]; qkv rows (nh + 2 nkv) hd (q, k, v); gate_up rows 2 ffn (gate, up);
   kcache/vcache [B, nkv, max_len, hd] as in tzq_attn_decode */
typedef struct {
    const float *attn_norm;
    const float *mlp_norm;
    tzq_linear qkv;
    tzq_linear o;
    tzq_linear gate_up;
    tzq_linear down;
    float *kcache;
    float *vcache;
} tzq_layer;
/* x float32 [B, d], the residual stream, in place: every layer's pre-norm attention (RoPE with
   cos/sin [hd/2] of position pos, KV stored at pos) and pre-norm SiLU MLP, as tinyzq/model.py
   (the operations are listed in csrc/decode.c) */
int tzq_decode_layers(float *x, int64_t B, int64_t d, const tzq_layer *layers, int64_t nlayers,
                      int64_t nh, int64_t nkv, int64_t hd, int64_t ffn, int64_t max_len, int64_t pos,
                      const float *cos, const float *sin, float eps, float attn_scale);
/* ---- rng.c: counter-based random directions z = f(seed, tensor_id, index) for ZO training ---- */
enum { TZQ_RNG_GAUSSIAN = 0, TZQ_RNG_RADEMACHER = 1 };
/* the raw 64-bit draw r[index] of stream (seed, tensor_id) (the generator is specified in rng.c) */
uint64_t tzq_rng_bits(uint64_t seed, uint64_t tensor_id, int64_t index);
/* out[i] = z_i, i < n (float32) */
int tzq_rng_fill(float *out, int64_t n, uint64_t seed, uint64_t tensor_id, int dist);
/* dst[i] = src[i] + (a*z_i)            (mult == 0)
   dst[i] = src[i] + (a*z_i)*src[i]     (mult != 0);  dst may equal src (in place) */
int tzq_rng_axpy(const float *src, float *dst, int64_t n, uint64_t seed, uint64_t tensor_id, int dist,
                 float a, int mult);
/* ---- ops.c: element-wise parts of a many-token forward, on the thread pool ---- */
/* Rows are n vectors; xs/os/gs/us are row strides in floats (>= the row width).
   out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w   (x [n, d]; out may be x) */
int tzq_rms_norm(const float *x, int64_t n, int64_t d, int64_t xs, const float *w, float eps, float *out,
                 int64_t os);
/* out[i, j] = silu(g[i, j]) * u[i, j]   (f columns; out may be g or u) */
int tzq_silu_mul(const float *g, int64_t gs, const float *u, int64_t us, int64_t n, int64_t f, float *out,
                 int64_t os);
/* rotate-half RoPE in place on the first `heads` heads (hd each) of every row; row i is at
   position i % T and uses cos/sin [T, hd/2] row i % T */
int tzq_rope(float *x, int64_t n, int64_t T, int64_t xs, int64_t heads, int64_t hd, const float *cos,
             const float *sin);
/* online log-sum-exp over a [n, w] tile of logits z: m = max(run_max, max z);
   run_sum = run_sum * exp(run_max - m) + sum exp(z - m); run_max = m  (fp64 state) */
int tzq_lse_update(const float *z, int64_t n, int64_t w, double *run_max, double *run_sum);
/* END CDEF */

#ifdef __cplusplus
}
#endif

#endif /* TINYZQ_H */

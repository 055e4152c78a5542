/*
 * harness.c -- runs the tinyzq C API against golden cases from the NumPy reference, with no
 * Python on the target: cross-compiled for aarch64 with the csrc/ sources linked in directly
 * (one build per variant: ref, -DTZQ_ISA_NEON, -DTZQ_ISA_DOTPROD) and run under qemu-aarch64
 * by tests/test_arm_qemu.py. The case file format is documented in tests/arm/gen_cases.py.
 *
 *   harness CASES.bin [--force]
 *
 * Prints the CPU features and the variant, then checks, with 1 and with 3 threads:
 *   pack, unpack, dequantize (all rows and a row range), gather_rows, quantize_activations:
 *     bit for bit against the golden values;
 *   qmatmul: bit for bit for the reference variant, within the per-output tolerance of the
 *     file for SIMD variants; and bit for bit identical between 1 and 3 threads;
 *   a few invalid arguments: TZQ_EINVAL;
 *   rng_fill and rng_axpy (add and relative, out of place and in place): bit for bit;
 *   attn_prefill (causal grouped-query attention over a KV cache): every output within the
 *     file's tolerance of the float64 reference, every output written, bit for bit identical
 *     between 1 and 3 threads, and kvs too small / hd = 0: TZQ_EINVAL with out untouched.
 * The last line is "PASS ..." or "FAIL ..." with counts, y_hash, a hash of every product
 * result (the NEON and dotprod variants compute the same exact integer sums with the same float
 * operations, so their hashes must be equal), and attn_hash, a hash of every attention output
 * (every variant, the reference included, computes each dot product in the same order, so this
 * one must be equal for ref, neon and dotprod).
 * Exit status: 0 all checks passed, 1 a check failed, 2 bad usage or file, 3 the CPU lacks a
 * feature this variant needs (refused, like tinyzq/kernels.py; --force runs it anyway).
 */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "tinyzq.h"

#define MAGIC_W 0x575A5A54
#define MAGIC_END 0x444E4554
#define MAGIC_R 0x52475A54
#define MAGIC_A 0x4E545441
#define RNG_A (-3.7e-3f)
#define MAX_REPORTS 25

static const uint8_t *g_buf;
static size_t g_len, g_pos;
static long g_checks, g_failures, g_products, g_exact_products;
static double g_max_excess; /* max |y - y_ref| / tol over SIMD products (<= 1 passes) */
static uint64_t g_hash = 1469598103934665603ull; /* FNV-1a of every qmatmul output, in order */
static uint64_t g_attn_hash = 1469598103934665603ull; /* FNV-1a of every attn_prefill output */
static long g_attn_runs;
static double g_attn_max_excess; /* max |out - out_ref| / tol over attention outputs */

static void fnv1a(uint64_t *h, const void *p, size_t n)
{
    const uint8_t *b = (const uint8_t *)p;
    for (size_t i = 0; i < n; i++) *h = (*h ^ b[i]) * 1099511628211ull;
}

static void hash_bytes(const void *p, size_t n)
{
    fnv1a(&g_hash, p, n);
}

static int take(void *dst, size_t n)
{
    if (g_pos + n > g_len) return -1;
    memcpy(dst, g_buf + g_pos, n);
    g_pos += n;
    return 0;
}

/* a pointer into the file (copied, so that alignment is right) */
static void *take_arr(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p || take(p, n) != 0) {
        fprintf(stderr, "harness: truncated case file at byte %zu\n", g_pos);
        exit(2);
    }
    return p;
}

static int64_t take_i64(void)
{
    int64_t v;
    if (take(&v, 8) != 0) {
        fprintf(stderr, "harness: truncated case file at byte %zu\n", g_pos);
        exit(2);
    }
    return v;
}

static void fail(const char *what, int threads, int bits, int64_t rows, int64_t cols, int group,
                 int64_t n, const char *detail)
{
    g_failures++;
    if (g_failures <= MAX_REPORTS)
        printf("FAIL %s: threads=%d bits=%d rows=%lld cols=%lld group=%d n=%lld: %s\n", what, threads,
               bits, (long long)rows, (long long)cols, group, (long long)n, detail);
}

#define CHECK(cond, what, detail)                                                    \
    do {                                                                             \
        g_checks++;                                                                  \
        if (!(cond)) fail(what, threads, bits, rows, cols, group, n, detail);        \
    } while (0)

static int64_t first_diff(const void *a, const void *b, size_t n)
{
    const uint8_t *x = (const uint8_t *)a, *y = (const uint8_t *)b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return (int64_t)i;
    return -1;
}

static char g_detail[256];

static const char *diff_detail(const void *a, const void *b, size_t n, size_t elem)
{
    const int64_t i = first_diff(a, b, n);
    if (i < 0) return "equal";
    snprintf(g_detail, sizeof(g_detail), "first difference at element %lld", (long long)(i / (int64_t)elem));
    return g_detail;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void feature_names(unsigned f, char *out, size_t len)
{
    static const struct { unsigned bit; const char *name; } names[] = {
        {TZQ_CPU_NEON, "neon"}, {TZQ_CPU_DOTPROD, "dotprod"}, {TZQ_CPU_I8MM, "i8mm"},
        {TZQ_CPU_SSE2, "sse2"}, {TZQ_CPU_AVX2, "avx2"}, {TZQ_CPU_AVX512VNNI, "avx512vnni"}};
    out[0] = 0;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (f & names[i].bit) {
            if (out[0]) strncat(out, ",", len - strlen(out) - 1);
            strncat(out, names[i].name, len - strlen(out) - 1);
        }
    if (!out[0]) strncat(out, "none", len - 1);
}

/* one weight record and its activation sets, with `threads` threads */
static void run_record(int threads, int simd, size_t start)
{
    int64_t hdr[7], rows, cols, n = 0, nb, ng, rb, a, b, k, nx;
    int bits, group, rc;
    uint8_t *q, *codes, *buf8;
    float *s, *z, *W, *out;
    int64_t *ids;

    g_pos = start;
    for (int i = 0; i < 7; i++) hdr[i] = take_i64();
    bits = (int)hdr[0]; rows = hdr[1]; cols = hdr[2]; group = (int)hdr[3];
    a = hdr[4]; b = hdr[5]; k = hdr[6];
    nb = cols / 32; ng = cols / group; rb = cols * bits / 8;
    q = (uint8_t *)take_arr((size_t)(rows * cols));
    codes = (uint8_t *)take_arr((size_t)(rows * rb));
    s = (float *)take_arr(sizeof(float) * (size_t)(rows * ng));
    z = (float *)take_arr(sizeof(float) * (size_t)(rows * ng));
    W = (float *)take_arr(sizeof(float) * (size_t)(rows * cols));
    ids = (int64_t *)take_arr(sizeof(int64_t) * (size_t)k);
    nx = take_i64();

    buf8 = (uint8_t *)malloc((size_t)(rows * cols));
    out = (float *)malloc(sizeof(float) * (size_t)(rows * cols + k * cols + 1));
    if (!buf8 || !out) exit(2);

    rc = tzq_pack(q, buf8, rows, cols, bits);
    CHECK(rc == TZQ_OK && memcmp(buf8, codes, (size_t)(rows * rb)) == 0, "pack",
          diff_detail(buf8, codes, (size_t)(rows * rb), 1));
    rc = tzq_unpack(codes, buf8, rows, cols, bits);
    CHECK(rc == TZQ_OK && memcmp(buf8, q, (size_t)(rows * cols)) == 0, "unpack",
          diff_detail(buf8, q, (size_t)(rows * cols), 1));
    rc = tzq_dequantize(codes, s, z, rows, cols, bits, group, 0, rows, out);
    CHECK(rc == TZQ_OK && memcmp(out, W, sizeof(float) * (size_t)(rows * cols)) == 0, "dequantize",
          diff_detail(out, W, sizeof(float) * (size_t)(rows * cols), 4));
    rc = tzq_dequantize(codes, s, z, rows, cols, bits, group, a, b, out);
    CHECK(rc == TZQ_OK && memcmp(out, W + a * cols, sizeof(float) * (size_t)((b - a) * cols)) == 0,
          "dequantize row range", diff_detail(out, W + a * cols, sizeof(float) * (size_t)((b - a) * cols), 4));
    rc = tzq_gather_rows(codes, s, z, rows, cols, bits, group, ids, k, out);
    {
        int ok = rc == TZQ_OK;
        for (int64_t i = 0; ok && i < k; i++)
            ok = memcmp(out + i * cols, W + ids[i] * cols, sizeof(float) * (size_t)cols) == 0;
        CHECK(ok, "gather_rows", "differs");
    }
    {   /* invalid arguments are refused, never crash */
        int64_t bad = rows;
        float y1;
        CHECK(tzq_gather_rows(codes, s, z, rows, cols, bits, group, &bad, 1, out) == TZQ_EINVAL,
              "gather_rows id out of range", "not TZQ_EINVAL");
        CHECK(tzq_qmatmul(W, 1, codes, s, z, rows, cols, 5, group, &y1) == TZQ_EINVAL,
              "qmatmul bits=5", "not TZQ_EINVAL");
        CHECK(tzq_qmatmul(W, 1, codes, s, z, rows, cols, bits, 16, &y1) == TZQ_EINVAL,
              "qmatmul group=16", "not TZQ_EINVAL");
    }

    for (int64_t xsi = 0; xsi < nx; xsi++) {
        float *x, *d, *y, *tol, *y1, *y2, *d2;
        int8_t *xi, *xi2;
        n = take_i64();
        x = (float *)take_arr(sizeof(float) * (size_t)(n * cols));
        xi = (int8_t *)take_arr((size_t)(n * cols));
        d = (float *)take_arr(sizeof(float) * (size_t)(n * nb));
        y = (float *)take_arr(sizeof(float) * (size_t)(n * rows));
        tol = (float *)take_arr(sizeof(float) * (size_t)(n * rows));
        xi2 = (int8_t *)malloc((size_t)(n * cols));
        d2 = (float *)malloc(sizeof(float) * (size_t)(n * nb));
        y1 = (float *)malloc(sizeof(float) * (size_t)(n * rows));
        y2 = (float *)malloc(sizeof(float) * (size_t)(n * rows));
        if (!xi2 || !d2 || !y1 || !y2) exit(2);

        rc = tzq_quantize_activations(x, n, cols, xi2, d2);
        CHECK(rc == TZQ_OK && memcmp(xi2, xi, (size_t)(n * cols)) == 0, "quantize_activations xi",
              diff_detail(xi2, xi, (size_t)(n * cols), 1));
        CHECK(memcmp(d2, d, sizeof(float) * (size_t)(n * nb)) == 0, "quantize_activations d",
              diff_detail(d2, d, sizeof(float) * (size_t)(n * nb), 4));

        /* the product: with `threads` threads, and once more single-threaded */
        tzq_set_threads(threads);
        rc = tzq_qmatmul(x, n, codes, s, z, rows, cols, bits, group, y1);
        CHECK(rc == TZQ_OK, "qmatmul", "error code");
        tzq_set_threads(1);
        rc = tzq_qmatmul(x, n, codes, s, z, rows, cols, bits, group, y2);
        tzq_set_threads(threads);
        CHECK(rc == TZQ_OK && memcmp(y1, y2, sizeof(float) * (size_t)(n * rows)) == 0,
              "qmatmul same result with 1 thread", diff_detail(y1, y2, sizeof(float) * (size_t)(n * rows), 4));
        g_products++;
        if (threads == 1) hash_bytes(y1, sizeof(float) * (size_t)(n * rows));
        if (memcmp(y1, y, sizeof(float) * (size_t)(n * rows)) == 0) g_exact_products++;
        if (!simd) {
            CHECK(memcmp(y1, y, sizeof(float) * (size_t)(n * rows)) == 0, "qmatmul == reference (exact)",
                  diff_detail(y1, y, sizeof(float) * (size_t)(n * rows), 4));
        } else {
            int64_t worst = -1;
            double excess = 0.0;
            for (int64_t i = 0; i < n * rows; i++) {
                const double e = fabs((double)y1[i] - (double)y[i]);
                const double r = tol[i] > 0 ? e / tol[i] : (e > 0 ? INFINITY : 0.0);
                if (r > excess || r != r) { excess = r; worst = i; }
                if (!(e <= tol[i])) {
                    snprintf(g_detail, sizeof(g_detail), "y[%lld] = %.9g, reference %.9g, tolerance %.3g",
                             (long long)i, (double)y1[i], (double)y[i], (double)tol[i]);
                    break;
                }
            }
            if (excess > g_max_excess) g_max_excess = excess;
            (void)worst;
            CHECK(excess <= 1.0, "qmatmul within tolerance of the reference", g_detail);
        }
        free(x); free(xi); free(d); free(y); free(tol);
        free(xi2); free(d2); free(y1); free(y2);
    }
    free(q); free(codes); free(s); free(z); free(W); free(ids); free(buf8); free(out);
}

/* one rng record (see gen_cases.py): z, then src + a z and src + (a z) src, out of place and in place */
static void run_rng_record(int threads, size_t start)
{
    int64_t hdr[4], n;
    uint64_t seed, tid;
    int dist, bits = 0, group = 0;
    const int64_t rows = 0, cols = 0;
    float *want[4], *got;

    g_pos = start;
    for (int i = 0; i < 4; i++) hdr[i] = take_i64();
    memcpy(&seed, &hdr[0], 8);
    memcpy(&tid, &hdr[1], 8);
    n = hdr[2];
    dist = (int)hdr[3];
    bits = dist; /* reported as "bits" in failure lines: 0 Gaussian, 1 Rademacher */
    for (int i = 0; i < 4; i++) want[i] = (float *)take_arr((size_t)n * 4);
    got = (float *)malloc((size_t)n * 4);
    CHECK(got && tzq_rng_fill(got, n, seed, tid, dist) == TZQ_OK, "rng_fill runs", "");
    CHECK(memcmp(got, want[0], (size_t)n * 4) == 0, "rng_fill bits",
          diff_detail(got, want[0], (size_t)n * 4, 4));
    for (int mult = 0; mult < 2; mult++) {
        CHECK(tzq_rng_axpy(want[1], got, n, seed, tid, dist, RNG_A, mult) == TZQ_OK, "rng_axpy runs", "");
        CHECK(memcmp(got, want[2 + mult], (size_t)n * 4) == 0, "rng_axpy bits",
              diff_detail(got, want[2 + mult], (size_t)n * 4, 4));
        memcpy(got, want[1], (size_t)n * 4);
        tzq_rng_axpy(got, got, n, seed, tid, dist, RNG_A, mult);
        CHECK(memcmp(got, want[2 + mult], (size_t)n * 4) == 0, "rng_axpy in place bits",
              diff_detail(got, want[2 + mult], (size_t)n * 4, 4));
    }
    for (int i = 0; i < 4; i++) free(want[i]);
    free(got);
}

/* one attention record (see gen_cases.py): tzq_attn_prefill with `threads` threads and with 1 */
static void run_attn_record(int threads, size_t start)
{
    int64_t h[7], B, nkv, g, T, hd, pos0, kvs, nq, nkvb;
    float *q, *k, *v, *want, tol, *got, *got1;
    int rc;

    g_pos = start;
    for (int i = 0; i < 7; i++) h[i] = take_i64();
    B = h[0]; nkv = h[1]; g = h[2]; T = h[3]; hd = h[4]; pos0 = h[5]; kvs = h[6];
    nq = B * nkv * g * T * hd;
    nkvb = B * nkv * kvs;
    q = (float *)take_arr(sizeof(float) * (size_t)nq);
    k = (float *)take_arr(sizeof(float) * (size_t)nkvb);
    v = (float *)take_arr(sizeof(float) * (size_t)nkvb);
    want = (float *)take_arr(sizeof(float) * (size_t)nq);
    if (take(&tol, 4) != 0) {
        fprintf(stderr, "harness: truncated case file at byte %zu\n", g_pos);
        exit(2);
    }
    got = (float *)malloc(sizeof(float) * (size_t)nq);
    got1 = (float *)malloc(sizeof(float) * (size_t)nq);
    if (!got || !got1) exit(2);

#define ACHECK(cond, what, detail)                                                                       \
    do {                                                                                                 \
        g_checks++;                                                                                      \
        if (!(cond)) {                                                                                   \
            g_failures++;                                                                                \
            if (g_failures <= MAX_REPORTS)                                                               \
                printf("FAIL %s: threads=%d B=%lld nkv=%lld g=%lld T=%lld hd=%lld pos0=%lld kvs=%lld: %s\n", \
                       what, threads, (long long)B, (long long)nkv, (long long)g, (long long)T,          \
                       (long long)hd, (long long)pos0, (long long)kvs, detail);                          \
        }                                                                                                \
    } while (0)

    /* with `threads` threads, then single-threaded; outputs start as NaN (0xff bytes): an output the
       kernel never writes fails the tolerance check */
    memset(got, 0xff, sizeof(float) * (size_t)nq);
    tzq_set_threads(threads);
    rc = tzq_attn_prefill(q, k, v, B, nkv, g, T, hd, pos0, kvs, got);
    ACHECK(rc == TZQ_OK, "attn_prefill runs", "error code");
    memset(got1, 0xff, sizeof(float) * (size_t)nq);
    tzq_set_threads(1);
    rc = tzq_attn_prefill(q, k, v, B, nkv, g, T, hd, pos0, kvs, got1);
    tzq_set_threads(threads);
    ACHECK(rc == TZQ_OK && memcmp(got, got1, sizeof(float) * (size_t)nq) == 0,
           "attn_prefill same result with 1 thread", diff_detail(got, got1, sizeof(float) * (size_t)nq, 4));
    g_attn_runs++;
    if (threads == 1) fnv1a(&g_attn_hash, got, sizeof(float) * (size_t)nq);
    {
        double excess = 0.0;
        g_detail[0] = 0;
        for (int64_t i = 0; i < nq; i++) {
            const double e = fabs((double)got[i] - (double)want[i]);
            const double r = e / tol;
            if (r > excess || r != r) excess = r != r ? INFINITY : r;
            if (!(e <= tol)) {
                snprintf(g_detail, sizeof(g_detail), "out[%lld] = %.9g, reference %.9g, tolerance %.3g",
                         (long long)i, (double)got[i], (double)want[i], (double)tol);
                break;
            }
        }
        if (excess > g_attn_max_excess) g_attn_max_excess = excess;
        ACHECK(excess <= 1.0, "attn_prefill within tolerance of the reference", g_detail);
    }
    /* invalid arguments are refused before anything is written */
    memcpy(got1, got, sizeof(float) * (size_t)nq);
    rc = tzq_attn_prefill(q, k, v, B, nkv, g, T, hd, pos0, (pos0 + T) * hd - 1, got1);
    ACHECK(rc == TZQ_EINVAL && memcmp(got1, got, sizeof(float) * (size_t)nq) == 0, "attn_prefill kvs too small",
           rc == TZQ_EINVAL ? "out written" : "not TZQ_EINVAL");
    rc = tzq_attn_prefill(q, k, v, B, nkv, g, T, 0, pos0, kvs, got1);
    ACHECK(rc == TZQ_EINVAL && memcmp(got1, got, sizeof(float) * (size_t)nq) == 0, "attn_prefill hd=0",
           rc == TZQ_EINVAL ? "out written" : "not TZQ_EINVAL");
#undef ACHECK
    free(q); free(k); free(v); free(want); free(got); free(got1);
}

int main(int argc, char **argv)
{
    FILE *f;
    long size;
    uint8_t *buf;
    const unsigned feats = tzq_cpu_features(), req = tzq_isa_requires();
    const int simd = strcmp(tzq_isa_name(), "ref") != 0;
    int force = 0;
    char fs[128], rs[128];
    double t0;
    size_t nrec = 0, starts[4096], nrng = 0, rstarts[64], nattn = 0, astarts[64];

    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--force") == 0) force = 1;
    feature_names(feats, fs, sizeof(fs));
    feature_names(req, rs, sizeof(rs));
    printf("arch=%s isa=%s features=%s requires=%s\n", tzq_cpu_arch(), tzq_isa_name(), fs, rs);
    if ((feats & req) != req && !force) {
        printf("refused: this CPU lacks features the %s variant needs (has %s, needs %s)\n",
               tzq_isa_name(), fs, rs);
        return 3;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASES.bin [--force]\n", argv[0]);
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (!f || fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "harness: cannot read %s\n", argv[1]);
        return 2;
    }
    buf = (uint8_t *)malloc((size_t)size + 1);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "harness: cannot read %s\n", argv[1]);
        return 2;
    }
    fclose(f);
    g_buf = buf;
    g_len = (size_t)size;

    /* index the records once (skip over each by parsing it with 1 thread) */
    for (;;) {
        const int64_t magic = take_i64();
        if (magic == MAGIC_END) break;
        if (magic == MAGIC_R && nrng < sizeof(rstarts) / sizeof(rstarts[0])) {
            rstarts[nrng++] = g_pos;
            g_pos += 16;
            {
                const int64_t n = take_i64();
                if (n < 0 || take_i64() < 0) {
                    fprintf(stderr, "harness: bad rng record at byte %zu\n", rstarts[nrng - 1]);
                    return 2;
                }
                g_pos += (size_t)(16 * n);
            }
            continue;
        }
        if (magic == MAGIC_A && nattn < sizeof(astarts) / sizeof(astarts[0])) {
            int64_t h[7];
            const int64_t lim = (int64_t)1 << 20;
            astarts[nattn++] = g_pos;
            for (int i = 0; i < 7; i++) h[i] = take_i64();
            /* B, nkv, g, T, hd, pos0, kvs: sane and small enough that the sizes cannot overflow */
            if (h[0] < 1 || h[1] < 1 || h[2] < 1 || h[3] < 1 || h[4] < 1 || h[5] < 0 || h[0] > 64 || h[1] > 64 ||
                h[2] > 64 || h[3] > lim || h[4] > 4096 || h[5] > lim || h[6] < (h[5] + h[3]) * h[4] ||
                h[6] > ((int64_t)1 << 32)) {
                fprintf(stderr, "harness: bad attention record header at byte %zu\n", astarts[nattn - 1]);
                return 2;
            }
            g_pos += (size_t)(8 * h[0] * h[1] * h[2] * h[3] * h[4] + 8 * h[0] * h[1] * h[6] + 4);
            continue;
        }
        if (magic != MAGIC_W || nrec == sizeof(starts) / sizeof(starts[0])) {
            fprintf(stderr, "harness: bad record at byte %zu\n", g_pos - 8);
            return 2;
        }
        starts[nrec++] = g_pos;
        {
            int64_t h[7], nx, rows, cols, group, bits;
            for (int i = 0; i < 7; i++) h[i] = take_i64();
            bits = h[0]; rows = h[1]; cols = h[2]; group = h[3];
            if (bits < 2 || bits > 8 || rows < 1 || cols < 32 || group < 32 || h[6] < 0) {
                fprintf(stderr, "harness: bad record header at byte %zu\n", starts[nrec - 1]);
                return 2;
            }
            g_pos += (size_t)(rows * cols + rows * cols * bits / 8 + 8 * rows * (cols / group) +
                              4 * rows * cols + 8 * h[6]);
            nx = take_i64();
            for (int64_t i = 0; i < nx; i++) {
                const int64_t n = take_i64();
                g_pos += (size_t)(4 * n * cols + n * cols + 4 * n * (cols / 32) + 8 * n * rows);
            }
        }
    }

    t0 = now_s();
    for (int threads = 1; threads <= 3; threads += 2) {
        tzq_set_threads(threads);
        for (size_t r = 0; r < nrec; r++) run_record(threads, simd, starts[r]);
        for (size_t r = 0; r < nrng; r++) run_rng_record(threads, rstarts[r]);
        for (size_t r = 0; r < nattn; r++) run_attn_record(threads, astarts[r]);
    }
    printf("%s isa=%s records=%zu rng_records=%zu attn_records=%zu checks=%ld failures=%ld products=%ld "
           "exact_products=%ld max_err_over_tol=%.3g y_hash=%016llx attn_runs=%ld attn_max_err_over_tol=%.3g "
           "attn_hash=%016llx seconds=%.2f\n",
           g_failures ? "FAIL" : "PASS", tzq_isa_name(), nrec, nrng, nattn, g_checks, g_failures, g_products,
           g_exact_products, g_max_excess, (unsigned long long)g_hash, g_attn_runs, g_attn_max_excess,
           (unsigned long long)g_attn_hash, now_s() - t0);
    free(buf);
    return g_failures ? 1 : 0;
}

/*
 * pack.c -- scalar C99 reference: canonical pack / unpack / dequantize (docs/FORMAT.md).
 *
 * Layout of one row of `cols` codes (row stride cols*bits/8 bytes):
 *   8: byte j = q[j]
 *   4: byte k = q[2k] | q[2k+1] << 4
 *   2: byte k = q[4k] | q[4k+1] << 2 | q[4k+2] << 4 | q[4k+3] << 6
 *   3: cols/4 bytes of the low 2 bits in the 2-bit layout, then cols/8 bytes of bit 2:
 *      byte k = sum_i ((q[8k+i] >> 2) & 1) << i
 */
#include <string.h>
#include "tzq_internal.h"

int tzq_check_layout(int64_t cols, int bits, int group)
{
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return TZQ_EINVAL;
    if (cols <= 0 || cols % 32 != 0) return TZQ_EINVAL;
    if (group != 0 && (group < 0 || group % 32 != 0 || cols % group != 0)) return TZQ_EINVAL;
    return TZQ_OK;
}

int64_t tzq_row_bytes(int64_t cols, int bits) { return cols * bits / 8; }

static void pack_2bit(const uint8_t *restrict q, uint8_t *restrict c, int64_t cols)
{
    for (int64_t k = 0; k < cols / 4; k++)
        c[k] = (uint8_t)((q[4 * k] & 3) | (q[4 * k + 1] & 3) << 2 | (q[4 * k + 2] & 3) << 4 |
                         (q[4 * k + 3] & 3) << 6);
}

static void pack_row(const uint8_t *restrict q, uint8_t *restrict c, int64_t cols, int bits)
{
    switch (bits) {
    case 8:
        memcpy(c, q, (size_t)cols);
        break;
    case 4:
        for (int64_t k = 0; k < cols / 2; k++)
            c[k] = (uint8_t)((q[2 * k] & 15) | (q[2 * k + 1] & 15) << 4);
        break;
    case 2:
        pack_2bit(q, c, cols);
        break;
    case 3: {
        uint8_t *hi = c + cols / 4;
        pack_2bit(q, c, cols); /* pack_2bit keeps only the low 2 bits */
        for (int64_t k = 0; k < cols / 8; k++) {
            unsigned h = 0;
            for (int i = 0; i < 8; i++) h |= (unsigned)((q[8 * k + i] >> 2) & 1) << i;
            hi[k] = (uint8_t)h;
        }
        break;
    }
    }
}

/* Unpacking with 64-bit SWAR on little-endian machines (all targets): spread the bit fields of
   a word into bytes with shift/mask steps, then store 8 codes at once. Portable C, exact, and
   several times faster than byte loops in the scalar reference (which has no SIMD flags). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TZQ_SWAR 1
#else
#define TZQ_SWAR 0
#endif

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* 16 bits = 8 two-bit fields -> 8 bytes */
static inline uint64_t spread2(uint64_t x)
{
    x = (x | (x << 24)) & 0x000000FF000000FFull;
    x = (x | (x << 12)) & 0x000F000F000F000Full;
    x = (x | (x << 6)) & 0x0303030303030303ull;
    return x;
}

/* 8 bits -> 8 bytes holding 0 or 4 (bit 2 of 3-bit codes) */
static inline uint64_t spread1x4(uint64_t x)
{
    x = (x | (x << 28)) & 0x0000000F0000000Full;
    x = (x | (x << 14)) & 0x0003000300030003ull;
    x = (x | (x << 7)) & 0x0101010101010101ull;
    return x << 2;
}

/* nbytes of the 2-bit layout -> 4*nbytes codes (nbytes even) */
static void unpack_2bit(const uint8_t *restrict c, uint8_t *restrict q, int64_t nbytes)
{
    if (TZQ_SWAR) {
        for (int64_t k = 0; k < nbytes; k += 2) st64(q + 4 * k, spread2((uint64_t)c[k] | (uint64_t)c[k + 1] << 8));
        return;
    }
    for (int64_t k = 0; k < nbytes; k++) {
        const uint8_t v = c[k];
        q[4 * k] = v & 3;
        q[4 * k + 1] = (v >> 2) & 3;
        q[4 * k + 2] = (v >> 4) & 3;
        q[4 * k + 3] = v >> 6;
    }
}

/* OR bit 2 of 8 codes per byte of the 3-bit high plane into q (holding the low 2 bits) */
static void unpack_hiplane(const uint8_t *restrict h, uint8_t *restrict q, int64_t nbytes)
{
    if (TZQ_SWAR) {
        for (int64_t k = 0; k < nbytes; k++) st64(q + 8 * k, ld64(q + 8 * k) | spread1x4(h[k]));
        return;
    }
    for (int64_t k = 0; k < nbytes; k++)
        for (int i = 0; i < 8; i++) q[8 * k + i] |= (uint8_t)(((h[k] >> i) & 1) << 2);
}

/* nbytes of the 4-bit layout -> 2*nbytes codes (this byte loop vectorizes well as it is) */
static void unpack_4bit(const uint8_t *restrict c, uint8_t *restrict q, int64_t nbytes)
{
    for (int64_t k = 0; k < nbytes; k++) {
        q[2 * k] = c[k] & 15;
        q[2 * k + 1] = c[k] >> 4;
    }
}

void tzq_unpack_row(const uint8_t *c, uint8_t *q, int64_t cols, int bits)
{
    switch (bits) {
    case 8: memcpy(q, c, (size_t)cols); break;
    case 4: unpack_4bit(c, q, cols / 2); break;
    case 2: unpack_2bit(c, q, cols / 4); break;
    case 3:
        unpack_2bit(c, q, cols / 4);
        unpack_hiplane(c + cols / 4, q, cols / 8);
        break;
    }
}

void tzq_unpack_block(const uint8_t *row, int64_t cols, int bits, int64_t b, uint8_t q[32])
{
    switch (bits) {
    case 8: memcpy(q, row + 32 * b, 32); break;
    case 4: unpack_4bit(row + 16 * b, q, 16); break;
    case 2: unpack_2bit(row + 8 * b, q, 8); break;
    case 3:
        unpack_2bit(row + 8 * b, q, 8);
        unpack_hiplane(row + cols / 4 + 4 * b, q, 4);
        break;
    }
}

void tzq_ref_dequant_row(const uint8_t *row, const float *s, const float *z, int64_t cols,
                         int bits, int group, float *out)
{
    const int64_t bpg = group / 32;
    uint8_t q[32];
    for (int64_t b = 0; b < cols / 32; b++) {
        const float sg = s[b / bpg], zg = z[b / bpg];
        float *o = out + 32 * b;
        tzq_unpack_block(row, cols, bits, b, q);
        for (int j = 0; j < 32; j++) o[j] = sg * ((float)q[j] - zg);
    }
}

/* ---- public entry points ---- */

typedef struct {
    const uint8_t *src;
    uint8_t *dst;
    int64_t cols, src_stride, dst_stride;
    int bits;
} pack_job;

static void pack_range(void *ctx, int64_t r0, int64_t r1)
{
    const pack_job *j = (const pack_job *)ctx;
    for (int64_t r = r0; r < r1; r++)
        pack_row(j->src + r * j->src_stride, j->dst + r * j->dst_stride, j->cols, j->bits);
}

static void unpack_range(void *ctx, int64_t r0, int64_t r1)
{
    const pack_job *j = (const pack_job *)ctx;
    for (int64_t r = r0; r < r1; r++)
        tzq_unpack_row(j->src + r * j->src_stride, j->dst + r * j->dst_stride, j->cols, j->bits);
}

static int64_t grain_for(int64_t bytes_per_row)
{
    const int64_t target = 1 << 16; /* ~64 KiB of work per chunk */
    int64_t g = bytes_per_row > 0 ? target / bytes_per_row : 1;
    return g < 1 ? 1 : g;
}

int tzq_pack(const uint8_t *q, uint8_t *codes, int64_t rows, int64_t cols, int bits)
{
    pack_job j;
    if (tzq_check_layout(cols, bits, 0) != TZQ_OK || rows < 0) return TZQ_EINVAL;
    j.src = q; j.dst = codes; j.cols = cols; j.bits = bits;
    j.src_stride = cols; j.dst_stride = tzq_row_bytes(cols, bits);
    tzq_parallel_for(rows, grain_for(cols), pack_range, &j);
    return TZQ_OK;
}

int tzq_unpack(const uint8_t *codes, uint8_t *q, int64_t rows, int64_t cols, int bits)
{
    pack_job j;
    if (tzq_check_layout(cols, bits, 0) != TZQ_OK || rows < 0) return TZQ_EINVAL;
    j.src = codes; j.dst = q; j.cols = cols; j.bits = bits;
    j.src_stride = tzq_row_bytes(cols, bits); j.dst_stride = cols;
    tzq_parallel_for(rows, grain_for(cols), unpack_range, &j);
    return TZQ_OK;
}

typedef struct {
    const uint8_t *codes;
    const float *scales, *zeros;
    int64_t cols, ng, row_bytes, row0;
    const int64_t *ids; /* NULL: rows row0 + i */
    int bits, group;
    float *out;
} deq_job;

static void deq_range(void *ctx, int64_t i0, int64_t i1)
{
    const deq_job *j = (const deq_job *)ctx;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t r = j->ids ? j->ids[i] : j->row0 + i;
        TZQ_DEQUANT_ROW(j->codes + r * j->row_bytes, j->scales + r * j->ng, j->zeros + r * j->ng,
                        j->cols, j->bits, j->group, j->out + i * j->cols);
    }
}

int tzq_dequantize(const uint8_t *codes, const float *scales, const float *zeros, int64_t rows,
                   int64_t cols, int bits, int group, int64_t row_start, int64_t row_stop,
                   float *out)
{
    deq_job j;
    if (tzq_check_layout(cols, bits, group) != TZQ_OK || group == 0) return TZQ_EINVAL;
    if (row_start < 0 || row_stop < row_start || row_stop > rows) return TZQ_EINVAL;
    j.codes = codes; j.scales = scales; j.zeros = zeros;
    j.cols = cols; j.ng = cols / group; j.row_bytes = tzq_row_bytes(cols, bits);
    j.row0 = row_start; j.ids = NULL; j.bits = bits; j.group = group; j.out = out;
    tzq_parallel_for(row_stop - row_start, grain_for(4 * cols), deq_range, &j);
    return TZQ_OK;
}

int tzq_gather_rows(const uint8_t *codes, const float *scales, const float *zeros, int64_t rows,
                    int64_t cols, int bits, int group, const int64_t *ids, int64_t k, float *out)
{
    deq_job j;
    if (tzq_check_layout(cols, bits, group) != TZQ_OK || group == 0 || k < 0) return TZQ_EINVAL;
    for (int64_t i = 0; i < k; i++)
        if (ids[i] < 0 || ids[i] >= rows) return TZQ_EINVAL;
    j.codes = codes; j.scales = scales; j.zeros = zeros;
    j.cols = cols; j.ng = cols / group; j.row_bytes = tzq_row_bytes(cols, bits);
    j.row0 = 0; j.ids = ids; j.bits = bits; j.group = group; j.out = out;
    tzq_parallel_for(k, grain_for(4 * cols), deq_range, &j);
    return TZQ_OK;
}

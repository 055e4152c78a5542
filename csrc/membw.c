/*
 * membw.c -- a streaming-read kernel for measuring memory bandwidth (tinyzq bench).
 *
 * tzq_stream_read(buf, n) reads every byte of buf once, split over the thread pool like the
 * qmatmul rows, and returns a checksum (the wrapping sum of its 64-bit words, so the reads cannot
 * be optimised away). Timing it on a buffer much larger than the last-level cache gives the read
 * bandwidth that a bandwidth-bound decode can at best reach with the same threads. The loop is
 * plain C that the compiler vectorises with the module's flags (AVX2 in _tzq_avx2, ...).
 */
#include <string.h>
#include "tzq_internal.h"

#define MEMBW_CHUNK 65536 /* bytes per work item */

typedef struct {
    const uint8_t *buf;
    int64_t n;
    uint64_t sum; /* atomic */
} membw_job;

static void membw_range(void *ctx, int64_t i0, int64_t i1)
{
    membw_job *j = (membw_job *)ctx;
    const int64_t b0 = i0 * MEMBW_CHUNK, b1 = i1 * MEMBW_CHUNK < j->n ? i1 * MEMBW_CHUNK : j->n;
    const int64_t nw = (b1 - b0) / 8;
    const uint8_t *p = j->buf + b0;
    uint64_t acc = 0, w;
    int64_t k;
    for (k = 0; k < nw; k++) { /* vectorised by the compiler (vpaddq on 256-bit loads with AVX2) */
        memcpy(&w, p + 8 * k, 8);
        acc += w;
    }
    for (int64_t b = b0 + 8 * nw; b < b1; b++) acc += p[b - b0];
    __atomic_fetch_add(&j->sum, acc, __ATOMIC_RELAXED);
}

uint64_t tzq_stream_read(const uint8_t *buf, int64_t n)
{
    membw_job j;
    if (!buf || n <= 0) return 0;
    j.buf = buf; j.n = n; j.sum = 0;
    tzq_parallel_for((n + MEMBW_CHUNK - 1) / MEMBW_CHUNK, 1, membw_range, &j);
    return j.sum;
}

/*
 * threads.c -- a tiny persistent pthread pool (no OpenMP: Termux and macOS lack it).
 *
 * tzq_parallel_for(n, grain, fn, ctx) splits [0, n) into chunks that the caller and the pool's
 * workers claim from an atomic counter, so callers never see how many threads there are.
 * Workers are started lazily (threads - 1 of them; the calling thread is the last one), spin
 * for a short while after a job (decode issues hundreds of small jobs per token) and then sleep
 * on a condition variable. One job runs at a time: a call made while the pool is busy (another
 * Python thread, or a nested call) simply runs inline. After fork() the child starts with an
 * empty pool. Each extension module (one per ISA) has its own pool.
 *
 * Late workers are cancelled, not waited for: each worker has a slot that it claims for a job
 * generation (CAS) before touching the job. When the caller has run out of chunks, it claims, on
 * their behalf, the slots of workers that have not woken up yet (descheduled on a loaded machine,
 * or still asleep) and only waits for those that did join. A job then never costs more than running
 * it on the calling thread plus the chunks that joined workers hold (on 2 busy cores, waiting for a
 * descheduled worker cost a scheduler time slice per call: decode has ~120 calls per token).
 */
#if !defined(_GNU_SOURCE) && !defined(_WIN32)
#define _GNU_SOURCE
#endif
#include "tzq_internal.h"

#if defined(_WIN32) || defined(TZQ_NO_THREADS)

static int g_threads = 1;
void tzq_set_threads(int n) { g_threads = n < 1 ? 1 : n; }
int tzq_get_threads(void) { return g_threads; }
void tzq_set_spin_us(int us) { (void)us; }
void tzq_parallel_for(int64_t n, int64_t grain, tzq_range_fn fn, void *ctx)
{
    (void)grain;
    if (n > 0) fn(ctx, 0, n);
}

#else

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>

#define TZQ_MAX_THREADS 256

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FETCH_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

typedef struct {
    pthread_mutex_t submit; /* held by the thread running a job */
    pthread_mutex_t m;      /* protects sleeping / waking */
    pthread_cond_t wake;    /* workers wait here for a new generation */
    pthread_cond_t done;    /* the submitter waits here for pending == 0 */
    int nworkers;           /* started workers (guarded by submit) */
    pthread_t th[TZQ_MAX_THREADS];
    unsigned start_gen[TZQ_MAX_THREADS];
    uint64_t slot[TZQ_MAX_THREADS]; /* atomic: (gen << 1) | cancelled, the last job claimed for worker i */
    /* the current job: written by the submitter before gen is bumped */
    tzq_range_fn fn;
    void *ctx;
    int64_t n, chunk;
    int quit_from;          /* workers with index >= quit_from acknowledge and exit */
    int64_t next;           /* atomic: next index to claim */
    int pending;            /* atomic: workers that have not acknowledged the job */
    unsigned gen;           /* atomic: job generation */
    int sleepers;           /* guarded by m */
} pool_t;

static pool_t P = {.submit = PTHREAD_MUTEX_INITIALIZER, .m = PTHREAD_MUTEX_INITIALIZER,
                   .wake = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};
static int g_threads = 1;
static int g_spin_us = 300;
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

void tzq_set_threads(int n)
{
    if (n < 1) n = 1;
    if (n > TZQ_MAX_THREADS) n = TZQ_MAX_THREADS;
    STORE(&g_threads, n);
}

int tzq_get_threads(void) { return LOAD(&g_threads); }

void tzq_set_spin_us(int us) { STORE(&g_spin_us, us < 0 ? 0 : us); }

static void run_chunks(void)
{
    const int64_t n = P.n, chunk = P.chunk;
    for (;;) {
        const int64_t i = FETCH_ADD(&P.next, chunk);
        if (i >= n) break;
        P.fn(P.ctx, i, i + chunk < n ? i + chunk : n);
    }
}

static void ack(void)
{
    if (FETCH_ADD(&P.pending, -1) == 1) {
        pthread_mutex_lock(&P.m);
        pthread_cond_signal(&P.done);
        pthread_mutex_unlock(&P.m);
    }
}

static void *worker(void *arg)
{
    const int idx = (int)(intptr_t)arg;
    unsigned seen = P.start_gen[idx];
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals belong to the Python main thread */
    for (;;) {
        unsigned g = LOAD(&P.gen);
        if (g == seen) {
            const int64_t deadline = now_us() + LOAD(&g_spin_us);
            int it = 0;
            while ((g = LOAD(&P.gen)) == seen) {
                cpu_relax();
                if ((++it & 255) == 0 && now_us() > deadline) break;
            }
            if (g == seen) {
                pthread_mutex_lock(&P.m);
                P.sleepers++;
                while ((g = LOAD(&P.gen)) == seen) pthread_cond_wait(&P.wake, &P.m);
                P.sleepers--;
                pthread_mutex_unlock(&P.m);
            }
        }
        seen = g;
        {   /* claim generation g unless a caller has cancelled us for g or a NEWER generation: a worker
               descheduled between reading gen and claiming may find its slot cancelled for a later
               job, and claiming the stale g then would ack (and read P) in a job it is not part of —
               pending went to -1 and the caller waited forever */
            uint64_t old = LOAD(&P.slot[idx]);
            int claimed = 0;
            for (;;) {
                const unsigned sg = (unsigned)(old >> 1);
                if ((int)(sg - g) >= 0) { /* cancelled for g or later: that caller accounted for us */
                    seen = sg;
                    break;
                }
                if (__atomic_compare_exchange_n(&P.slot[idx], &old, (uint64_t)g << 1, 0, __ATOMIC_ACQ_REL,
                                                __ATOMIC_ACQUIRE)) {
                    claimed = 1;
                    break;
                } /* else old is the slot's new value: look again */
            }
            if (!claimed) continue;
        }
        if (idx >= P.quit_from) {
            ack();
            return NULL;
        }
        run_chunks();
        ack();
    }
}

/* publish the job currently described in P and wait until every worker acknowledged it (or,
   when the caller works too, was cancelled because it had not joined by the time the chunks ran out) */
static void publish_and_wait(int caller_works)
{
    int it = 0;
    int64_t deadline;
    unsigned g;
    STORE(&P.pending, P.nworkers);
    pthread_mutex_lock(&P.m);
    g = P.gen + 1;
    STORE(&P.gen, g);
    if (P.sleepers) pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.m);
    if (caller_works) {
        run_chunks();
        for (int i = 0; i < P.nworkers; i++) {
            uint64_t old = LOAD(&P.slot[i]);
            if ((old >> 1) != (uint64_t)g &&
                __atomic_compare_exchange_n(&P.slot[i], &old, ((uint64_t)g << 1) | 1u, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE))
                FETCH_ADD(&P.pending, -1);
        }
    }
    deadline = now_us() + 200; /* the last chunks take microseconds; then sleep (a worker may be descheduled) */
    while (LOAD(&P.pending) != 0) {
        cpu_relax();
        if ((++it & 255) == 0 && now_us() > deadline) {
            pthread_mutex_lock(&P.m);
            while (LOAD(&P.pending) != 0) pthread_cond_wait(&P.done, &P.m);
            pthread_mutex_unlock(&P.m);
            break;
        }
    }
}

static void atfork_prepare(void) { pthread_mutex_lock(&P.submit); }
static void atfork_parent(void) { pthread_mutex_unlock(&P.submit); }
static void atfork_child(void)
{
    /* the workers do not exist in the child: start from an empty pool */
    P.nworkers = 0;
    P.sleepers = 0;
    for (int i = 0; i < TZQ_MAX_THREADS; i++) P.slot[i] = 0;
    pthread_mutex_init(&P.m, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.done, NULL);
    pthread_mutex_unlock(&P.submit);
}
static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

/* called with submit held: make exactly `want` workers exist (fewer if creation fails) */
static void resize(int want)
{
    if (P.nworkers > want) {
        const int old = P.nworkers;
        P.quit_from = want;
        P.fn = NULL; P.ctx = NULL; P.n = 0; P.chunk = 1; P.next = 0;
        publish_and_wait(0);
        for (int i = want; i < old; i++) pthread_join(P.th[i], NULL);
        P.nworkers = want;
    }
    if (P.nworkers < want) {
        pthread_once(&g_atfork_once, register_atfork);
        while (P.nworkers < want) {
            const int i = P.nworkers;
            P.start_gen[i] = LOAD(&P.gen);
            STORE(&P.slot[i], (uint64_t)P.start_gen[i] << 1);
            if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i) != 0) break;
            P.nworkers++;
        }
    }
}

void tzq_parallel_for(int64_t n, int64_t grain, tzq_range_fn fn, void *ctx)
{
    const int T = LOAD(&g_threads);
    int64_t chunk;
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (T <= 1 || n <= grain || pthread_mutex_trylock(&P.submit) != 0) {
        fn(ctx, 0, n);
        return;
    }
    resize(T - 1);
    if (P.nworkers == 0) {
        pthread_mutex_unlock(&P.submit);
        fn(ctx, 0, n);
        return;
    }
    /* about 4 chunks per thread for balance, never below the grain */
    chunk = (n + 4 * (int64_t)(P.nworkers + 1) - 1) / (4 * (int64_t)(P.nworkers + 1));
    if (chunk < grain) chunk = grain;
    P.fn = fn; P.ctx = ctx; P.n = n; P.chunk = chunk; P.next = 0;
    P.quit_from = TZQ_MAX_THREADS;
    publish_and_wait(1);
    pthread_mutex_unlock(&P.submit);
}

#endif

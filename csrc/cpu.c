/*
 * cpu.c -- run-time CPU feature detection for dispatch, and the variant of this module.
 *
 * x86-64: cpuid leaves 1 and 7; a vector extension counts only if the OS saves its registers
 *         (CPUID.1:ECX.OSXSAVE, then XCR0 via xgetbv: bits 1-2 for AVX, 5-7 for AVX-512; on
 *         macOS AVX-512 state is enabled lazily, so ask sysctl hw.optional.avx512f instead).
 * aarch64: getauxval(AT_HWCAP) HWCAP_ASIMD (bit 1), HWCAP_ASIMDDP (bit 20),
 *          getauxval(AT_HWCAP2) HWCAP2_I8MM (bit 13); sysctl hw.optional.arm.FEAT_* on macOS.
 * Never compiled with -march=native / -mcpu=native: this file is in the portable reference
 * module, which is what kernels.py asks.
 */
#if !defined(_GNU_SOURCE) && !defined(_WIN32)
#define _GNU_SOURCE
#endif
#include "tzq_internal.h"

#if defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
static int sysctl_flag(const char *name)
{
    int v = 0;
    size_t len = sizeof(v);
    if (sysctlbyname(name, &v, &len, NULL, 0) != 0) return 0;
    return v != 0;
}
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>

static uint64_t read_xcr0(void)
{
    uint32_t a, d;
    /* xgetbv with ecx = 0, spelled as bytes so that no -mxsave flag is needed */
    __asm__ __volatile__(".byte 0x0f, 0x01, 0xd0" : "=a"(a), "=d"(d) : "c"(0));
    return ((uint64_t)d << 32) | a;
}

unsigned int tzq_cpu_features(void)
{
    unsigned int a, b, c, d, f = 0, max;
    int os_avx = 0, os_avx512 = 0;
    max = __get_cpuid_max(0, NULL);
    if (max < 1) return 0;
    __cpuid(1, a, b, c, d);
    if (d & (1u << 26)) f |= TZQ_CPU_SSE2;
    if (c & (1u << 9)) f |= TZQ_CPU_SSSE3;
    if (c & (1u << 19)) f |= TZQ_CPU_SSE41;
    if (c & (1u << 27)) { /* OSXSAVE: xgetbv is usable */
        const uint64_t xcr0 = read_xcr0();
        os_avx = (xcr0 & 0x6) == 0x6;
        os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
    }
#if defined(__APPLE__)
    os_avx512 = os_avx && sysctl_flag("hw.optional.avx512f");
#endif
    if (os_avx) {
        if (c & (1u << 28)) f |= TZQ_CPU_AVX;
        if (c & (1u << 12)) f |= TZQ_CPU_FMA;
        if (c & (1u << 29)) f |= TZQ_CPU_F16C;
    }
    if (max >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        if (os_avx && (b & (1u << 5))) f |= TZQ_CPU_AVX2;
        if (os_avx512) {
            if (b & (1u << 16)) f |= TZQ_CPU_AVX512F;
            if (b & (1u << 30)) f |= TZQ_CPU_AVX512BW;
            if (b & (1u << 31)) f |= TZQ_CPU_AVX512VL;
            if (c & (1u << 11)) f |= TZQ_CPU_AVX512VNNI;
        }
    }
    (void)a; (void)d;
    return f;
}

const char *tzq_cpu_arch(void) { return "x86_64"; }

#elif defined(__aarch64__) || defined(_M_ARM64)

#if defined(__linux__) || defined(__ANDROID__)
#include <sys/auxv.h>
#ifndef AT_HWCAP2
#define AT_HWCAP2 26
#endif
#endif

unsigned int tzq_cpu_features(void)
{
    unsigned int f = 0;
#if defined(__linux__) || defined(__ANDROID__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if (hw & (1ul << 1)) f |= TZQ_CPU_NEON;     /* HWCAP_ASIMD */
    if (hw & (1ul << 20)) f |= TZQ_CPU_DOTPROD; /* HWCAP_ASIMDDP */
    if (hw2 & (1ul << 13)) f |= TZQ_CPU_I8MM;   /* HWCAP2_I8MM */
#elif defined(__APPLE__)
    f |= TZQ_CPU_NEON;
    if (sysctl_flag("hw.optional.arm.FEAT_DotProd")) f |= TZQ_CPU_DOTPROD;
    if (sysctl_flag("hw.optional.arm.FEAT_I8MM")) f |= TZQ_CPU_I8MM;
#else
    f |= TZQ_CPU_NEON; /* AdvSIMD is part of the aarch64 baseline */
#endif
    return f;
}

const char *tzq_cpu_arch(void) { return "aarch64"; }

#else

unsigned int tzq_cpu_features(void) { return 0; }
const char *tzq_cpu_arch(void) { return "other"; }

#endif

const char *tzq_isa_name(void)
{
#if defined(TZQ_ISA_AVX512)
    return "avx512";
#elif defined(TZQ_ISA_AVX2)
    return "avx2";
#elif defined(TZQ_ISA_DOTPROD)
    return "dotprod";
#elif defined(TZQ_ISA_NEON)
    return "neon";
#else
    return "ref";
#endif
}

unsigned int tzq_isa_requires(void)
{
#define TZQ_REQ_AVX2 (TZQ_CPU_AVX | TZQ_CPU_AVX2 | TZQ_CPU_FMA | TZQ_CPU_F16C)
#if defined(TZQ_ISA_AVX512)
    return TZQ_REQ_AVX2 | TZQ_CPU_AVX512F | TZQ_CPU_AVX512BW | TZQ_CPU_AVX512VL | TZQ_CPU_AVX512VNNI;
#elif defined(TZQ_ISA_AVX2)
    return TZQ_REQ_AVX2;
#elif defined(TZQ_ISA_DOTPROD)
    return TZQ_CPU_NEON | TZQ_CPU_DOTPROD;
#elif defined(TZQ_ISA_NEON)
    return TZQ_CPU_NEON;
#else
    return 0;
#endif
#undef TZQ_REQ_AVX2
}

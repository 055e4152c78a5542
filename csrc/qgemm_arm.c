/*
 * qgemm_arm.c -- aarch64 variants (compiled only into the aarch64 modules _tzq_neon and
 * _tzq_dotprod, see build_ext.py).
 *
 * Placeholder: the NEON (vmull/vpadal, safe on Cortex-A72/A53 which lack dotprod) and the
 * dotprod (sdot) / i8mm row kernels come in a later change. Until then TZQ_KERN_ARM is 0 in
 * tzq_internal.h and these modules run the scalar reference kernels, so the dispatch structure
 * (module per ISA, feature checks in kernels.py) is already in place and exercised.
 *
 * To add the kernels: define tzq_arm_dequant_row / tzq_arm_qmm_prepare / tzq_arm_qmm_rows /
 * tzq_arm_qmm_release here under #if defined(TZQ_ISA_NEON) || defined(TZQ_ISA_DOTPROD), set
 * TZQ_KERN_ARM to 1 for those macros and map TZQ_DEQUANT_ROW etc. to them (as for x86).
 */
#include "tzq_internal.h"

#if defined(TZQ_ISA_NEON) || defined(TZQ_ISA_DOTPROD)
TZQ_HIDDEN int tzq_arm_placeholder(void);
int tzq_arm_placeholder(void) { return 0; }
#else
typedef int tzq_qgemm_arm_empty_unit; /* ISO C forbids an empty translation unit */
#endif

/*
 * decode.c -- the decoder layers of one decode step (T = 1 new position) in one C call.
 *
 * tinyzq/model.py's decode branch (Transformer.hidden with a KV cache and one position) spends
 * as much time in the NumPy glue between its ~4 kernel calls per layer (RMSNorm, residual adds,
 * SiLU * up, slicing, wrapper checks) as in the kernels. tzq_decode_layers runs the same
 * operations for every layer, in this order, with x [B, d] the residual stream (updated in place):
 *
 *   h  = rms_norm(x) * attn_norm              rms_norm(v) = v * (1 / sqrt(mean(v^2) + eps))
 *   qkv = h . Wqkv^T (+ bias)                 int8-activation product (tzq_qmatmul)
 *   a  = attention(q, k, v) at position pos   tzq_attn_decode (RoPE, cache store, softmax . V)
 *   x += a . Wo^T (+ bias)
 *   h  = rms_norm(x) * mlp_norm
 *   gu = h . Wgate_up^T (+ bias)              gate rows first, then up rows
 *   x += (silu(g) * u) . Wdown^T (+ bias)     silu(g) = g / (1 + exp(-clip(g, -80, 80)))
 *
 * Every operation is fp32 (no FMA contraction), as in the NumPy code; only the order of the
 * sum of squares in rms_norm differs (8 independent lanes here, pairwise in NumPy), so results
 * match the NumPy path to float rounding (the products are the very same kernel calls).
 * Weights are read through the pointers in the tzq_layer structs on every call: in-place updates
 * of scales/zeros/norms (ZO training) are seen. Each product splits its rows over the thread pool.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "tzq_internal.h"

static void rms_norm_rows(const float *x, const float *w, int64_t B, int64_t d, float eps, float *h)
{
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * d;
        float *hb = h + b * d;
        const float var = tzq_sum_squares8(xb, d) / (float)d;
        const float inv = 1.0f / sqrtf(var + eps);
        for (int64_t j = 0; j < d; j++) hb[j] = (xb[j] * inv) * w[j];
    }
}

static int linear(const tzq_linear *L, const float *x, int64_t B, int64_t cols, int64_t rows, float *y)
{
    int rc;
    if (!L->codes || !L->scales || !L->zeros || L->cols != cols || L->rows != rows) return TZQ_EINVAL;
    rc = tzq_qmatmul(x, B, L->codes, L->scales, L->zeros, rows, cols, L->bits, L->group, y);
    if (rc == TZQ_OK && L->bias)
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < rows; j++) y[b * rows + j] += L->bias[j];
    return rc;
}

int tzq_decode_layers(float *x, int64_t B, int64_t d, const tzq_layer *layers, int64_t nlayers,
                      int64_t nh, int64_t nkv, int64_t hd, int64_t ffn, int64_t max_len, int64_t pos,
                      const float *cos, const float *sin, float eps, float attn_scale)
{
    const int64_t qw = nh * hd, kvw = nkv * hd, qkvw = qw + 2 * kvw;
    int64_t need;
    float *mem, *h, *qkv, *att, *tmp, *gu, *act;
    int rc = TZQ_OK;
    if (B < 0 || d <= 0 || nlayers < 0 || nh <= 0 || nkv <= 0 || nh % nkv || hd <= 0 || hd % 2 || ffn <= 0 ||
        pos < 0 || pos >= max_len || !(eps >= 0.0f))
        return TZQ_EINVAL;
    if (B == 0 || nlayers == 0) return TZQ_OK;
    need = B * (d + qkvw + qw + d + 2 * ffn + ffn);
    mem = (float *)malloc(sizeof(float) * (size_t)need);
    if (!mem) return TZQ_ENOMEM;
    h = mem;
    qkv = h + B * d;
    att = qkv + B * qkvw;
    tmp = att + B * qw;
    gu = tmp + B * d;
    act = gu + B * 2 * ffn;
    for (int64_t i = 0; i < nlayers && rc == TZQ_OK; i++) {
        const tzq_layer *L = layers + i;
        if (!L->attn_norm || !L->mlp_norm || !L->kcache || !L->vcache) {
            rc = TZQ_EINVAL;
            break;
        }
        rms_norm_rows(x, L->attn_norm, B, d, eps, h);
        if ((rc = linear(&L->qkv, h, B, d, qkvw, qkv)) != TZQ_OK) break;
        rc = tzq_attn_decode(qkv, qkv + qw, qkv + qw + kvw, B, nh, nkv, hd, qkvw, qkvw, qkvw, cos, sin,
                             L->kcache, L->vcache, max_len, pos, attn_scale, att);
        if (rc != TZQ_OK) break;
        if ((rc = linear(&L->o, att, B, qw, d, tmp)) != TZQ_OK) break;
        for (int64_t j = 0; j < B * d; j++) x[j] = x[j] + tmp[j];
        rms_norm_rows(x, L->mlp_norm, B, d, eps, h);
        if ((rc = linear(&L->gate_up, h, B, d, 2 * ffn, gu)) != TZQ_OK) break;
        for (int64_t b = 0; b < B; b++) {
            const float *g = gu + b * 2 * ffn, *u = g + ffn;
            float *a = act + b * ffn;
            for (int64_t j = 0; j < ffn; j++) {
                float c = g[j];
                c = c < -80.0f ? -80.0f : c > 80.0f ? 80.0f : c;
                a[j] = (g[j] / (1.0f + expf(-c))) * u[j];
            }
        }
        if ((rc = linear(&L->down, act, B, ffn, d, tmp)) != TZQ_OK) break;
        for (int64_t j = 0; j < B * d; j++) x[j] = x[j] + tmp[j];
    }
    free(mem);
    return rc;
}

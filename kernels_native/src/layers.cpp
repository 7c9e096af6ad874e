#include "layers.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gemm.h"

namespace mfb {

// ---------------------------------------------------------------------------------------
// activations

// exp(x) as 2^(x log2 e): an integer power of two times a degree-6 polynomial for 2^f,
// f in [0, 1) (relative error ~2e-7). Branch-free, so loops over it vectorise.
static inline float fast_exp(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    float t = x * 1.4426950408889634f;
    float fi = std::floor(t), f = t - fi;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    // a NaN x (a diverged run) leaves fi NaN, whose conversion to int is undefined: take 0,
    // p carries the NaN
    const int32_t e = fi == fi ? (int32_t)fi : 0;
    const uint32_t bits = (uint32_t)(e + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

static const float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)

// tanh(u) = 1 - 2 / (exp(2u) + 1)
static inline float gelu_tanh_inner(float v) { return 1.f - 2.f / (fast_exp(2.f * kGeluK * (v + 0.044715f * v * v * v)) + 1.f); }

// Calls body(f) with f(v, &deriv) = act(v) (and act'(v) in deriv) fixed at compile time, so
// each loop below is specialised per activation and vectorises.
template <typename Body>
static void with_act(ActKind act, Body body) {
    switch (act) {
        case ActKind::GeluTanh:
            body([](float v, float* deriv) {
                float th = gelu_tanh_inner(v);
                *deriv = 0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * kGeluK * (1.f + 3.f * 0.044715f * v * v);
                return 0.5f * v * (1.f + th);
            });
            break;
        case ActKind::GeluErf:
            body([](float v, float* deriv) {
                float c = 0.5f * (1.f + std::erf(v * 0.70710678118654752f));
                *deriv = c + v * std::exp(-0.5f * v * v) * 0.3989422804014327f;
                return v * c;
            });
            break;
        case ActKind::Silu:
            body([](float v, float* deriv) {
                float s = 1.f / (1.f + fast_exp(-v));
                *deriv = s * (1.f + v * (1.f - s));
                return v * s;
            });
            break;
    }
}

void act_forward_deriv(float* out, float* deriv, const float* x, size_t n, ActKind act) {
    with_act(act, [&](auto f) {
#pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < n; i++) out[i] = f(x[i], &deriv[i]);
    });
}

void gated_forward(float* out, const float* gate, const float* up, size_t n, ActKind act) {
    with_act(act, [&](auto f) {
#pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < n; i++) {
            float d;
            out[i] = f(gate[i], &d) * up[i];
        }
    });
}

void gated_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n,
                    ActKind act) {
    with_act(act, [&](auto f) {
#pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < n; i++) {
            float g = dout[i], d;
            float a = f(gate[i], &d);
            dup[i] = g * a;
            dgate[i] = g * up[i] * d;
        }
    });
}

// Threads for a region indexing per-thread scratch sized for `capacity` threads: the thread
// count may have been raised since the scratch was planned.
static inline int scratch_threads(int capacity) { return std::max(1, std::min(omp_get_max_threads(), capacity)); }

// ---------------------------------------------------------------------------------------
// LayerNorm

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int N,
                       int C, float eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* xr = x + (size_t)n * C;
        float m = 0.f;
        for (int i = 0; i < C; i++) m += xr[i];
        m /= C;
        float v = 0.f;
        for (int i = 0; i < C; i++) v += (xr[i] - m) * (xr[i] - m);
        float s = 1.f / std::sqrt(v / C + eps);
        float* o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = (xr[i] - m) * s * w[i] + b[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

void layernorm_apply(float* out, const float* mean, const float* rstd, const float* x, const float* w, const float* b,
                     int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* xr = x + (size_t)n * C;
        float* o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = (xr[i] - mean[n]) * rstd[n] * w[i] + b[i];
    }
}

void layernorm_backward(float* dx, float* dw, float* db, float* part, int part_threads, const float* dout, const float* x,
                        const float* w, const float* mean, const float* rstd, int N, int C) {
    int nt = 1;
#pragma omp parallel num_threads(scratch_threads(part_threads))
    {
        int tid = omp_get_thread_num();
#pragma omp single
        nt = omp_get_num_threads();
        float* pdw = part + (size_t)tid * 2 * C;
        float* pdb = pdw + C;
        std::fill(pdw, pdw + 2 * C, 0.f);
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float* xr = x + (size_t)n * C;
            const float* g = dout + (size_t)n * C;
            float* d = dx + (size_t)n * C;
            float m = mean[n], s = rstd[n];
            float a = 0.f, bb = 0.f;
            for (int i = 0; i < C; i++) {
                float dn = w[i] * g[i];
                a += dn;
                bb += dn * (xr[i] - m) * s;
            }
            a /= C;
            bb /= C;
            for (int i = 0; i < C; i++) {
                float norm = (xr[i] - m) * s;
                d[i] += (w[i] * g[i] - a - norm * bb) * s;
                pdw[i] += norm * g[i];
                pdb[i] += g[i];
            }
        }
    }
    if (dw)
        for (int t = 0; t < nt; t++)
            for (int i = 0; i < C; i++) {
                dw[i] += part[(size_t)t * 2 * C + i];
                db[i] += part[(size_t)t * 2 * C + C + i];
            }
}

// ---------------------------------------------------------------------------------------
// RMSNorm

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int N, int C, float eps, bool plus_one) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* xr = x + (size_t)n * C;
        float ss = 0.f;
        for (int i = 0; i < C; i++) ss += xr[i] * xr[i];
        rstd[n] = 1.f / std::sqrt(ss / C + eps);
    }
    rmsnorm_apply(out, rstd, x, w, N, C, plus_one);
}

void rmsnorm_apply(float* out, const float* rstd, const float* x, const float* w, int N, int C, bool plus_one) {
    const float g0 = plus_one ? 1.f : 0.f;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* xr = x + (size_t)n * C;
        float* o = out + (size_t)n * C;
        float s = rstd[n];
        for (int i = 0; i < C; i++) o[i] = xr[i] * s * (g0 + w[i]);
    }
}

// y = x r g with r = (mean(x^2) + eps)^-1/2:  dx = r (g dy) - x r^3 mean(g dy x),  dg = sum_n dy x r.
void rmsnorm_backward(float* dx, float* dw, float* part, int part_threads, const float* dout, const float* x, const float* w,
                      const float* rstd, int N, int C, bool plus_one, bool accumulate) {
    const float g0 = plus_one ? 1.f : 0.f;
    int nt = 1;
#pragma omp parallel num_threads(scratch_threads(part_threads))
    {
        int tid = omp_get_thread_num();
#pragma omp single
        nt = omp_get_num_threads();
        float* pdw = part + (size_t)tid * C;
        std::fill(pdw, pdw + C, 0.f);
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float* xr = x + (size_t)n * C;
            const float* g = dout + (size_t)n * C;
            float* d = dx + (size_t)n * C;
            float r = rstd[n], dot = 0.f;
            for (int i = 0; i < C; i++) dot += g[i] * (g0 + w[i]) * xr[i];
            float c = dot / C * r * r * r;
            for (int i = 0; i < C; i++) {  // g[i] is read before d[i] is written: dx may alias dout
                float gi = g[i];
                pdw[i] += gi * xr[i] * r;
                float v = r * gi * (g0 + w[i]) - xr[i] * c;
                d[i] = accumulate ? d[i] + v : v;
            }
        }
    }
    if (dw)
        for (int t = 0; t < nt; t++)
            for (int i = 0; i < C; i++) dw[i] += part[(size_t)t * C + i];
}

// ---------------------------------------------------------------------------------------
// rotary embedding

// float32 throughout, in transformers' order of operations, so the tables match its own.
void rope_tables(float* cos, float* sin, int T, int head_dim, float theta, float factor) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float inv_freq = 1.f / std::pow(theta, (float)(2 * i) / (float)head_dim);
        inv_freq /= factor;
        for (int t = 0; t < T; t++) {
            float f = (float)t * inv_freq;
            cos[(size_t)t * half + i] = std::cos(f);
            sin[(size_t)t * half + i] = std::sin(f);
        }
    }
}

// Rotate each pair (x[i], x[i + hd/2]) by +angle (forward) or -angle (backward).
static void rope_rotate(float* x, const float* cos, const float* sin, int N, int T, int heads, int hd, int ld,
                        float sign) {
    const int half = hd / 2;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* c = cos + (size_t)(n % T) * half;
        const float* s = sin + (size_t)(n % T) * half;
        for (int h = 0; h < heads; h++) {
            float* r = x + (size_t)n * ld + (size_t)h * hd;
            for (int i = 0; i < half; i++) {
                float a = r[i], b = r[i + half], si = sign * s[i];
                r[i] = a * c[i] - b * si;
                r[i + half] = b * c[i] + a * si;
            }
        }
    }
}

void rope_forward(float* x, const float* cos, const float* sin, int N, int T, int heads, int hd, int ld) {
    rope_rotate(x, cos, sin, N, T, heads, hd, ld, 1.f);
}

void rope_backward(float* d, const float* cos, const float* sin, int N, int T, int heads, int hd, int ld) {
    rope_rotate(d, cos, sin, N, T, heads, hd, ld, -1.f);
}

// ---------------------------------------------------------------------------------------
// attention

static inline int first_key(int i, int window) { return window > 0 ? std::max(0, i - window + 1) : 0; }

void attention_forward(float* y, float* probs, const float* q, const float* k, const float* v, int B, int T, int H,
                       int KV, int hd, int ldq, int ldkv, int ldy, float scale, int window) {
    const int group = H / KV;
#pragma omp parallel for schedule(dynamic)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H, g = h / group;
        const float* qh = q + (size_t)b * T * ldq + (size_t)h * hd;
        const float* kh = k + (size_t)b * T * ldkv + (size_t)g * hd;
        const float* vh = v + (size_t)b * T * ldkv + (size_t)g * hd;
        float* P = probs + (size_t)bh * T * T;
        sgemm(false, true, T, T, hd, scale, qh, ldq, kh, ldkv, 0.f, P, T);
        for (int i = 0; i < T; i++) {  // masked softmax of row i over keys j0..i
            float* row = P + (size_t)i * T;
            int j0 = first_key(i, window);
            float mx = row[j0];
            for (int j = j0 + 1; j <= i; j++) mx = std::max(mx, row[j]);
            for (int j = j0; j <= i; j++) row[j] = fast_exp(row[j] - mx);
            float sum = 0.f;
            for (int j = j0; j <= i; j++) sum += row[j];
            float inv = 1.f / sum;
            for (int j = 0; j < j0; j++) row[j] = 0.f;
            for (int j = j0; j <= i; j++) row[j] *= inv;
            for (int j = i + 1; j < T; j++) row[j] = 0.f;
        }
        sgemm(false, false, T, hd, T, 1.f, P, T, vh, ldkv, 0.f, y + (size_t)b * T * ldy + (size_t)h * hd, ldy);
    }
}

// Parallel over (sequence, kv head): the query heads of one group add into the same dk, dv.
void attention_backward(float* dq, float* dk, float* dv, float* dS, int dS_threads, const float* dy, const float* q,
                        const float* k, const float* v, const float* probs, int B, int T, int H, int KV, int hd, int ldq,
                        int ldkv, int ldy, float scale, int window) {
    const int group = H / KV;
#pragma omp parallel for schedule(dynamic) num_threads(scratch_threads(dS_threads))
    for (int bg = 0; bg < B * KV; bg++) {
        int b = bg / KV, g = bg % KV;
        size_t kvo = (size_t)b * T * ldkv + (size_t)g * hd;
        const float *kh = k + kvo, *vh = v + kvo;
        float *dkh = dk + kvo, *dvh = dv + kvo;
        float* S = dS + (size_t)omp_get_thread_num() * T * T;
        for (int h = g * group; h < (g + 1) * group; h++) {
            size_t qo = (size_t)b * T * ldq + (size_t)h * hd;
            const float* dyh = dy + (size_t)b * T * ldy + (size_t)h * hd;
            const float* P = probs + ((size_t)b * H + h) * T * T;
            float beta = h == g * group ? 0.f : 1.f;
            sgemm(false, true, T, T, hd, 1.f, dyh, ldy, vh, ldkv, 0.f, S, T);  // dP = dY V^T
            sgemm(true, false, T, hd, T, 1.f, P, T, dyh, ldy, beta, dvh, ldkv);  // dV += P^T dY
            for (int i = 0; i < T; i++) {  // softmax backward: dS = P (dP - sum_j P dP), times scale
                const float* p = P + (size_t)i * T;
                float* d = S + (size_t)i * T;
                int j0 = first_key(i, window);
                float s = 0.f;
                for (int j = j0; j <= i; j++) s += p[j] * d[j];
                for (int j = 0; j < j0; j++) d[j] = 0.f;
                for (int j = j0; j <= i; j++) d[j] = p[j] * (d[j] - s) * scale;
                for (int j = i + 1; j < T; j++) d[j] = 0.f;
            }
            sgemm(false, false, T, hd, T, 1.f, S, T, kh, ldkv, 0.f, dq + qo, ldq);   // dQ = dS K
            sgemm(true, false, T, hd, T, 1.f, S, T, q + qo, ldq, beta, dkh, ldkv);  // dK += dS^T Q
        }
    }
}

// Memory-efficient attention: per (sequence, head, block of query rows), key blocks in order.
// Scratch per thread: two block x block tiles (scores or P, and dP) and two block-long vectors.
size_t attention_me_scratch(int T, int block) {
    size_t b = (size_t)std::min(block, T);
    return 2 * b * b + 2 * b;
}

// Keys query row qi sees inside the key block [j0, j0 + nk): [lo, hi] relative to j0 (lo > hi: none).
static inline void visible(int qi, int j0, int nk, int window, int& lo, int& hi) {
    lo = std::max(first_key(qi, window), j0) - j0;
    hi = std::min(qi, j0 + nk - 1) - j0;
}

void attention_me_forward(float* y, float* lse, float* scratch, int threads, const float* q, const float* k,
                          const float* v, int B, int T, int H, int KV, int hd, int ldq, int ldkv, int ldy, float scale,
                          int window, int block) {
    const int group = H / KV, bs = std::min(block, T);
    const size_t per = attention_me_scratch(T, block);
#pragma omp parallel for schedule(dynamic) num_threads(scratch_threads(threads))
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H, g = h / group;
        const float* qh = q + (size_t)b * T * ldq + (size_t)h * hd;
        const float* kh = k + (size_t)b * T * ldkv + (size_t)g * hd;
        const float* vh = v + (size_t)b * T * ldkv + (size_t)g * hd;
        float* yh = y + (size_t)b * T * ldy + (size_t)h * hd;
        float* S = scratch + (size_t)omp_get_thread_num() * per;
        float *m = S + (size_t)bs * bs, *l = m + bs;  // running max and sum of each query row
        for (int i0 = 0; i0 < T; i0 += bs) {
            const int nq = std::min(bs, T - i0);
            for (int i = 0; i < nq; i++) {
                m[i] = -INFINITY, l[i] = 0.f;
                std::fill(yh + (size_t)(i0 + i) * ldy, yh + (size_t)(i0 + i) * ldy + hd, 0.f);
            }
            for (int j0 = first_key(i0, window); j0 < i0 + nq; j0 += bs) {
                const int nk = std::min(bs, T - j0);
                sgemm(false, true, nq, nk, hd, scale, qh + (size_t)i0 * ldq, ldq, kh + (size_t)j0 * ldkv, ldkv, 0.f, S, nk);
                for (int i = 0; i < nq; i++) {  // rescale the row's sums to the new max, add this block
                    float* row = S + (size_t)i * nk;
                    int lo, hi;
                    visible(i0 + i, j0, nk, window, lo, hi);
                    if (lo > hi) {
                        std::fill(row, row + nk, 0.f);
                        continue;
                    }
                    float mx = m[i];
                    for (int j = lo; j <= hi; j++) mx = std::max(mx, row[j]);
                    const float c = m[i] == -INFINITY ? 0.f : fast_exp(m[i] - mx);
                    float sum = 0.f;
                    for (int j = 0; j < lo; j++) row[j] = 0.f;
                    for (int j = lo; j <= hi; j++) sum += (row[j] = fast_exp(row[j] - mx));
                    for (int j = hi + 1; j < nk; j++) row[j] = 0.f;
                    l[i] = l[i] * c + sum;
                    m[i] = mx;
                    if (c != 1.f)
                        for (float *yr = yh + (size_t)(i0 + i) * ldy, *e = yr + hd; yr < e; yr++) *yr *= c;
                }
                sgemm(false, false, nq, hd, nk, 1.f, S, nk, vh + (size_t)j0 * ldkv, ldkv, 1.f, yh + (size_t)i0 * ldy, ldy);
            }
            for (int i = 0; i < nq; i++) {
                const float inv = 1.f / l[i];
                for (float *yr = yh + (size_t)(i0 + i) * ldy, *e = yr + hd; yr < e; yr++) *yr *= inv;
                lse[(size_t)bh * T + i0 + i] = m[i] + std::log(l[i]);
            }
        }
    }
}

// Parallel over (sequence, kv head) as the standard backward: dk, dv of a group belong to one thread.
void attention_me_backward(float* dq, float* dk, float* dv, float* scratch, int threads, const float* dy, const float* q,
                           const float* k, const float* v, const float* y, const float* lse, int B, int T, int H, int KV,
                           int hd, int ldq, int ldkv, int ldy, float scale, int window, int block) {
    const int group = H / KV, bs = std::min(block, T);
    const size_t per = attention_me_scratch(T, block);
#pragma omp parallel for schedule(dynamic) num_threads(scratch_threads(threads))
    for (int bg = 0; bg < B * KV; bg++) {
        int b = bg / KV, g = bg % KV;
        size_t kvo = (size_t)b * T * ldkv + (size_t)g * hd;
        const float *kh = k + kvo, *vh = v + kvo;
        float *dkh = dk + kvo, *dvh = dv + kvo;
        float* P = scratch + (size_t)omp_get_thread_num() * per;
        float *dP = P + (size_t)bs * bs, *D = dP + (size_t)bs * bs;
        for (int t = 0; t < T; t++) {
            std::fill(dkh + (size_t)t * ldkv, dkh + (size_t)t * ldkv + hd, 0.f);
            std::fill(dvh + (size_t)t * ldkv, dvh + (size_t)t * ldkv + hd, 0.f);
        }
        for (int h = g * group; h < (g + 1) * group; h++) {
            const float* qh = q + (size_t)b * T * ldq + (size_t)h * hd;
            float* dqh = dq + (size_t)b * T * ldq + (size_t)h * hd;
            const float* dyh = dy + (size_t)b * T * ldy + (size_t)h * hd;
            const float* yh = y + (size_t)b * T * ldy + (size_t)h * hd;
            const float* L = lse + ((size_t)b * H + h) * T;
            for (int t = 0; t < T; t++) std::fill(dqh + (size_t)t * ldq, dqh + (size_t)t * ldq + hd, 0.f);
            for (int i0 = 0; i0 < T; i0 += bs) {
                const int nq = std::min(bs, T - i0);
                for (int i = 0; i < nq; i++) {  // D = rowsum(dy * y)
                    const float *a = dyh + (size_t)(i0 + i) * ldy, *o = yh + (size_t)(i0 + i) * ldy;
                    float s = 0.f;
                    for (int d = 0; d < hd; d++) s += a[d] * o[d];
                    D[i] = s;
                }
                for (int j0 = first_key(i0, window); j0 < i0 + nq; j0 += bs) {
                    const int nk = std::min(bs, T - j0);
                    const float *qb = qh + (size_t)i0 * ldq, *kb = kh + (size_t)j0 * ldkv;
                    sgemm(false, true, nq, nk, hd, scale, qb, ldq, kb, ldkv, 0.f, P, nk);  // scores again
                    sgemm(false, true, nq, nk, hd, 1.f, dyh + (size_t)i0 * ldy, ldy, vh + (size_t)j0 * ldkv, ldkv, 0.f, dP, nk);
                    for (int i = 0; i < nq; i++) {  // P = exp(S - lse); dS = P (dP - D) scale
                        float *p = P + (size_t)i * nk, *d = dP + (size_t)i * nk;
                        int lo, hi;
                        visible(i0 + i, j0, nk, window, lo, hi);
                        const float li = L[i0 + i];
                        for (int j = 0; j < nk; j++) {
                            const bool in = j >= lo && j <= hi;
                            p[j] = in ? fast_exp(p[j] - li) : 0.f;
                            d[j] = in ? p[j] * (d[j] - D[i]) * scale : 0.f;
                        }
                    }
                    sgemm(true, false, nk, hd, nq, 1.f, P, nk, dyh + (size_t)i0 * ldy, ldy, 1.f, dvh + (size_t)j0 * ldkv, ldkv);
                    sgemm(false, false, nq, hd, nk, 1.f, dP, nk, kb, ldkv, 1.f, dqh + (size_t)i0 * ldq, ldq);
                    sgemm(true, false, nk, hd, nq, 1.f, dP, nk, qb, ldq, 1.f, dkh + (size_t)j0 * ldkv, ldkv);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// cross-entropy

double cross_entropy_chunk(float* logits, const int* targets, int rows, int V, bool backward, float grad_scale) {
    double loss = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : loss)
    for (int i = 0; i < rows; i++) {
        float* row = logits + (size_t)i * V;
        int tgt = targets[i];
        float mx = row[0];
        for (int j = 1; j < V; j++) mx = std::max(mx, row[j]);
        float lt = tgt >= 0 ? row[tgt] : 0.f;
        for (int j = 0; j < V; j++) row[j] = fast_exp(row[j] - mx);
        double sum = 0.0;
        for (int j = 0; j < V; j++) sum += row[j];
        if (tgt >= 0) loss += std::log(sum) + mx - lt;
        if (backward) {
            if (tgt < 0) {
                std::fill(row, row + V, 0.f);
            } else {
                float inv = (float)(grad_scale / sum);
                for (int j = 0; j < V; j++) row[j] *= inv;
                row[tgt] -= grad_scale;
            }
        }
    }
    return loss;
}

}  // namespace mfb

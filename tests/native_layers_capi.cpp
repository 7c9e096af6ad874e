// Test-only C entry points to the native layer kernels (kernels_native/src/layers.h), so
// tests/test_native_layers.py can call them through ctypes on numpy arrays.
#include <omp.h>

#include "layers.h"
#include "gemm.h"

using namespace mfb;

extern "C" {
void c_set_threads(int n) { set_threads(n); }
void c_act_forward_deriv(float* out, float* deriv, const float* x, long n, int act) {
    act_forward_deriv(out, deriv, x, n, (ActKind)act);
}
void c_gated_forward(float* out, const float* gate, const float* up, long n, int act) {
    gated_forward(out, gate, up, n, (ActKind)act);
}
void c_gated_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, long n, int act) {
    gated_backward(dgate, dup, dout, gate, up, n, (ActKind)act);
}
void c_layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int N, int C,
                         float eps) {
    layernorm_forward(out, mean, rstd, x, w, b, N, C, eps);
}
void c_layernorm_backward(float* dx, float* dw, float* db, float* part, const float* dout, const float* x, const float* w,
                          const float* mean, const float* rstd, int N, int C) {
    layernorm_backward(dx, dw, db, part, omp_get_max_threads(), dout, x, w, mean, rstd, N, C);
}
void c_rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int N, int C, float eps, int plus_one) {
    rmsnorm_forward(out, rstd, x, w, N, C, eps, plus_one);
}
void c_rmsnorm_apply(float* out, const float* rstd, const float* x, const float* w, int N, int C, int plus_one) {
    rmsnorm_apply(out, rstd, x, w, N, C, plus_one);
}
void c_rmsnorm_backward(float* dx, float* dw, float* part, const float* dout, const float* x, const float* w,
                        const float* rstd, int N, int C, int plus_one, int accumulate) {
    rmsnorm_backward(dx, dw, part, omp_get_max_threads(), dout, x, w, rstd, N, C, plus_one, accumulate);
}
void c_rope_tables(float* cos, float* sin, int T, int hd, float theta, float factor) {
    rope_tables(cos, sin, T, hd, theta, factor);
}
void c_rope_forward(float* x, const float* cos, const float* sin, int N, int T, int heads, int hd, int ld) {
    rope_forward(x, cos, sin, N, T, heads, hd, ld);
}
void c_rope_backward(float* d, const float* cos, const float* sin, int N, int T, int heads, int hd, int ld) {
    rope_backward(d, cos, sin, N, T, heads, hd, ld);
}
void c_attention_forward(float* y, float* probs, const float* q, const float* k, const float* v, int B, int T, int H,
                         int KV, int hd, int ldq, int ldkv, int ldy, float scale, int window) {
    attention_forward(y, probs, q, k, v, B, T, H, KV, hd, ldq, ldkv, ldy, scale, window);
}
void c_attention_backward(float* dq, float* dk, float* dv, float* dS, const float* dy, const float* q, const float* k,
                          const float* v, const float* probs, int B, int T, int H, int KV, int hd, int ldq, int ldkv,
                          int ldy, float scale, int window) {
    attention_backward(dq, dk, dv, dS, omp_get_max_threads(), dy, q, k, v, probs, B, T, H, KV, hd, ldq, ldkv, ldy, scale, window);
}
// dS holds scratch for dS_threads threads only
void c_attention_backward_scratch(float* dq, float* dk, float* dv, float* dS, int dS_threads, const float* dy, const float* q,
                                  const float* k, const float* v, const float* probs, int B, int T, int H, int KV, int hd,
                                  int ldq, int ldkv, int ldy, float scale, int window) {
    attention_backward(dq, dk, dv, dS, dS_threads, dy, q, k, v, probs, B, T, H, KV, hd, ldq, ldkv, ldy, scale, window);
}
long c_attention_me_scratch(int T, int block) { return (long)attention_me_scratch(T, block); }
void c_attention_me_forward(float* y, float* lse, float* scratch, int threads, const float* q, const float* k, const float* v,
                            int B, int T, int H, int KV, int hd, int ldq, int ldkv, int ldy, float scale, int window,
                            int block) {
    attention_me_forward(y, lse, scratch, threads, q, k, v, B, T, H, KV, hd, ldq, ldkv, ldy, scale, window, block);
}
void c_attention_me_backward(float* dq, float* dk, float* dv, float* scratch, int threads, const float* dy, const float* q,
                             const float* k, const float* v, const float* y, const float* lse, int B, int T, int H, int KV,
                             int hd, int ldq, int ldkv, int ldy, float scale, int window, int block) {
    attention_me_backward(dq, dk, dv, scratch, threads, dy, q, k, v, y, lse, B, T, H, KV, hd, ldq, ldkv, ldy, scale, window,
                          block);
}
double c_cross_entropy_chunk(float* logits, const int* targets, int rows, int V, int backward, float grad_scale) {
    return cross_entropy_chunk(logits, targets, rows, V, backward, grad_scale);
}
}

// Per-layer kernels of the transformer families (GPT-2, Qwen 2.5, Gemma 3): free functions,
// one forward and one backward each, shapes in the signature, no allocation (the caller
// passes every buffer, planned up front). Rows are tokens: N = B * T rows, row n is
// position n % T of sequence n / T. Parallel with OpenMP over rows (or heads).
#pragma once
#include <cstddef>

namespace mfb {

// Elementwise activations: GPT-2's gelu (tanh approximation or erf), and the gate of the
// gated MLPs: Qwen's SiLU (SwiGLU) and Gemma's tanh-GELU (GeGLU).
enum class ActKind { GeluTanh, GeluErf, Silu };

// out = act(x) and deriv = act'(x) in one pass (GPT-2 keeps the derivative for backward).
void act_forward_deriv(float* out, float* deriv, const float* x, size_t n, ActKind act);

// Gated MLP activation: out = act(gate) * up. Backward from dout to dgate and dup
// (overwritten; dgate may alias dout).
void gated_forward(float* out, const float* gate, const float* up, size_t n, ActKind act);
void gated_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n,
                    ActKind act);

// LayerNorm over rows of width C, keeping mean and rstd [N] for backward; apply recomputes
// the output from them. Backward: dx += LN'(dout); dw, db += (when dw is given).
// part: part_threads x 2C floats of scratch; at most part_threads threads run it.
void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int N,
                       int C, float eps);
void layernorm_apply(float* out, const float* mean, const float* rstd, const float* x, const float* w, const float* b,
                     int N, int C);
void layernorm_backward(float* dx, float* dw, float* db, float* part, int part_threads, const float* dout, const float* x,
                        const float* w, const float* mean, const float* rstd, int N, int C);

// RMSNorm over rows of width C: out = x / sqrt(mean(x^2) + eps) * g, where g = w, or
// g = 1 + w for Gemma (plus_one). Keeps rstd [N] for backward.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int N, int C, float eps, bool plus_one);
// Recompute the output from the saved rstd (instead of keeping it).
void rmsnorm_apply(float* out, const float* rstd, const float* x, const float* w, int N, int C, bool plus_one);
// dx = (accumulate ? dx : 0) + RMSNorm'(dout); dw += weight gradient when dw is given.
// Without accumulate, dx may be dout itself (in place).
// part: part_threads x C floats of scratch for per-thread partial sums of dw.
void rmsnorm_backward(float* dx, float* dw, float* part, int part_threads, const float* dout, const float* x, const float* w,
                      const float* rstd, int N, int C, bool plus_one, bool accumulate);

// Rotary embedding tables as transformers computes them, for positions 0..T-1:
// inv_freq[i] = 1 / (theta ^ (2i / head_dim)) / factor (factor: "linear" rope scaling,
// 1 for the default rope), cos/sin [T, head_dim / 2] of position * inv_freq.
void rope_tables(float* cos, float* sin, int T, int head_dim, float theta, float factor);
// In place on x [N rows, stride ld], heads of width hd packed from column 0: HF's
// rotate_half convention, y = x cos + rotate_half(x) sin, with position n % T.
void rope_forward(float* x, const float* cos, const float* sin, int N, int T, int heads, int hd, int ld);
// The inverse rotation, which is the rotation's transpose: d(x) from d(y), in place.
void rope_backward(float* d, const float* cos, const float* sin, int N, int T, int heads, int hd, int ld);

// Causal grouped-query attention, standard (the probabilities are kept for backward).
// q [N, ldq] holds H heads of width hd, k and v [N, ldkv] hold KV heads (query head h reads
// kv head h / (H / KV)); y [N, ldy]; probs [B, H, T, T]. Scores are scale * q.k. With
// window > 0, query i sees keys j with i - window < j <= i (transformers' sliding window:
// the window counts the query itself); window 0: all j <= i.
void attention_forward(float* y, float* probs, const float* q, const float* k, const float* v, int B, int T, int H,
                       int KV, int hd, int ldq, int ldkv, int ldy, float scale, int window);
// From dy to dq, dk, dv (overwritten; same layouts as q, k, v). dS: dS_threads x T x T
// scratch; at most dS_threads threads run it.
void attention_backward(float* dq, float* dk, float* dv, float* dS, int dS_threads, const float* dy, const float* q, const float* k,
                        const float* v, const float* probs, int B, int T, int H, int KV, int hd, int ldq, int ldkv,
                        int ldy, float scale, int window);

// Memory-efficient attention (same masks, GQA and layouts as above): never forms the T x T
// scores. Forward streams key blocks of `block` keys per query block with an online softmax
// and keeps only lse [B, H, T], the log-sum-exp of each row's scaled scores. Backward
// recomputes the probabilities block by block from q, k and lse (flash-attention 2:
// D = rowsum(dy * y), dS = P (dP - D)). scratch: threads x attention_me_scratch(T, block)
// floats; at most `threads` threads run it.
size_t attention_me_scratch(int T, int block);
void attention_me_forward(float* y, float* lse, float* scratch, int threads, const float* q, const float* k,
                          const float* v, int B, int T, int H, int KV, int hd, int ldq, int ldkv, int ldy, float scale,
                          int window, int block);
void attention_me_backward(float* dq, float* dk, float* dv, float* scratch, int threads, const float* dy, const float* q,
                           const float* k, const float* v, const float* y, const float* lse, int B, int T, int H, int KV,
                           int hd, int ldq, int ldkv, int ldy, float scale, int window, int block);
// The key/query block the trainer uses (mfbench.plan.compile.ATTN_BLOCK).
constexpr int kAttnBlock = 64;

// Cross-entropy of `rows` rows of logits [rows, V] against targets (-1: not counted).
// Returns the summed loss of the counted rows. With backward, the logits are overwritten by
// grad_scale * d(loss)/d(logits) (zero rows for uncounted targets), so the caller can chunk
// the LM head: only rows x V logits ever exist.
double cross_entropy_chunk(float* logits, const int* targets, int rows, int V, bool backward, float grad_scale);

}  // namespace mfb

#include "optimizer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace mfb {

double lr_at(int step, int steps, int warmup, double lr, double min_lr, const std::string& sched) {
    if (step < warmup) return lr * (step + 1) / warmup;
    if (sched == "constant") return lr;
    double prog = (double)(step - warmup) / std::max(1, steps - warmup);
    if (sched == "linear") return lr + (min_lr - lr) * prog;
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * prog));
}

double grad_sq(const TrainSegment& s) {
    double acc = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : acc)
    for (size_t i = 0; i < s.n; i++) acc += (double)s.g[i] * s.g[i];
    return acc;
}

double grad_norm(const std::vector<TrainSegment>& segs) {
    double total = 0.0;
    for (const TrainSegment& s : segs) total += grad_sq(s);
    return std::sqrt(total);
}

// Decoupled decay, bias-corrected moments.
void AdamW::update(std::vector<TrainSegment>& segs, const std::string& shard, int t, float lr, float gscale) const {
    size_t off = 0;
    for (TrainSegment& s : segs) {
        if (s.shard == shard) apply(s, 0, s.n, m + off, v + off, m + off, v + off, s.p, t, lr, gscale);
        off += s.n;
    }
}

void AdamW::apply(const TrainSegment& s, size_t first, size_t n, const float* m_in, const float* v_in, float* m_out,
                  float* v_out, float* p_out, int t, float lr, float gscale) const {
    const float bc1 = 1.f - std::pow(b1, (float)t), bc2 = 1.f - std::pow(b2, (float)t);
    const float step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
    const float decay = s.decay ? 1.f - lr * wd : 1.f;
    const float *p = s.p + first, *gr = s.g + first;
#pragma omp parallel for schedule(static) if (!omp_in_parallel())  // a slice of Shards::update: this thread's alone
    for (size_t i = 0; i < n; i++) {
        float g = gr[i] * gscale;
        float mm = b1 * m_in[i] + (1.f - b1) * g;
        float vv = b2 * v_in[i] + (1.f - b2) * g * g;
        m_out[i] = mm, v_out[i] = vv;
        p_out[i] = p[i] * decay - step_size * mm / (std::sqrt(vv) / bc2_sqrt + eps);
    }
}

}  // namespace mfb

// AdamW (as torch.optim.AdamW), the learning-rate schedule and the global gradient norm.
#pragma once
#include <string>
#include <vector>

#include "model.h"

namespace mfb {

// Learning rate at step `step` (0-based): linear warmup, then constant, linear or cosine
// decay to min_lr.
double lr_at(int step, int steps, int warmup, double lr, double min_lr, const std::string& schedule);

// sqrt of the sum of squares of every gradient: of the segments' sums of squares, in order.
double grad_norm(const std::vector<TrainSegment>& segs);
double grad_sq(const TrainSegment& s);

struct AdamW {
    float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.f;
    // The moments m, v: one value per trainable value, segments in order.
    float *m = nullptr, *v = nullptr;
    // Update the segments whose shard is `shard`, at step t (1-based), every gradient times
    // gscale first (global-norm clipping, fused to save a pass).
    void update(std::vector<TrainSegment>& segs, const std::string& shard, int t, float lr, float gscale) const;
    // Elements [first, first + n) of one segment, its moments read from m_in[0, n), v_in[0, n)
    // and written to m_out, v_out, its values written to p_out[0, n) (any of them may be
    // where it reads: s.p + first, or s.g + first over the gradient it has used).
    void apply(const TrainSegment& s, size_t first, size_t n, const float* m_in, const float* v_in, float* m_out,
               float* v_out, float* p_out, int t, float lr, float gscale) const;
};

}  // namespace mfb

// The training run: model and data from RunOptions, the step loop over the plan's
// micro-batches and update ops, the trace (trace.jsonl), the RSS sampler, summary.json and
// the saved model or adapter.
#pragma once
#include "config.h"

namespace mfb {

// Runs (or, with plan_only, prints the plan of) one training run. Throws Error on bad input.
int train(const RunOptions& opt);

}  // namespace mfb

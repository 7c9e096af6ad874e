// The checks every run passes before anything is allocated: its options against the workload
// schema's rules (mfbench/spec/workload.py), the same for flags and run specs, and its sizes
// in 64-bit checked arithmetic, so no product of config fields and options wraps.
#pragma once
#include <cstdint>
#include <string>

#include "config.h"

namespace mfb {

struct Config;
struct Plan;

// At most this many OpenMP threads. Oversubscribing the cores is allowed (a run spec made for
// an 8-core phone runs on a 2-core host), but each thread reserves a stack (8 MB by default)
// and its share of the per-thread scratch, and libgomp exits when it cannot start a team
// (100,000 threads; 1,024 under a 6 GB address-space limit). Phones have about ten cores.
constexpr int kMaxThreads = 256;

// Elements of any buffer, and any size the kernels hold in an `int` (rows B x T, widths
// heads x head_dim): the kernels index with 32-bit ints.
constexpr uint64_t kMaxElements = INT32_MAX;

// Layers, and micro-batches x layers: the plan lists every op of a step (about 40 a layer and
// micro-batch). The deepest open models have about 130 layers.
constexpr uint64_t kMaxLayers = 1024, kMaxLayerPasses = 65536;

// The options as the workload schema checks them, named as written: `--lr` for flags,
// `optimizer.lr` in the run spec o.spec_path. Throws Error (exit 2) on the first bad one.
// Two values the schema refuses are kept for the numerics checks: steps 0 (no step: the
// loaded model's --dump-logits) and lr 0 (gradients of an unchanged model).
void validate_options(const RunOptions& o);

// --lora-init DIR: the adapter's DIR/adapter_config.json decides rank, alpha and targets. A
// flag that was given (r_given, ...) must agree with it; a setting that changes what the
// adapter computes and the trainer does not implement (rsLoRA, DoRA, per-module ranks, bias,
// modules_to_save, ...) is an error naming the field.
void read_adapter_config(RunOptions& o, bool r_given, bool alpha_given, bool targets_given);

// The run's sizes on this model (T: the resolved sequence length): every product the plan and
// the kernels form must fit kMaxElements. Throws Error naming the config fields or options.
void check_sizes(const Config& c, const RunOptions& o, int T);

// The safety net after planning: every buffer within kMaxElements.
void check_plan(const Plan& p, const std::string& config_path);

}  // namespace mfb

// The options of one run (RunOptions), from command-line flags or from a run spec JSON
// (docs/contracts.md section 1). Defaults are the workload schema's (docs/workloads.md).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "half.h"

namespace mfb {

struct RunOptions {
    std::string model_dir;     // --model: an HF folder (tokenizer files are copied from it)
    std::string config_path;   // config.json
    std::string weights_path;  // model.safetensors; "" for random init from `seed`
    std::string data_path;
    int seq_len = 0;  // 0: min(128, the model's positions)
    int micro_batch = 8;    // B, rows per micro-batch
    int micro_batches = 1;  // K, micro-batches per optimizer step
    std::string method = "full";  // full or lora
    int lora_r = 8;
    double lora_alpha = 16;
    double lora_dropout = 0;  // p of the adapters' input dropout in training
    std::vector<std::string> lora_targets;  // empty: the family's default
    std::string lora_init;                  // a peft adapter folder to start from
    int steps = 100;
    uint64_t seed = 1234;
    int threads = 2;
    double lr = 1e-4, min_lr = 0, weight_decay = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    int warmup = 0;
    std::string schedule = "constant";  // constant, cosine or linear
    double grad_clip = 1.0;             // 0: off
    int ce_chunk_rows = -1;             // -1: auto (about 32 MB of logits); 0: all rows
    Half frozen = Half::None;           // memory.frozen_dtype (LoRA): frozen parameters held 16-bit
    int recompute_every = 0;           // activation checkpointing of blocks 0, k, 2k, ... (0: none, 1: every block)
    bool memory_efficient = false;      // memory-efficient attention (lse kept, not the probabilities)
    // memory.sharding (none, lru, prefetch), its budget, loads ahead and backing folder ("":
    // <out>/shards); memory.offload (Full-FT)
    std::string sharding = "none", shard_dir;
    double budget_mb = 0;
    int ahead = 0;
    bool offload_optimizer = false, offload_gradients = false;
    int sample_ms = 0;
    int checkpoint_every = 0;  // steps between checkpoints in <out>/checkpoints (0: only on a stop request)
    bool resume = false;       // continue from the newest good checkpoint in <out>/checkpoints
    std::string out;  // "": no outputs
    bool save = true, plan_only = false, quiet = false;
    std::string dump_grads, dump_logits;
    std::string workload;                // the run spec's name ("" for flag runs)
    nlohmann::json provenance = nullptr;  // the run spec's, copied into summary.json
    std::string spec_path;               // the run spec file ("" for flag runs)
    // scheduling and telemetry (docs/native.md): the policy's name in decision events, the
    // controller (--control stdio), a paused run's poll interval, the sensors' root prefix
    std::string scheduling = "none", control, sysfs_root;
    double pause_poll_s = 10;
};

// Flags (see usage()); --workload FILE reads a run spec instead. Sets help when --help is
// given. Throws Error on bad input.
RunOptions parse_options(int argc, char** argv, bool& help);
RunOptions read_run_spec(const std::string& path);
const char* usage();

// Logit rows alive at once: -1 auto = min(N, max(128, 8388608 / V)), 0 all N, else min(N, r).
int resolve_chunk_rows(int requested, int N, int V);

}  // namespace mfb

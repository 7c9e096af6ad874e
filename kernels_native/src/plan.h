// The buffer plan of a training step (docs/contracts.md section 2): every buffer the trainer
// allocates, as a table, and the ops of one step in order, computed from the model config and
// the run's shape alone. The Model allocates from this table and takes its pointers by name,
// so what `--plan` prints is what runs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "half.h"

namespace mfb {

struct Config;

enum class Lifetime { Static, Scratch, Kept, Recomputed, Sharded };

struct PlanBuffer {
    std::string name;
    size_t elements;   // elements of `width` bytes (fp32, int32 tokens, or 16-bit frozen params); bytes = width x elements
    size_t reserved;   // 4-byte units reserved in the arena: packed tensors are padded to 64 bytes each
    Lifetime lifetime;
    std::string shard;  // "" is null
    size_t width = 4;
    size_t bytes() const { return width * elements; }
};

struct PlanOp {
    std::string name, kind, phase, shard;  // shard "" is null
    int layer = -1;                        // -1 is null
    int micro_batch = 0;                   // -1 for update ops
    std::vector<std::string> alloc, free;
    size_t io_bytes = 0;                   // io ops: bytes read from or written to flash
};

// One parameter tensor (HF name, shape) and the shard whose `params.*` buffer holds it.
struct ParamTensor {
    std::string name;
    std::vector<int64_t> shape;
    std::string shard;
};

// A linear layer with a LoRA adapter: A [r, in] and B [out, r] in `lora.params`.
struct AdapterSpec {
    std::string name;  // HF module path
    int in, out;
};

struct PlanOptions {
    int B = 1, T = 1, K = 1;  // micro-batch rows, sequence length, micro-batches a step
    bool full = true;         // Full-FT (else LoRA)
    int lora_r = 0;
    std::vector<std::string> lora_targets;
    bool lora_dropout = false;  // method.dropout > 0: the adapters' dropped input in scratch.lora_x
    int threads = 1;     // P: per-thread scratch capacity
    int chunk_rows = 1;  // R, resolved (1 .. B T)
    bool grad_clip = true;
    Half frozen = Half::None;  // LoRA: frozen parameters held 16-bit (memory.frozen_dtype)
    int recompute_every = 0;       // activation checkpointing of blocks 0, k, 2k, ... (0: none; 1: every block)
    bool memory_efficient = false;  // attention keeps lse [B, H, T], not the probabilities
    // parameter sharding (memory.sharding): the budget of resident shard parts in bytes (-1:
    // none), and how many parts the I/O thread loads ahead (0: lru, on demand); offload of
    // AdamW's moments and of the gradients (memory.offload, Full-FT) - shard.cpp plans the io
    long long budget_bytes = -1;
    int ahead = 0;
    bool offload_optimizer = false, offload_gradients = false;
    std::string targets_file, targets_field = "--lora-targets";  // where errors say the targets came from
};

struct Plan {
    std::string family, method;
    PlanOptions opt;
    size_t trainable_params = 0;
    std::vector<ParamTensor> params;     // in transformers' named_parameters() order
    std::vector<AdapterSpec> adapters;   // in module order
    std::vector<PlanBuffer> buffers;
    std::vector<PlanOp> ops;

    const PlanBuffer* find(const std::string& name) const;
    size_t bytes(Lifetime lt) const;  // exact bytes of one lifetime
    size_t total_bytes() const;
    size_t peak_bytes() const;        // static + scratch + the most kept bytes resident at once (the ops replayed)
    bool checkpointed(int layer) const { return opt.recompute_every > 0 && layer % opt.recompute_every == 0; }
    std::string json() const;         // one line, sorted keys, no newline
};

// Throws Error when a LoRA target matches no module.
Plan make_plan(const Config& cfg, const PlanOptions& opt);

// peft's rule: module `name` is adapted by target t when name == t or name ends with "." + t.
bool lora_matches(const std::string& name, const std::string& target);

// Elements reserved for a packed tensor of n elements (64-byte aligned sub-buffers); of n
// 16-bit elements.
inline size_t padded(size_t n) { return (n + 15) & ~(size_t)15; }
inline size_t padded16(size_t n) { return (n + 31) & ~(size_t)31; }

// Elements of `scratch.weight` (16-bit frozen weights widened for use): the largest block
// weight matrix, and at least a norm's weight and bias side by side. The LM head and the
// embeddings are widened in row chunks of this size.
size_t weight_scratch_elements(const Config& c);

// Elements of `scratch.lora_x` (LoRA dropout): the largest adapter's input [N, in].
size_t lora_dropout_scratch_elements(const Plan& p);

}  // namespace mfb

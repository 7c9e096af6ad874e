// The transformer engine: a config read from HF config.json, parameters in one planned
// buffer, and explicit forward/backward per layer. One engine for three families; a family
// is a few switches (norm, gated MLP, positions, q/k norms, norms after the sublayers,
// embedding scale, weight layout), not a copy of the model. The kernels are in layers.h.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "layers.h"
#include "plan.h"

namespace mfb {

class Shards;

enum class Family { Gpt2, Qwen2, Gemma3 };
enum class NormKind { LayerNorm, RMSNorm };
enum class WeightLayout { InOut, OutIn };  // HF Conv1D [in, out] vs nn.Linear [out, in]

// What differs between layers: the attention's scale, its sliding window (0: full causal)
// and its rotary base (theta 0: no rotary embedding, GPT-2).
struct LayerAttn {
    float scale = 1.f;
    int window = 0;
    float rope_theta = 0.f, rope_factor = 1.f;
};

struct Config {
    Family family = Family::Gpt2;
    int vocab = 0, max_pos = 0, C = 0, L = 0, H = 0, KV = 0, head_dim = 0, F = 0;
    float eps = 1e-5f;
    bool tied = true;
    NormKind norm = NormKind::LayerNorm;
    bool norm_plus_one = false;            // Gemma: RMSNorm scales by (1 + w)
    ActKind act = ActKind::GeluTanh;
    bool gated = false;                    // MLP down(act(gate(x)) * up(x))
    bool qkv_bias = true, o_bias = true;
    bool qk_norm = false;                  // Gemma: RMSNorm over each q and k head
    bool post_norms = false;               // Gemma: norms after attention and after the MLP
    float embed_scale = 1.f;               // Gemma: sqrt(hidden_size)
    std::vector<LayerAttn> layers;
    nlohmann::json raw;  // the config.json as read, written back next to saved weights
    std::string source_dir;  // the HF folder it came from (tokenizer files are copied from it)
};

Config load_config(const std::string& path);

struct LoraOptions {
    int r = 0;  // 0: no LoRA
    float alpha = 16.f;
    std::vector<std::string> targets;  // peft's rule: a module matches t if name == t or ends with "." + t
    double dropout = 0.0;  // method.dropout: p of the adapters' input dropout in training
};

// Frozen parameters held 16-bit (memory.frozen_dtype, LoRA only): their `*16` pointers
// stand in for the fp32 ones, and each use widens them into scratch.weight first.
struct Frozen {
    Half kind = Half::None;
    float* scratch = nullptr;  // scratch.weight
    size_t capacity = 0;
    // p32 when p16 is null, else p16's n values widened into scratch[at, at + n)
    const float* get(const float* p32, const uint16_t* p16, size_t n, size_t at = 0) const;
};

// LoRA dropout, as peft applies it in training: the adapter sees x masked and scaled by
// 1 / (1 - p). The mask is drawn from the counter-based generator of initialisation: value i
// of adapter `id` in micro-batch k of step s is kept when uniform01(seed, stream(s, k, id), i)
// >= p. It depends only on where it is, so a recomputed forward and the backward see the
// forward's mask, and a resumed run the masks of an uninterrupted one.
struct Dropout {
    double p = 0.0;              // 0: off
    bool training = false;       // set by step(): masks only in a step with backward
    uint64_t seed = 0;
    int step = 0, micro_batch = 0;
    float* scratch = nullptr;    // scratch.lora_x [N, largest adapted in]
    // out[i] = (or +=) x[i] / (1 - p) where element i of adapter `id` is kept, else 0
    void apply(int id, const float* x, float* out, size_t n, bool accumulate) const;
    bool on() const { return training && p > 0.0; }
};

// A dense layer y = x W (+ b), optionally with a LoRA adapter y += scale (drop(x) A^T) B^T.
struct Linear {
    std::string name;  // HF module path, e.g. "transformer.h.0.attn.c_attn"
    int in = 0, out = 0;
    WeightLayout layout = WeightLayout::InOut;
    float *w = nullptr, *b = nullptr, *dw = nullptr, *db = nullptr;  // dw/db null when frozen
    const uint16_t *w16 = nullptr, *b16 = nullptr;                   // w, b held 16-bit (then w, b null)
    const Frozen* frozen = nullptr;
    int r = 0;
    float scale = 0.f;
    float *A = nullptr, *B = nullptr, *dA = nullptr, *dB = nullptr;  // A [r, in], B [out, r]
    float* u = nullptr;  // drop(x) A^T [N, r], kept for backward when adapted
    int id = -1;         // the adapter's index in module order (its dropout stream)
    const Dropout* dropout = nullptr;
};

// A norm's parameters and the statistics its backward needs (mean: LayerNorm only).
struct Norm {
    float *w = nullptr, *b = nullptr, *dw = nullptr, *db = nullptr;
    const uint16_t *w16 = nullptr, *b16 = nullptr;  // held 16-bit (then w, b null)
    float *mean = nullptr, *rstd = nullptr;
};

struct Block {
    // ln1 before attention, ln2 before the MLP; Gemma adds post_attn and post_mlp (after the
    // sublayers) and q_norm, k_norm (per head, before the rotary embedding).
    Norm ln1, ln2, post_attn, post_mlp, q_norm, k_norm;
    Linear qkv;           // GPT-2's fused c_attn
    Linear q, k, v;       // Qwen and Gemma
    Linear o, gate, up, down;  // GPT-2: o = attn.c_proj, up = mlp.c_fc, down = mlp.c_proj, no gate
    // activations kept for backward (norm outputs are recomputed from their statistics):
    // the block input; q, k, v as attention reads them (for GPT-2, views into qkv_out);
    // Gemma's q and k before their norms; attention probabilities and output; Gemma's
    // attention projection; the residual after attention; the MLP's activation derivative
    // (GPT-2) or its gate and up outputs (gated MLPs); the activation's output only when the
    // down projection's weight or adapter learns; Gemma's MLP output before its norm.
    float *x, *qkv_out = nullptr, *q_out, *k_out, *v_out, *q_raw = nullptr, *k_raw = nullptr, *att = nullptr, *atty;
    float* lse = nullptr;  // memory-efficient attention: per-row log-sum-exp [B, H, T] instead of att
    float *proj = nullptr, *res2, *act_d = nullptr, *gate_out = nullptr, *up_out = nullptr, *act_out, *mlp_out = nullptr;
};

struct ParamEntry {
    std::string name;
    std::vector<int64_t> shape;
    size_t offset, numel;
};

// A contiguous range of trainable values and its gradient, with its weight-decay flag.
struct TrainSegment {
    std::string name;
    std::vector<int64_t> shape;
    float *p, *g;
    size_t n;
    bool decay;
    std::string shard;  // Full-FT: the parameter's shard (one update op each); LoRA: ""
};

// A planned buffer, as the Model hands it out.
struct Arena {
    std::vector<size_t> offset;  // in 4-byte elements, per buffer of the plan
    float* base = nullptr;
    bool mapped = false;  // sharded: one mmap, params.* and grads.* page-aligned
    size_t bytes = 0;
    explicit Arena(const Plan& plan);
    ~Arena();
    Arena(const Arena&) = delete;
    Arena& operator=(const Arena&) = delete;
};

class Model {
public:
    // Makes the plan for micro-batches of B x T (plan options) and allocates every buffer of
    // it once; full=true trains all parameters, else LoRA with `lora`.
    Model(const Config& cfg, const PlanOptions& opt, const LoraOptions& lora);

    // Base parameters only; of one shard when given (a sharded run writes each to flash in turn).
    void load_weights(const std::string& safetensors_path, const std::string& shard = "");
    void random_init(uint64_t seed, const std::string& shard = "");
    // Fresh LoRA adapters as peft makes them, drawn from `seed` (loaded or random base alike).
    void init_adapters(uint64_t seed);
    void load_adapter(const std::string& adapter_safetensors_path);

    // One micro-batch. inputs/targets [B, T] (target -1: no loss). Returns the summed
    // cross-entropy over counted targets. With backward, gradients are accumulated with
    // d(loss)/d(logit) scaled by `grad_scale` (1 / counted targets in the whole step).
    // logits_out, when given, receives [B, T, V].
    double step(const int* inputs, const int* targets, bool backward, float grad_scale, float* logits_out = nullptr);
    // The next step() with backward is micro-batch k of optimizer step s: its LoRA dropout masks.
    void dropout_at(uint64_t seed, int step, int micro_batch);

    void zero_grads();
    std::vector<TrainSegment>& trainable() { return trainable_; }
    size_t num_trainable() const { return plan_.trainable_params; }
    const Plan& plan() const { return plan_; }
    // A buffer of the plan by name; it must hold `elements` 4-byte values.
    float* buffer(const std::string& name, size_t elements) const;
    int* int_buffer(const std::string& name, size_t elements) const { return reinterpret_cast<int*>(buffer(name, elements)); }

    void save_full(const std::string& dir) const;
    void save_adapter(const std::string& dir, const std::string& base_model) const;

    const Config cfg;
    const int B, T, N;  // N = B * T rows
    Shards* shards = nullptr;  // sharding: runs the step program's io around the ops
    // set: step() reports each region it ran (an owner's ops in one phase: "block3", "backward")
    // with its start and end (now_s), io waits excluded, for the trace's op events
    std::function<void(const std::string& owner, const char* phase, double start, double end)> on_region;
    const bool full;
    const LoraOptions lora;

private:
    float* param(const std::string& name) const;
    uint16_t* param16(const std::string& name) const;  // a parameter held 16-bit
    bool has_param(const std::string& name) const;
    // Write parameter e from fp32 values fill(dst, first, n) gives for its elements [first, first + n):
    // directly, or, when held 16-bit, through scratch.weight a chunk at a time, rounded.
    template <class Fill> void set_param(const ParamEntry& e, Fill fill);
    float* kept(int layer, const std::string& name, size_t elements) const;  // block{layer}.name
    float* kept_if(int layer, const std::string& name, size_t elements) const;  // null when not planned
    void make_linear(Linear& lin, int layer, const std::string& module, int in, int out);
    void make_norm(Norm& n, int layer, const std::string& module, int rows);

    void norm_forward(Norm& n, float* out, const float* x, int rows, int width);
    void norm_apply(const Norm& n, float* out, const float* x, int rows, int width);
    void norm_backward(Norm& n, float* dx, const float* dout, const float* x, int rows, int width, bool accumulate);
    void block_forward(int l, float* out);
    void block_backward(int l);  // s_dres: d(block output) in, d(block input) out
    double head(const int* targets, bool backward, float grad_scale, float* logits_out);

    const Plan plan_;
    Arena arena_;
    std::vector<ParamEntry> params_;           // offsets from param_base_ (params.* are contiguous), in elements of their width
    Frozen frozen_;
    Dropout dropout_;
    float *param_base_, *grad_base_ = nullptr;  // grads.* mirror params.* (Full-FT)
    std::vector<Linear*> lora_layers_;
    std::vector<TrainSegment> trainable_;
    float *rope_cos_ = nullptr, *rope_sin_ = nullptr;  // [layers, T, head_dim / 2], rotary families

    float *wte, *wpe = nullptr, *lm_head, *dwte = nullptr, *dwpe = nullptr, *dlm_head = nullptr;
    const uint16_t *wte16 = nullptr, *wpe16 = nullptr, *lm_head16 = nullptr;  // held 16-bit (then wte, wpe, lm_head null)
    Norm lnf;
    std::vector<Block> blocks_;
    int ldq_ = 0, ldkv_ = 0;  // row strides of q and of k, v
    // activations and scratch
    float* x_final;
    float *s_ln, *s_act, *s_dres, *s_dln, *s_dq, *s_dk, *s_dv, *s_datty, *s_dh, *s_dup, *s_logits, *s_lnc, *s_dlnc, *s_du,
        *s_ones, *s_datt, *s_normpart;
    int chunk_rows_;
    int threads_;  // threads the per-thread scratch (s_datt, s_normpart) is sized for
    std::vector<int> rows_, row_targets_;  // rows of the current micro-batch that go through the LM head, their targets
};

}  // namespace mfb

// The transformer engine: a config read from HF config.json, parameters in one planned
// buffer, and explicit forward/backward per layer. GPT-2 is the family implemented; the
// per-family switches (norm, MLP, positions, weight layout) are where Qwen 2.5 and Gemma 3
// plug in later (RMSNorm, RoPE, grouped KV heads, gated MLPs) without a second engine.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace mfb {

enum class NormKind { LayerNorm };                 // later: RMSNorm
enum class ActKind { GeluTanh, GeluErf };          // later: gated SiLU / GELU (SwiGLU, GeGLU)
enum class WeightLayout { InOut, OutIn };          // HF Conv1D [in, out] vs nn.Linear [out, in]

struct Config {
    std::string family;  // "gpt2"
    int vocab = 0, max_pos = 0, C = 0, L = 0, H = 0, head_dim = 0, F = 0;
    float eps = 1e-5f;
    bool tied = true;
    NormKind norm = NormKind::LayerNorm;
    ActKind act = ActKind::GeluTanh;
    bool scale_attn = true, scale_by_layer = false;
    nlohmann::json raw;  // the config.json as read, written back next to saved weights
    std::string source_dir;  // the HF folder it came from (tokenizer files are copied from it)
};

Config load_config(const std::string& path);

struct LoraOptions {
    int r = 0;  // 0: no LoRA
    float alpha = 16.f;
    std::vector<std::string> targets;  // peft's rule: a module matches t if name == t or ends with "." + t
};

// A dense layer y = x W (+ b), optionally with a LoRA adapter y += scale (x A^T) B^T.
struct Linear {
    std::string name;  // HF module path, e.g. "transformer.h.0.attn.c_attn"
    int in = 0, out = 0;
    WeightLayout layout = WeightLayout::InOut;
    float *w = nullptr, *b = nullptr, *dw = nullptr, *db = nullptr;  // dw/db null when frozen
    int r = 0;
    float scale = 0.f;
    float *A = nullptr, *B = nullptr, *dA = nullptr, *dB = nullptr;  // A [r, in], B [out, r]
};

struct Block {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float *dln1_w = nullptr, *dln1_b = nullptr, *dln2_w = nullptr, *dln2_b = nullptr;
    Linear qkv, attn_out, fc, fc_out;
    // activations kept for backward (the rest is recomputed): layer input, LayerNorm stats,
    // q|k|v, attention probabilities, attention output, residual after attention, the MLP
    // activation's derivative, and its output only when fc_out's weight or adapter learns
    float *x, *ln1_mean, *ln1_rstd, *qkv_out, *att, *atty, *res2, *ln2_mean, *ln2_rstd, *act_d, *act_out;
    float *u_qkv, *u_attn_out, *u_fc, *u_fc_out;  // LoRA x A^T, [N, r], when adapted
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
};

class Model {
public:
    // Plans every buffer for micro-batch B x sequence T; full=true trains all parameters.
    // chunk_rows: rows of logits alive at once in the loss (0: pick from the vocabulary size).
    Model(const Config& cfg, int B, int T, bool full, const LoraOptions& lora, int threads, int chunk_rows = 0);

    void load_weights(const std::string& safetensors_path);
    void random_init(uint64_t seed);
    void load_adapter(const std::string& adapter_safetensors_path);

    // One micro-batch. inputs/targets [B, T] (target -1: no loss). Returns the summed
    // cross-entropy over counted targets. With backward, gradients are accumulated with
    // d(loss)/d(logit) scaled by `grad_scale` (1 / counted targets in the whole step).
    // logits_out, when given, receives [B, T, V].
    double step(const int* inputs, const int* targets, bool backward, float grad_scale, float* logits_out = nullptr);

    void zero_grads();
    std::vector<TrainSegment>& trainable() { return trainable_; }
    size_t num_trainable() const;
    std::string plan_json() const;

    void save_full(const std::string& dir) const;
    void save_adapter(const std::string& dir, const std::string& base_model) const;

    const Config cfg;
    const int B, T, N;  // N = B * T rows
    const bool full;
    const LoraOptions lora;

private:
    // Buffers are laid out twice: a counting pass sizes them, the second hands out pointers.
    struct Planner {
        bool commit = false;
        size_t used = 0;
        float* base = nullptr;
        float* take(size_t n);
    };
    Planner plan_params_, plan_lora_, plan_act_, plan_scratch_;

    float* param(const std::string& name, std::vector<int64_t> shape);
    void make_linear(Linear& lin, const std::string& name, int in, int out, bool bias);
    float* act(size_t n);
    float* scratch(size_t n);

    void attention_forward(Block& blk);
    void attention_backward(Block& blk, const float* datty, float* dqkv);
    double head(const int* targets, bool backward, float grad_scale, float* logits_out);

    int threads_;
    std::vector<ParamEntry> params_;
    std::vector<float> param_buf_, grad_buf_;  // grad_buf_ only for Full-FT
    std::vector<Linear*> lora_layers_;
    std::vector<float> lora_buf_, lora_grad_buf_;
    std::vector<TrainSegment> trainable_;
    std::vector<float> act_buf_, scratch_buf_;
    size_t act_used_ = 0, scratch_used_ = 0, act_size_ = 0, scratch_size_ = 0;

    float *wte, *wpe, *lnf_w, *lnf_b, *dwte = nullptr, *dwpe = nullptr, *dlnf_w = nullptr, *dlnf_b = nullptr;
    std::vector<Block> blocks_;
    // activations and scratch
    float *x_final, *lnf_mean, *lnf_rstd;
    float *s_ln, *s_gelu, *s_dres, *s_dln, *s_dqkv, *s_datty, *s_dfch, *s_logits, *s_lnc, *s_dlnc, *s_du, *s_ones, *s_datt, *s_lnpart;
    int chunk_rows_;
    std::vector<int> rows_;  // rows of the current micro-batch that go through the LM head
};

}  // namespace mfb

#include "model.h"

#include <omp.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common.h"
#include "gemm.h"
#include "safetensors.h"

namespace mfb {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------
// config

Config load_config(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw Error(path, "cannot open", "an HF config.json");
    Config c;
    try {
        c.raw = json::parse(in);
    } catch (const json::exception&) {
        throw Error(path, "not valid JSON", "an HF config.json");
    }
    const json& j = c.raw;
    if (!j.is_object()) throw Error(path, "not a JSON object", "an HF config.json");
    std::string mt = j.value("model_type", std::string("gpt2"));
    if (mt != "gpt2") throw Error(path, "model_type '" + mt + "' is not supported yet", "gpt2");
    c.family = mt;
    auto get_int = [&](const char* k, int dflt, bool required) {
        if (!j.contains(k) || j[k].is_null()) {
            if (required) throw Error(path, std::string("missing field '") + k + "'", "a positive integer");
            return dflt;
        }
        if (!j[k].is_number_integer() || j[k].get<long long>() <= 0 || j[k].get<long long>() > (1LL << 30))
            throw Error(path, std::string("field '") + k + "' is " + j[k].dump(), "a positive integer");
        return j[k].get<int>();
    };
    c.vocab = get_int("vocab_size", 0, true);
    c.max_pos = get_int("n_positions", 1024, false);
    c.C = get_int("n_embd", 0, true);
    c.L = get_int("n_layer", 0, true);
    c.H = get_int("n_head", 0, true);
    c.F = get_int("n_inner", 4 * c.C, false);
    if (c.C % c.H) throw Error(path, "n_embd " + std::to_string(c.C) + " is not divisible by n_head " + std::to_string(c.H), "n_embd % n_head == 0");
    c.head_dim = c.C / c.H;
    if (j.contains("layer_norm_epsilon") && j["layer_norm_epsilon"].is_number()) c.eps = j["layer_norm_epsilon"].get<float>();
    std::string act = j.value("activation_function", std::string("gelu_new"));
    if (act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast") c.act = ActKind::GeluTanh;
    else if (act == "gelu") c.act = ActKind::GeluErf;
    else throw Error(path, "activation_function '" + act + "' is not supported", "gelu_new, gelu_pytorch_tanh, gelu_fast or gelu");
    c.tied = j.value("tie_word_embeddings", true);
    if (!c.tied) throw Error(path, "tie_word_embeddings false is not supported for gpt2", "true");
    c.scale_attn = j.value("scale_attn_weights", true);
    c.scale_by_layer = j.value("scale_attn_by_inverse_layer_idx", false);
    return c;
}

// ---------------------------------------------------------------------------------------
// layer kernels (N rows of width C unless said otherwise)

static void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                              int N, int C, float eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* xr = x + (size_t)n * C;
        float m = 0.f;
        for (int i = 0; i < C; i++) m += xr[i];
        m /= C;
        float v = 0.f;
        for (int i = 0; i < C; i++) v += (xr[i] - m) * (xr[i] - m);
        float s = 1.f / std::sqrt(v / C + eps);
        float* o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = (xr[i] - m) * s * w[i] + b[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

// Recompute a LayerNorm output from its saved statistics.
static void layernorm_apply(float* out, const float* mean, const float* rstd, const float* x, const float* w,
                            const float* b, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* xr = x + (size_t)n * C;
        float* o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = (xr[i] - mean[n]) * rstd[n] * w[i] + b[i];
    }
}

// dx += LN'(dout); dw, db (may be null) += weight/bias grads. part: threads x 2C scratch.
static void layernorm_backward(float* dx, float* dw, float* db, float* part, const float* dout, const float* x,
                               const float* w, const float* mean, const float* rstd, int N, int C) {
    int nt = 1;
#pragma omp parallel
    {
        int tid = omp_get_thread_num();
#pragma omp single
        nt = omp_get_num_threads();
        float* pdw = part + (size_t)tid * 2 * C;
        float* pdb = pdw + C;
        std::fill(pdw, pdw + 2 * C, 0.f);
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float* xr = x + (size_t)n * C;
            const float* g = dout + (size_t)n * C;
            float* d = dx + (size_t)n * C;
            float m = mean[n], s = rstd[n];
            float a = 0.f, bb = 0.f;
            for (int i = 0; i < C; i++) {
                float dn = w[i] * g[i];
                a += dn;
                bb += dn * (xr[i] - m) * s;
            }
            a /= C;
            bb /= C;
            for (int i = 0; i < C; i++) {
                float norm = (xr[i] - m) * s;
                d[i] += (w[i] * g[i] - a - norm * bb) * s;
                pdw[i] += norm * g[i];
                pdb[i] += g[i];
            }
        }
    }
    if (dw)
        for (int t = 0; t < nt; t++)
            for (int i = 0; i < C; i++) {
                dw[i] += part[(size_t)t * 2 * C + i];
                db[i] += part[(size_t)t * 2 * C + C + i];
            }
}

// exp(x) as 2^(x log2 e): an integer power of two times a degree-6 polynomial for 2^f,
// f in [0, 1) (relative error ~2e-7). Branch-free, so loops over it vectorise.
static inline float fast_exp(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    float t = x * 1.4426950408889634f;
    float fi = std::floor(t), f = t - fi;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)fi + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

static const float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)

// tanh(u) = 1 - 2 / (exp(2u) + 1)
static inline float gelu_tanh_inner(float v) { return 1.f - 2.f / (fast_exp(2.f * kGeluK * (v + 0.044715f * v * v * v)) + 1.f); }

// out = gelu(x) and deriv = gelu'(x), sharing one tanh (the derivative is kept for backward).
static void gelu_forward_deriv(float* out, float* deriv, const float* x, size_t n, ActKind act) {
    if (act == ActKind::GeluTanh) {
#pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < n; i++) {
            float v = x[i], th = gelu_tanh_inner(v);
            out[i] = 0.5f * v * (1.f + th);
            deriv[i] = 0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * kGeluK * (1.f + 3.f * 0.044715f * v * v);
        }
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            float v = x[i], c = 0.5f * (1.f + std::erf(v * 0.70710678118654752f));
            out[i] = v * c;
            deriv[i] = c + v * std::exp(-0.5f * v * v) * 0.3989422804014327f;
        }
    }
}

static void mul_inplace(float* d, const float* g, size_t n) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) d[i] *= g[i];
}

// y[N, out] = beta * y + x[N, in] W (+ b) (+ scale (x A^T) B^T, keeping u = x A^T [N, r])
static void linear_forward(const Linear& l, const float* x, float* y, float* u, int N, float beta) {
    if (l.layout == WeightLayout::InOut) sgemm(false, false, N, l.out, l.in, 1.f, x, l.in, l.w, l.out, beta, y, l.out);
    else sgemm(false, true, N, l.out, l.in, 1.f, x, l.in, l.w, l.in, beta, y, l.out);
    if (l.b) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            float* yr = y + (size_t)n * l.out;
            for (int j = 0; j < l.out; j++) yr[j] += l.b[j];
        }
    }
    if (l.r) {
        sgemm(false, true, N, l.r, l.in, 1.f, x, l.in, l.A, l.in, 0.f, u, l.r);
        sgemm(false, true, N, l.out, l.r, l.scale, u, l.r, l.B, l.r, 1.f, y, l.out);
    }
}

// dx[N, in] = dy W^T (+ LoRA path), when dx is given; dW, db, dA, dB accumulate when trainable.
static void linear_backward(const Linear& l, const float* x, const float* dy, float* dx, const float* u, float* du,
                            const float* ones, int N) {
    if (dx) {
        if (l.layout == WeightLayout::InOut) sgemm(false, true, N, l.in, l.out, 1.f, dy, l.out, l.w, l.out, 0.f, dx, l.in);
        else sgemm(false, false, N, l.in, l.out, 1.f, dy, l.out, l.w, l.in, 0.f, dx, l.in);
    }
    if (l.dw) {
        if (l.layout == WeightLayout::InOut) sgemm(true, false, l.in, l.out, N, 1.f, x, l.in, dy, l.out, 1.f, l.dw, l.out);
        else sgemm(true, false, l.out, l.in, N, 1.f, dy, l.out, x, l.in, 1.f, l.dw, l.in);
    }
    if (l.db) sgemm(false, false, 1, l.out, N, 1.f, ones, N, dy, l.out, 1.f, l.db, l.out);
    if (l.r) {
        sgemm(true, false, l.out, l.r, N, l.scale, dy, l.out, u, l.r, 1.f, l.dB, l.r);
        sgemm(false, false, N, l.r, l.out, l.scale, dy, l.out, l.B, l.r, 0.f, du, l.r);
        sgemm(true, false, l.r, l.in, N, 1.f, du, l.r, x, l.in, 1.f, l.dA, l.in);
        if (dx) sgemm(false, false, N, l.in, l.r, 1.f, du, l.r, l.A, l.in, 1.f, dx, l.in);
    }
}

// ---------------------------------------------------------------------------------------
// planning: every buffer is sized in a counting pass, then allocated once

float* Model::Planner::take(size_t n) {
    float* p = commit ? base + used : nullptr;
    used += (n + 15) & ~(size_t)15;  // 64-byte aligned sub-buffers
    return p;
}

float* Model::param(const std::string& name, std::vector<int64_t> shape) {
    size_t n = 1;
    for (auto d : shape) n *= (size_t)d;
    size_t off = plan_params_.used;
    float* p = plan_params_.take(n);
    if (!plan_params_.commit) params_.push_back({name, shape, off, n});
    return p;
}

float* Model::act(size_t n) { return plan_act_.take(n); }
float* Model::scratch(size_t n) { return plan_scratch_.take(n); }

static bool lora_matches(const std::string& name, const std::vector<std::string>& targets) {
    for (const auto& t : targets)
        if (name == t || (name.size() > t.size() && name.compare(name.size() - t.size() - 1, std::string::npos, "." + t) == 0))
            return true;
    return false;
}

void Model::make_linear(Linear& lin, const std::string& name, int in, int out, bool bias) {
    lin.name = name;
    lin.in = in;
    lin.out = out;
    lin.layout = WeightLayout::InOut;  // GPT-2's Conv1D
    lin.w = param(name + ".weight", {in, out});
    lin.b = bias ? param(name + ".bias", {out}) : nullptr;
    if (lora.r > 0 && lora_matches(name, lora.targets)) {
        lin.r = lora.r;
        lin.scale = lora.alpha / lora.r;
        lin.A = plan_lora_.take((size_t)lora.r * in);
        lin.B = plan_lora_.take((size_t)out * lora.r);
    }
}

Model::Model(const Config& c, int B_, int T_, bool full_, const LoraOptions& lora_, int threads, int chunk_rows)
    : cfg(c), B(B_), T(T_), N(B_ * T_), full(full_), lora(lora_), threads_(threads) {
    const int C = cfg.C, V = cfg.vocab, F = cfg.F, H = cfg.H, L = cfg.L;
    chunk_rows_ = chunk_rows > 0 ? std::min(N, chunk_rows) : std::max(16, std::min(N, (int)((8u << 20) / (unsigned)V)));
    blocks_.resize(L);
    for (int pass = 0; pass < 2; pass++) {
        for (Planner* p : {&plan_params_, &plan_lora_, &plan_act_, &plan_scratch_}) p->used = 0, p->commit = pass == 1;
        wte = param("transformer.wte.weight", {V, C});
        wpe = param("transformer.wpe.weight", {cfg.max_pos, C});
        for (int l = 0; l < L; l++) {
            Block& b = blocks_[l];
            std::string pre = "transformer.h." + std::to_string(l) + ".";
            b.ln1_w = param(pre + "ln_1.weight", {C});
            b.ln1_b = param(pre + "ln_1.bias", {C});
            make_linear(b.qkv, pre + "attn.c_attn", C, 3 * C, true);
            make_linear(b.attn_out, pre + "attn.c_proj", C, C, true);
            b.ln2_w = param(pre + "ln_2.weight", {C});
            b.ln2_b = param(pre + "ln_2.bias", {C});
            make_linear(b.fc, pre + "mlp.c_fc", C, F, true);
            make_linear(b.fc_out, pre + "mlp.c_proj", F, C, true);

            b.x = act((size_t)N * C);
            b.ln1_mean = act(N);
            b.ln1_rstd = act(N);
            b.qkv_out = act((size_t)N * 3 * C);
            b.att = act((size_t)B * H * T * T);
            b.atty = act((size_t)N * C);
            b.res2 = act((size_t)N * C);
            b.ln2_mean = act(N);
            b.ln2_rstd = act(N);
            b.act_d = act((size_t)N * F);
            b.act_out = (full || b.fc_out.r) ? act((size_t)N * F) : nullptr;
            b.u_qkv = b.qkv.r ? act((size_t)N * b.qkv.r) : nullptr;
            b.u_attn_out = b.attn_out.r ? act((size_t)N * b.attn_out.r) : nullptr;
            b.u_fc = b.fc.r ? act((size_t)N * b.fc.r) : nullptr;
            b.u_fc_out = b.fc_out.r ? act((size_t)N * b.fc_out.r) : nullptr;
        }
        lnf_w = param("transformer.ln_f.weight", {C});
        lnf_b = param("transformer.ln_f.bias", {C});
        x_final = act((size_t)N * C);
        lnf_mean = act(N);
        lnf_rstd = act(N);

        s_ln = scratch((size_t)N * C);
        s_gelu = scratch((size_t)N * F);
        s_dres = scratch((size_t)N * C);
        s_dln = scratch((size_t)N * C);
        s_dqkv = scratch((size_t)N * 3 * C);
        s_datty = scratch((size_t)N * C);
        s_dfch = scratch((size_t)N * F);
        s_logits = scratch((size_t)chunk_rows_ * V);
        s_lnc = scratch((size_t)chunk_rows_ * C);
        s_dlnc = scratch((size_t)chunk_rows_ * C);
        s_du = scratch((size_t)N * std::max(1, lora.r));
        s_ones = scratch(N);
        s_datt = scratch((size_t)threads_ * T * T);
        s_lnpart = scratch((size_t)threads_ * 2 * C);

        if (pass == 0) {
            param_buf_.assign(plan_params_.used, 0.f);
            if (full) grad_buf_.assign(plan_params_.used, 0.f);
            lora_buf_.assign(plan_lora_.used, 0.f);
            lora_grad_buf_.assign(plan_lora_.used, 0.f);
            act_buf_.assign(plan_act_.used, 0.f);
            scratch_buf_.assign(plan_scratch_.used, 0.f);
            act_size_ = plan_act_.used;
            scratch_size_ = plan_scratch_.used;
            plan_params_.base = param_buf_.data();
            plan_lora_.base = lora_buf_.data();
            plan_act_.base = act_buf_.data();
            plan_scratch_.base = scratch_buf_.data();
        }
    }
    std::fill(s_ones, s_ones + N, 1.f);
    rows_.reserve(N);

    auto grad = [&](float* p) { return full ? grad_buf_.data() + (p - param_buf_.data()) : nullptr; };
    auto lgrad = [&](float* p) { return lora_grad_buf_.data() + (p - lora_buf_.data()); };
    dwte = grad(wte);
    dwpe = grad(wpe);
    dlnf_w = grad(lnf_w);
    dlnf_b = grad(lnf_b);
    for (Block& b : blocks_) {
        b.dln1_w = grad(b.ln1_w), b.dln1_b = grad(b.ln1_b), b.dln2_w = grad(b.ln2_w), b.dln2_b = grad(b.ln2_b);
        for (Linear* l : {&b.qkv, &b.attn_out, &b.fc, &b.fc_out}) {
            l->dw = grad(l->w);
            l->db = l->b ? grad(l->b) : nullptr;
            if (l->r) {
                l->dA = lgrad(l->A);
                l->dB = lgrad(l->B);
                lora_layers_.push_back(l);
            }
        }
    }
    if (full) {
        for (const ParamEntry& e : params_)
            trainable_.push_back({e.name, e.shape, param_buf_.data() + e.offset, grad_buf_.data() + e.offset, e.numel, e.shape.size() >= 2});
    } else {
        for (Linear* l : lora_layers_) {
            trainable_.push_back({"base_model.model." + l->name + ".lora_A.weight", {l->r, l->in}, l->A, l->dA, (size_t)l->r * l->in, true});
            trainable_.push_back({"base_model.model." + l->name + ".lora_B.weight", {l->out, l->r}, l->B, l->dB, (size_t)l->out * l->r, true});
        }
    }
}

size_t Model::num_trainable() const {
    size_t n = 0;
    for (const auto& s : trainable_) n += s.n;
    return n;
}

std::string Model::plan_json() const {
    json j;
    j["params_bytes"] = param_buf_.size() * 4;
    j["grads_bytes"] = (grad_buf_.size() + (full ? 0 : lora_grad_buf_.size())) * 4;
    j["lora_params_bytes"] = lora_buf_.size() * 4;
    j["optimizer_bytes"] = num_trainable() * 8;
    j["activations_bytes"] = act_size_ * 4;
    j["scratch_bytes"] = scratch_size_ * 4;
    j["trainable_params"] = num_trainable();
    j["logits_chunk_rows"] = chunk_rows_;
    return j.dump();
}

void Model::zero_grads() {
    for (auto& s : trainable_) std::fill(s.g, s.g + s.n, 0.f);
}

// ---------------------------------------------------------------------------------------
// initialisation and loading

// Counter-based generator: value i of stream s depends only on (seed, s, i), so init is
// parallel and identical on every platform.
static inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline double uniform01(uint64_t seed, uint64_t stream, uint64_t i) {
    return ((mix64(seed ^ mix64(stream * 0x100000001B3ull + i)) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static void fill_normal(float* p, size_t n, float std, uint64_t seed, uint64_t stream) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < (n + 1) / 2; i++) {  // Box-Muller: one pair of uniforms, two normals
        double u1 = uniform01(seed, stream, 2 * i), u2 = uniform01(seed, stream, 2 * i + 1);
        double r = std * std::sqrt(-2.0 * std::log(u1)), a = 6.283185307179586 * u2;
        p[2 * i] = (float)(r * std::cos(a));
        if (2 * i + 1 < n) p[2 * i + 1] = (float)(r * std::sin(a));
    }
}
static void fill_uniform(float* p, size_t n, float bound, uint64_t seed, uint64_t stream) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) p[i] = (float)((2.0 * uniform01(seed, stream, i) - 1.0) * bound);
}

static bool ends_with(const std::string& s, const std::string& suf) {
    return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// HF GPT-2 init: N(0, 0.02) for matrices and embeddings, N(0, 0.02 / sqrt(2 L)) for the
// residual projections, zero biases, unit LayerNorm gains. LoRA: A kaiming-uniform
// (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero, as peft does.
void Model::random_init(uint64_t seed) {
    float std0 = cfg.raw.value("initializer_range", 0.02f);
    for (size_t k = 0; k < params_.size(); k++) {
        const ParamEntry& e = params_[k];
        float* p = param_buf_.data() + e.offset;
        if (e.shape.size() >= 2) {
            float s = ends_with(e.name, "c_proj.weight") ? std0 / std::sqrt(2.f * cfg.L) : std0;
            fill_normal(p, e.numel, s, seed, k + 1);
        } else {
            std::fill(p, p + e.numel, ends_with(e.name, "ln_1.weight") || ends_with(e.name, "ln_2.weight") || ends_with(e.name, "ln_f.weight") ? 1.f : 0.f);
        }
    }
    for (size_t k = 0; k < lora_layers_.size(); k++) {
        Linear* l = lora_layers_[k];
        fill_uniform(l->A, (size_t)l->r * l->in, 1.f / std::sqrt((float)l->in), seed, 1000003 + k);
        std::fill(l->B, l->B + (size_t)l->out * l->r, 0.f);
    }
}

void Model::load_weights(const std::string& path) {
    SafetensorsReader rd(path);
    for (const ParamEntry& e : params_) {
        std::string name = e.name;
        // original OpenAI checkpoints name tensors without the "transformer." prefix
        if (!rd.has(name) && rd.has(name.substr(12))) name = name.substr(12);
        rd.read_f32(name, e.shape, param_buf_.data() + e.offset);
    }
    for (size_t k = 0; k < lora_layers_.size(); k++) {  // fresh adapters, as peft initialises them
        Linear* l = lora_layers_[k];
        fill_uniform(l->A, (size_t)l->r * l->in, 1.f / std::sqrt((float)l->in), 0x10aa, 1000003 + k);
        std::fill(l->B, l->B + (size_t)l->out * l->r, 0.f);
    }
}

void Model::load_adapter(const std::string& path) {
    SafetensorsReader rd(path);
    for (Linear* l : lora_layers_) {
        std::string pre = "base_model.model." + l->name;
        rd.read_f32(pre + ".lora_A.weight", {l->r, l->in}, l->A);
        rd.read_f32(pre + ".lora_B.weight", {l->out, l->r}, l->B);
    }
}

// ---------------------------------------------------------------------------------------
// forward and backward

void Model::attention_forward(Block& blk) {
    const int C = cfg.C, H = cfg.H, hd = cfg.head_dim, C3 = 3 * C;
    const int layer = (int)(&blk - blocks_.data());
    float scale = cfg.scale_attn ? 1.f / std::sqrt((float)hd) : 1.f;
    if (cfg.scale_by_layer) scale /= (float)(layer + 1);
#pragma omp parallel for schedule(dynamic)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float* q = blk.qkv_out + (size_t)b * T * C3 + h * hd;
        const float* k = q + C;
        const float* v = q + 2 * C;
        float* P = blk.att + (size_t)bh * T * T;
        sgemm(false, true, T, T, hd, scale, q, C3, k, C3, 0.f, P, T);
        for (int i = 0; i < T; i++) {  // causal softmax of row i over keys 0..i
            float* row = P + (size_t)i * T;
            float mx = row[0];
            for (int j = 1; j <= i; j++) mx = std::max(mx, row[j]);
            for (int j = 0; j <= i; j++) row[j] = fast_exp(row[j] - mx);
            float sum = 0.f;
            for (int j = 0; j <= i; j++) sum += row[j];
            float inv = 1.f / sum;
            for (int j = 0; j <= i; j++) row[j] *= inv;
            for (int j = i + 1; j < T; j++) row[j] = 0.f;
        }
        sgemm(false, false, T, hd, T, 1.f, P, T, v, C3, 0.f, blk.atty + (size_t)b * T * C + h * hd, C);
    }
}

// From dY (datty, [N, C]) to d(q|k|v) ([N, 3C]); P is the saved softmax output.
void Model::attention_backward(Block& blk, const float* datty, float* dqkv) {
    const int C = cfg.C, H = cfg.H, hd = cfg.head_dim, C3 = 3 * C;
    const int layer = (int)(&blk - blocks_.data());
    float scale = cfg.scale_attn ? 1.f / std::sqrt((float)hd) : 1.f;
    if (cfg.scale_by_layer) scale /= (float)(layer + 1);
#pragma omp parallel for schedule(dynamic)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        size_t qo = (size_t)b * T * C3 + h * hd;
        const float *q = blk.qkv_out + qo, *k = q + C, *v = q + 2 * C;
        float *dq = dqkv + qo, *dk = dq + C, *dv = dq + 2 * C;
        const float* dy = datty + (size_t)b * T * C + h * hd;
        const float* P = blk.att + (size_t)bh * T * T;
        float* dS = s_datt + (size_t)omp_get_thread_num() * T * T;
        sgemm(false, true, T, T, hd, 1.f, dy, C, v, C3, 0.f, dS, T);   // dP = dY V^T
        sgemm(true, false, T, hd, T, 1.f, P, T, dy, C, 0.f, dv, C3);   // dV = P^T dY
        for (int i = 0; i < T; i++) {  // softmax backward: dS = P * (dP - sum_j P dP)
            const float* p = P + (size_t)i * T;
            float* d = dS + (size_t)i * T;
            float s = 0.f;
            for (int j = 0; j <= i; j++) s += p[j] * d[j];
            for (int j = 0; j <= i; j++) d[j] = p[j] * (d[j] - s) * scale;
            for (int j = i + 1; j < T; j++) d[j] = 0.f;
        }
        sgemm(false, false, T, hd, T, 1.f, dS, T, k, C3, 0.f, dq, C3);  // dQ = dS K
        sgemm(true, false, T, hd, T, 1.f, dS, T, q, C3, 0.f, dk, C3);   // dK = dS^T Q
    }
}

// Final LayerNorm, tied LM head and cross-entropy, chunked over rows so that only
// chunk_rows_ x V logits exist at a time; with backward, each chunk's d(logits) is turned
// into d(ln_f out) and d(wte) at once. Rows without a target (masked prompt tokens) are
// skipped unless logits are requested. Leaves d(x_final) in s_dres.
double Model::head(const int* targets, bool backward, float grad_scale, float* logits_out) {
    const int C = cfg.C, V = cfg.vocab;
    layernorm_forward(s_ln, lnf_mean, lnf_rstd, x_final, lnf_w, lnf_b, N, C, cfg.eps);
    rows_.clear();
    for (int n = 0; n < N; n++)
        if (logits_out || targets[n] >= 0) rows_.push_back(n);
    const int R = (int)rows_.size();
    if (backward) std::fill(s_dln, s_dln + (size_t)N * C, 0.f);
    double loss = 0.0;
    for (int r0 = 0; r0 < R; r0 += chunk_rows_) {
        const int rows = std::min(chunk_rows_, R - r0);
        const int* idx = rows_.data() + r0;
#pragma omp parallel for schedule(static)
        for (int i = 0; i < rows; i++) std::memcpy(s_lnc + (size_t)i * C, s_ln + (size_t)idx[i] * C, (size_t)C * 4);
        sgemm(false, true, rows, V, C, 1.f, s_lnc, C, wte, C, 0.f, s_logits, V);
        if (logits_out)
            for (int i = 0; i < rows; i++) std::memcpy(logits_out + (size_t)idx[i] * V, s_logits + (size_t)i * V, (size_t)V * 4);
#pragma omp parallel for schedule(static) reduction(+ : loss)
        for (int i = 0; i < rows; i++) {
            float* row = s_logits + (size_t)i * V;
            int tgt = targets[idx[i]];
            float mx = row[0];
            for (int j = 1; j < V; j++) mx = std::max(mx, row[j]);
            float lt = tgt >= 0 ? row[tgt] : 0.f;
            for (int j = 0; j < V; j++) row[j] = fast_exp(row[j] - mx);
            double sum = 0.0;
            for (int j = 0; j < V; j++) sum += row[j];
            if (tgt >= 0) loss += std::log(sum) + mx - lt;
            if (backward) {
                if (tgt < 0) std::fill(row, row + V, 0.f);
                else {
                    float inv = (float)(grad_scale / sum);
                    for (int j = 0; j < V; j++) row[j] *= inv;
                    row[tgt] -= grad_scale;
                }
            }
        }
        if (backward) {
            sgemm(false, false, rows, C, V, 1.f, s_logits, V, wte, C, 0.f, s_dlnc, C);
#pragma omp parallel for schedule(static)
            for (int i = 0; i < rows; i++) std::memcpy(s_dln + (size_t)idx[i] * C, s_dlnc + (size_t)i * C, (size_t)C * 4);
            if (dwte) sgemm(true, false, V, C, rows, 1.f, s_logits, V, s_lnc, C, 1.f, dwte, C);
        }
    }
    if (backward) {
        std::fill(s_dres, s_dres + (size_t)N * C, 0.f);
        layernorm_backward(s_dres, dlnf_w, dlnf_b, s_lnpart, s_dln, x_final, lnf_w, lnf_mean, lnf_rstd, N, C);
    }
    return loss;
}

double Model::step(const int* inputs, const int* targets, bool backward, float grad_scale, float* logits_out) {
    const int C = cfg.C, F = cfg.F, L = cfg.L;
    float* x0 = blocks_[0].x;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* e = wte + (size_t)inputs[n] * C;
        const float* p = wpe + (size_t)(n % T) * C;
        float* o = x0 + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
    }
    for (int l = 0; l < L; l++) {
        Block& b = blocks_[l];
        float* next = l + 1 < L ? blocks_[l + 1].x : x_final;
        layernorm_forward(s_ln, b.ln1_mean, b.ln1_rstd, b.x, b.ln1_w, b.ln1_b, N, C, cfg.eps);
        linear_forward(b.qkv, s_ln, b.qkv_out, b.u_qkv, N, 0.f);
        attention_forward(b);
        std::memcpy(b.res2, b.x, (size_t)N * C * 4);
        linear_forward(b.attn_out, b.atty, b.res2, b.u_attn_out, N, 1.f);
        layernorm_forward(s_ln, b.ln2_mean, b.ln2_rstd, b.res2, b.ln2_w, b.ln2_b, N, C, cfg.eps);
        float* h = b.act_out ? b.act_out : s_gelu;
        linear_forward(b.fc, s_ln, s_dfch, b.u_fc, N, 0.f);  // s_dfch: pre-activation, only needed here
        gelu_forward_deriv(h, b.act_d, s_dfch, (size_t)N * F, cfg.act);
        std::memcpy(next, b.res2, (size_t)N * C * 4);
        linear_forward(b.fc_out, h, next, b.u_fc_out, N, 1.f);
    }
    double loss = head(targets, backward, grad_scale, logits_out);
    if (!backward) return loss;

    for (int l = L - 1; l >= 0; l--) {
        Block& b = blocks_[l];
        // s_dres holds d(block output) = d(res2) through the residual path
        layernorm_apply(s_ln, b.ln2_mean, b.ln2_rstd, b.res2, b.ln2_w, b.ln2_b, N, C);
        linear_backward(b.fc_out, b.act_out, s_dres, s_dfch, b.u_fc_out, s_du, s_ones, N);
        mul_inplace(s_dfch, b.act_d, (size_t)N * F);
        linear_backward(b.fc, s_ln, s_dfch, s_dln, b.u_fc, s_du, s_ones, N);
        layernorm_backward(s_dres, b.dln2_w, b.dln2_b, s_lnpart, s_dln, b.res2, b.ln2_w, b.ln2_mean, b.ln2_rstd, N, C);

        linear_backward(b.attn_out, b.atty, s_dres, s_datty, b.u_attn_out, s_du, s_ones, N);
        attention_backward(b, s_datty, s_dqkv);
        layernorm_apply(s_ln, b.ln1_mean, b.ln1_rstd, b.x, b.ln1_w, b.ln1_b, N, C);
        bool need_dx = full || l > 0;  // with frozen embeddings nothing below layer 0 learns
        linear_backward(b.qkv, s_ln, s_dqkv, need_dx ? s_dln : nullptr, b.u_qkv, s_du, s_ones, N);
        if (need_dx)
            layernorm_backward(s_dres, b.dln1_w, b.dln1_b, s_lnpart, s_dln, b.x, b.ln1_w, b.ln1_mean, b.ln1_rstd, N, C);
    }
    if (full) {  // embeddings: scatter-add, parallel over channel ranges so rows never race
        const int CB = 64;
#pragma omp parallel for schedule(static)
        for (int c0 = 0; c0 < C; c0 += CB) {
            int c1 = std::min(C, c0 + CB);
            for (int n = 0; n < N; n++) {
                const float* d = s_dres + (size_t)n * C;
                float* ge = dwte + (size_t)inputs[n] * C;
                float* gp = dwpe + (size_t)(n % T) * C;
                for (int i = c0; i < c1; i++) {
                    ge[i] += d[i];
                    gp[i] += d[i];
                }
            }
        }
    }
    return loss;
}

// ---------------------------------------------------------------------------------------
// saving

static void copy_if_exists(const std::string& from, const std::string& to) {
    std::ifstream in(from, std::ios::binary);
    if (!in) return;
    std::stringstream ss;
    ss << in.rdbuf();
    write_file_atomic(to, ss.str());
}

void Model::save_full(const std::string& dir) const {
    SafetensorsWriter w;
    for (const ParamEntry& e : params_) w.add(e.name, e.shape, param_buf_.data() + e.offset);
    w.write(dir + "/model.safetensors", {{"format", "pt"}});
    json c = cfg.raw;
    if (c.contains("torch_dtype")) c["torch_dtype"] = "float32";
    c["dtype"] = "float32";
    write_file_atomic(dir + "/config.json", c.dump(2) + "\n");
    const std::string& src = cfg.source_dir;
    if (!src.empty())
        for (const char* f : {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "generation_config.json"})
            copy_if_exists(src + "/" + f, dir + "/" + f);
}

void Model::save_adapter(const std::string& dir, const std::string& base_model) const {
    SafetensorsWriter w;
    for (const TrainSegment& s : trainable_) w.add(s.name, s.shape, s.p);
    w.write(dir + "/adapter_model.safetensors", {{"format", "pt"}});
    json c = {{"peft_type", "LORA"},        {"task_type", "CAUSAL_LM"},  {"r", lora.r},
              {"lora_alpha", lora.alpha},   {"lora_dropout", 0.0},       {"target_modules", lora.targets},
              {"fan_in_fan_out", true},     {"bias", "none"},            {"base_model_name_or_path", base_model},
              {"inference_mode", true},     {"init_lora_weights", true}, {"use_rslora", false},
              {"use_dora", false},          {"modules_to_save", nullptr}};
    write_file_atomic(dir + "/adapter_config.json", c.dump(2) + "\n");
}

}  // namespace mfb

#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <sstream>

#include <sys/mman.h>

#include "common.h"
#include "gemm.h"
#include "safetensors.h"
#include "shard.h"

namespace mfb {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------
// config: fields a config.json leaves out take transformers' defaults (GPT2Config,
// Qwen2Config, Gemma3TextConfig)

namespace {
struct Fields {
    const json& j;
    const std::string& path;
    bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
    int integer(const char* k, int dflt, bool required = false) const {
        if (!has(k)) {
            if (required) throw Error(path, std::string("missing field '") + k + "'", "a positive integer");
            return dflt;
        }
        if (!j[k].is_number_integer() || j[k].get<long long>() <= 0 || j[k].get<long long>() > (1LL << 30))
            throw Error(path, std::string("field '") + k + "' is " + j[k].dump(), "a positive integer");
        return j[k].get<int>();
    }
    float number(const json& o, const char* k, float dflt) const {
        if (!o.contains(k) || o[k].is_null()) return dflt;
        if (!o[k].is_number() || !(o[k].get<double>() > 0))
            throw Error(path, std::string("field '") + k + "' is " + o[k].dump(), "a positive number");
        return o[k].get<float>();
    }
    float number(const char* k, float dflt) const { return number(j, k, dflt); }
    bool flag(const char* k, bool dflt) const {
        if (!has(k)) return dflt;
        if (!j[k].is_boolean()) throw Error(path, std::string("field '") + k + "' is " + j[k].dump(), "true or false");
        return j[k].get<bool>();
    }
    std::string str(const char* k, const std::string& dflt) const {
        if (!has(k)) return dflt;
        if (!j[k].is_string()) throw Error(path, std::string("field '") + k + "' is " + j[k].dump(), "a string");
        return j[k].get<std::string>();
    }
    // A rope parameter set ({"rope_type", "rope_theta", "factor"}, or legacy {"type", "factor"}):
    // default and linear scaling are supported.
    void rope(const json& p, const std::string& where, float theta_dflt, LayerAttn& out) const {
        if (!p.is_null() && !p.is_object()) throw Error(path, where + " is " + p.dump(), "an object");
        std::string type = "default";
        if (p.is_object()) type = p.value("rope_type", p.value("type", std::string("default")));
        out.rope_theta = p.is_object() ? number(p, "rope_theta", theta_dflt) : theta_dflt;
        out.rope_factor = 1.f;
        if (type == "linear") out.rope_factor = number(p, "factor", 0.f);
        else if (type != "default")
            throw Error(path, where + " rope_type '" + type + "' is not supported", "default or linear rope");
        if (!(out.rope_factor > 0)) throw Error(path, where + " has no positive 'factor'", "a linear rope factor > 0");
    }
    // which layers are sliding_attention, from layer_types as transformers writes it
    std::vector<bool> sliding_layers(int L) const {
        std::vector<bool> out(L, false);
        const json& t = j["layer_types"];
        if (!t.is_array() || (int)t.size() != L)
            throw Error(path, "layer_types has " + std::to_string(t.is_array() ? t.size() : 0) + " entries",
                        "a list of num_hidden_layers = " + std::to_string(L) + " layer types");
        for (int l = 0; l < L; l++) {
            std::string s = t[l].is_string() ? t[l].get<std::string>() : t[l].dump();
            if (s != "full_attention" && s != "sliding_attention")
                throw Error(path, "layer_types[" + std::to_string(l) + "] '" + s + "' is not supported",
                            "full_attention or sliding_attention");
            out[l] = s == "sliding_attention";
        }
        return out;
    }
};
}  // namespace

static void load_gpt2(Config& c, const Fields& f) {
    c.family = Family::Gpt2;
    c.vocab = f.integer("vocab_size", 0, true);
    c.max_pos = f.integer("n_positions", 1024);
    c.C = f.integer("n_embd", 0, true);
    c.L = f.integer("n_layer", 0, true);
    c.H = f.integer("n_head", 0, true);
    c.KV = c.H;
    c.F = f.integer("n_inner", 4 * c.C);
    if (c.C % c.H)
        throw Error(f.path, "n_embd " + std::to_string(c.C) + " is not divisible by n_head " + std::to_string(c.H), "n_embd % n_head == 0");
    c.head_dim = c.C / c.H;
    c.eps = f.number("layer_norm_epsilon", 1e-5f);
    std::string act = f.str("activation_function", "gelu_new");
    if (act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast") c.act = ActKind::GeluTanh;
    else if (act == "gelu") c.act = ActKind::GeluErf;
    else throw Error(f.path, "activation_function '" + act + "' is not supported", "gelu_new, gelu_pytorch_tanh, gelu_fast or gelu");
    c.tied = f.flag("tie_word_embeddings", true);
    if (f.flag("add_cross_attention", false)) throw Error(f.path, "add_cross_attention is not supported", "a causal LM");
    float scale = f.flag("scale_attn_weights", true) ? 1.f / std::sqrt((float)c.head_dim) : 1.f;
    bool by_layer = f.flag("scale_attn_by_inverse_layer_idx", false);
    for (int l = 0; l < c.L; l++) c.layers.push_back({by_layer ? scale / (l + 1) : scale, 0, 0.f, 1.f});
}

// Shared by Qwen 2 and Gemma 3: sizes, grouped heads, RMSNorm, gated MLP.
static void load_rotary_common(Config& c, const Fields& f, int vocab, int C, int F, int L, int H, int KV, int max_pos) {
    c.vocab = f.integer("vocab_size", vocab);
    c.C = f.integer("hidden_size", C);
    c.F = f.integer("intermediate_size", F);
    c.L = f.integer("num_hidden_layers", L);
    c.H = f.integer("num_attention_heads", H);
    c.KV = f.integer("num_key_value_heads", KV > 0 ? KV : c.H);
    c.max_pos = f.integer("max_position_embeddings", max_pos);
    if (c.H % c.KV)
        throw Error(f.path, "num_attention_heads " + std::to_string(c.H) + " is not a multiple of num_key_value_heads " + std::to_string(c.KV),
                    "grouped-query attention with whole groups");
    c.eps = f.number("rms_norm_eps", 1e-6f);
    c.norm = NormKind::RMSNorm;
    c.gated = true;
    c.layers.assign(c.L, LayerAttn{});
}

static void load_qwen2(Config& c, const Fields& f) {
    c.family = Family::Qwen2;
    load_rotary_common(c, f, 151936, 4096, 22016, 32, 32, 0, 32768);
    if (f.has("head_dim")) c.head_dim = f.integer("head_dim", 0);
    else if (c.C % c.H) throw Error(f.path, "hidden_size is not divisible by num_attention_heads", "head_dim, or hidden_size % num_attention_heads == 0");
    else c.head_dim = c.C / c.H;
    std::string act = f.str("hidden_act", "silu");
    if (act != "silu" && act != "swish") throw Error(f.path, "hidden_act '" + act + "' is not supported", "silu");
    c.act = ActKind::Silu;
    c.tied = f.flag("tie_word_embeddings", false);
    c.qkv_bias = true;
    c.o_bias = false;
    LayerAttn rope;
    if (f.has("rope_parameters")) f.rope(f.j["rope_parameters"], "rope_parameters", 10000.f, rope);
    else f.rope(f.has("rope_scaling") ? f.j["rope_scaling"] : json(), "rope_scaling", f.number("rope_theta", 10000.f), rope);
    // transformers: sliding layers are those at index >= max_window_layers, when use_sliding_window
    bool use_window = f.flag("use_sliding_window", false);
    int window = use_window && f.has("sliding_window") ? f.integer("sliding_window", 0) : 0;
    std::vector<bool> sliding(c.L, false);
    if (f.has("layer_types")) sliding = f.sliding_layers(c.L);
    else if (window)
        for (int l = f.integer("max_window_layers", 28); l < c.L; l++) sliding[l] = true;
    const float scale = 1.f / std::sqrt((float)c.head_dim);
    for (int l = 0; l < c.L; l++) {
        if (sliding[l] && !window) throw Error(f.path, "layer " + std::to_string(l) + " is sliding_attention without a sliding window", "use_sliding_window true and sliding_window set");
        c.layers[l] = {scale, sliding[l] ? window : 0, rope.rope_theta, rope.rope_factor};
    }
}

static void load_gemma3(Config& c, const Fields& f) {
    c.family = Family::Gemma3;
    load_rotary_common(c, f, 262208, 2304, 9216, 26, 8, 4, 131072);
    c.head_dim = f.integer("head_dim", 256);
    std::string act = f.str("hidden_activation", "gelu_pytorch_tanh");
    if (act != "gelu_pytorch_tanh" && act != "gelu_new" && act != "gelu_fast")
        throw Error(f.path, "hidden_activation '" + act + "' is not supported", "gelu_pytorch_tanh");
    c.act = ActKind::GeluTanh;
    c.tied = f.flag("tie_word_embeddings", true);
    c.qkv_bias = c.o_bias = f.flag("attention_bias", false);
    c.norm_plus_one = c.qk_norm = c.post_norms = true;
    c.embed_scale = std::sqrt((float)c.C);
    for (const char* k : {"attn_logit_softcapping", "final_logit_softcapping"})
        if (f.has(k)) throw Error(f.path, std::string(k) + " " + f.j[k].dump() + " is not supported", std::string(k) + " null");
    if (f.flag("use_bidirectional_attention", false))
        throw Error(f.path, "use_bidirectional_attention true is not supported", "a causal LM (false)");
    float scale = 1.f / std::sqrt(f.number("query_pre_attn_scalar", 256.f));
    int window = f.integer("sliding_window", 4096);
    // rotary bases: rope_parameters per layer type (transformers 5), or the legacy
    // rope_theta (full layers, with rope_scaling) and rope_local_base_freq (sliding layers)
    LayerAttn full, local;
    if (f.has("rope_parameters")) {
        const json& p = f.j["rope_parameters"];
        if (!p.is_object()) throw Error(f.path, "rope_parameters is " + p.dump(), "an object per layer type");
        f.rope(p.value("full_attention", json()), "rope_parameters.full_attention", 1e6f, full);
        f.rope(p.value("sliding_attention", json()), "rope_parameters.sliding_attention", 1e4f, local);
    } else {
        f.rope(f.has("rope_scaling") ? f.j["rope_scaling"] : json(), "rope_scaling", f.number("rope_theta", 1e6f), full);
        f.rope(json(), "rope_local_base_freq", f.number("rope_local_base_freq", 1e4f), local);
    }
    std::vector<bool> sliding(c.L);
    if (f.has("layer_types")) sliding = f.sliding_layers(c.L);
    else
        for (int l = 0, pattern = f.integer("sliding_window_pattern", 6); l < c.L; l++) sliding[l] = (l + 1) % pattern != 0;
    for (int l = 0; l < c.L; l++) {
        const LayerAttn& r = sliding[l] ? local : full;
        c.layers[l] = {scale, sliding[l] ? window : 0, r.rope_theta, r.rope_factor};
    }
}

Config load_config(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw Error(path, "cannot open", "an HF config.json");
    Config c;
    try {
        c.raw = json::parse(in);
    } catch (const json::exception&) {
        throw Error(path, "not valid JSON", "an HF config.json");
    }
    if (!c.raw.is_object()) throw Error(path, "not a JSON object", "an HF config.json");
    Fields f{c.raw, path};
    const std::string model_type = f.str("model_type", "gpt2");
    if (model_type == "gpt2") load_gpt2(c, f);
    else if (model_type == "qwen2") load_qwen2(c, f);
    else if (model_type == "gemma3_text") load_gemma3(c, f);
    else throw Error(path, "model_type '" + model_type + "' is not supported", "gpt2, qwen2 or gemma3_text");
    if (c.head_dim % 2 && c.layers[0].rope_theta > 0) throw Error(path, "head_dim " + std::to_string(c.head_dim) + " is odd", "an even head_dim for the rotary embedding");
    return c;
}

// ---------------------------------------------------------------------------------------
// dense layers (the other kernels are in layers.cpp)

static void mul_inplace(float* d, const float* g, size_t n) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) d[i] *= g[i];
}

static void add(float* out, const float* a, const float* b, size_t n) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

const float* Frozen::get(const float* p32, const uint16_t* p16, size_t n, size_t at) const {
    if (!p16) return p32;
    if (at + n > capacity) throw std::logic_error("scratch.weight holds " + std::to_string(capacity) + " values, not " + std::to_string(at + n));
    widen(kind, p16, scratch + at, n);
    return scratch + at;
}

// y[N, out] = beta * y + x[N, in] W (+ b) (+ scale (x A^T) B^T, keeping u = x A^T [N, r])
static void linear_forward(const Linear& l, const float* x, float* y, int N, float beta) {
    const float* w = l.frozen->get(l.w, l.w16, (size_t)l.in * l.out);
    if (l.layout == WeightLayout::InOut) sgemm(false, false, N, l.out, l.in, 1.f, x, l.in, w, l.out, beta, y, l.out);
    else sgemm(false, true, N, l.out, l.in, 1.f, x, l.in, w, l.in, beta, y, l.out);
    if (l.b || l.b16) {
        const float* b = l.frozen->get(l.b, l.b16, l.out);  // (over the widened weight: its product is done)
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            float* yr = y + (size_t)n * l.out;
            for (int j = 0; j < l.out; j++) yr[j] += b[j];
        }
    }
    if (l.r) {
        const float* xa = x;  // the adapter's input: x, or x dropped out into scratch
        if (l.dropout->on()) l.dropout->apply(l.id, x, l.dropout->scratch, (size_t)N * l.in, false), xa = l.dropout->scratch;
        sgemm(false, true, N, l.r, l.in, 1.f, xa, l.in, l.A, l.in, 0.f, l.u, l.r);
        sgemm(false, true, N, l.out, l.r, l.scale, l.u, l.r, l.B, l.r, 1.f, y, l.out);
    }
}

// dx[N, in] (+)= dy W^T (+ LoRA path), when dx is given; dW, db, dA, dB accumulate when trainable.
static void linear_backward(const Linear& l, const float* x, const float* dy, float* dx, bool accumulate, float* du,
                            const float* ones, int N) {
    if (dx) {
        float beta = accumulate ? 1.f : 0.f;
        const float* w = l.frozen->get(l.w, l.w16, (size_t)l.in * l.out);
        if (l.layout == WeightLayout::InOut) sgemm(false, true, N, l.in, l.out, 1.f, dy, l.out, w, l.out, beta, dx, l.in);
        else sgemm(false, false, N, l.in, l.out, 1.f, dy, l.out, w, l.in, beta, dx, l.in);
    }
    if (l.dw) {
        if (l.layout == WeightLayout::InOut) sgemm(true, false, l.in, l.out, N, 1.f, x, l.in, dy, l.out, 1.f, l.dw, l.out);
        else sgemm(true, false, l.out, l.in, N, 1.f, dy, l.out, x, l.in, 1.f, l.dw, l.in);
    }
    if (l.db) sgemm(false, false, 1, l.out, N, 1.f, ones, N, dy, l.out, 1.f, l.db, l.out);
    if (l.r) {
        sgemm(true, false, l.out, l.r, N, l.scale, dy, l.out, l.u, l.r, 1.f, l.dB, l.r);
        sgemm(false, false, N, l.r, l.out, l.scale, dy, l.out, l.B, l.r, 0.f, du, l.r);
        const bool drop = l.dropout->on();
        const float* xa = x;  // the adapter's input: x, or the forward's dropped x again (the same mask)
        if (drop) l.dropout->apply(l.id, x, l.dropout->scratch, (size_t)N * l.in, false), xa = l.dropout->scratch;
        sgemm(true, false, l.r, l.in, N, 1.f, du, l.r, xa, l.in, 1.f, l.dA, l.in);
        if (dx && !drop) sgemm(false, false, N, l.in, l.r, 1.f, du, l.r, l.A, l.in, 1.f, dx, l.in);
        if (dx && drop) {  // through the mask: dx += drop(du A)
            sgemm(false, false, N, l.in, l.r, 1.f, du, l.r, l.A, l.in, 0.f, l.dropout->scratch, l.in);
            l.dropout->apply(l.id, l.dropout->scratch, dx, (size_t)N * l.in, true);
        }
    }
}

// ---------------------------------------------------------------------------------------
// planning: make_plan (plan.cpp) lists every buffer; the arena holds them all, each at a
// 64-byte boundary, in table order (so params.* are contiguous, and grads.* mirror them)

//
// Checkpointing: the recomputed buffers of the checkpointed blocks are never alive at the
// same time, so they share one region, each block's packed from its start. The region lies
// over the kept buffers after the last checkpointed block's output (the next block's and the
// head's): those are not yet written while a checkpointed block runs forward, and already
// freed when one recomputes; so the arena is the plan's replayed peak, not its table's sum.
Arena::Arena(const Plan& plan) {
    size_t used = 16;  // slack to align the base
    offset.assign(plan.buffers.size(), 0);
    int last = -1;  // the last checkpointed block
    for (const PlanBuffer& b : plan.buffers)
        if (b.lifetime == Lifetime::Recomputed) last = std::max(last, std::atoi(b.name.c_str() + 5));
    const std::string after = plan.find("block" + std::to_string(last + 1) + ".x") ? "block" + std::to_string(last + 1) + ".x"
                                                                                      : "head.x";
    size_t region = used;
    // sharding: every params.* and grads.* buffer on its own pages (evicting one releases its
    // pages and no neighbour's; grads.* still mirror params.*)
    for (const PlanBuffer& b : plan.buffers) mapped = mapped || b.lifetime == Lifetime::Sharded;
    const size_t page = 1024;  // 4096-byte pages, in elements
    auto paged = [&](const PlanBuffer& b) { return mapped && (b.name.rfind("params.", 0) == 0 || b.name.rfind("grads.", 0) == 0); };
    for (size_t i = 0; i < plan.buffers.size(); i++) {
        const PlanBuffer& b = plan.buffers[i];
        if (b.lifetime == Lifetime::Recomputed || b.lifetime == Lifetime::Scratch) continue;
        if (paged(b)) used = (used + page - 1) / page * page;
        offset[i] = used;
        used += paged(b) ? (b.reserved + page - 1) / page * page : padded(b.reserved);
        if (b.name == after) region = used;
    }
    std::map<std::string, size_t> block_used;  // "block{l}" -> its recomputed elements so far
    for (size_t i = 0; i < plan.buffers.size(); i++) {
        const PlanBuffer& b = plan.buffers[i];
        if (b.lifetime != Lifetime::Recomputed) continue;
        size_t& u = block_used[b.name.substr(0, b.name.find('.'))];
        offset[i] = region + u;
        u += padded(b.reserved);
        used = std::max(used, region + u);
    }
    for (size_t i = 0; i < plan.buffers.size(); i++)
        if (plan.buffers[i].lifetime == Lifetime::Scratch) {
            offset[i] = used;
            used += padded(plan.buffers[i].reserved);
        }
    if (mapped) {  // page-aligned from mmap, and so is every paged offset
        bytes = used * sizeof(float);
        void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) throw std::bad_alloc();
        base = static_cast<float*>(m);
        return;
    }
    // calloc: zeroed pages, touched only when a buffer is used
    base = static_cast<float*>(std::calloc(used, sizeof(float)));
    if (!base) throw std::bad_alloc();
    size_t mis = (reinterpret_cast<uintptr_t>(base) % 64) / sizeof(float);
    for (size_t& o : offset) o -= mis;
}

Arena::~Arena() {
    if (mapped) munmap(base, bytes);
    else std::free(base);
}

float* Model::buffer(const std::string& name, size_t elements) const {
    for (size_t i = 0; i < plan_.buffers.size(); i++) {
        const PlanBuffer& b = plan_.buffers[i];
        if (b.name != name) continue;
        if (b.elements != elements)
            throw std::logic_error("plan buffer " + name + " holds " + std::to_string(b.elements) + " elements, not " + std::to_string(elements));
        return arena_.base + arena_.offset[i];
    }
    throw std::logic_error("no plan buffer " + name);
}

float* Model::kept(int l, const std::string& name, size_t elements) const {
    return buffer("block" + std::to_string(l) + "." + name, elements);
}

float* Model::kept_if(int l, const std::string& name, size_t elements) const {
    return plan_.find("block" + std::to_string(l) + "." + name) ? kept(l, name, elements) : nullptr;
}

float* Model::param(const std::string& name) const {
    if (frozen_.kind != Half::None) return nullptr;
    for (const ParamEntry& e : params_)
        if (e.name == name) return param_base_ + e.offset;
    throw std::logic_error("no parameter " + name);
}

uint16_t* Model::param16(const std::string& name) const {
    if (frozen_.kind == Half::None) return nullptr;
    for (const ParamEntry& e : params_)
        if (e.name == name) return reinterpret_cast<uint16_t*>(param_base_) + e.offset;
    throw std::logic_error("no parameter " + name);
}

bool Model::has_param(const std::string& name) const {
    for (const ParamEntry& e : params_)
        if (e.name == name) return true;
    return false;
}

static std::string block_name(const Config& c, int l) {
    return (c.family == Family::Gpt2 ? "transformer.h." : "model.layers.") + std::to_string(l) + ".";
}

void Model::make_linear(Linear& lin, int l, const std::string& module, int in, int out) {
    lin.name = block_name(cfg, l) + module;
    lin.in = in;
    lin.out = out;
    lin.layout = cfg.family == Family::Gpt2 ? WeightLayout::InOut : WeightLayout::OutIn;  // Conv1D vs nn.Linear
    lin.w = param(lin.name + ".weight");
    lin.w16 = param16(lin.name + ".weight");
    lin.frozen = &frozen_;
    if (has_param(lin.name + ".bias")) lin.b = param(lin.name + ".bias"), lin.b16 = param16(lin.name + ".bias");
    lin.u = kept_if(l, module + ".lora_u", (size_t)N * lora.r);
    if (lin.u) {
        lin.r = lora.r;
        lin.scale = lora.alpha / lora.r;
        lin.id = (int)lora_layers_.size();
        lin.dropout = &dropout_;
        lora_layers_.push_back(&lin);
    }
}

// A norm of a block (layer >= 0) or the final norm (-1) over `rows` rows: its parameters and
// its kept statistics.
void Model::make_norm(Norm& n, int l, const std::string& module, int rows) {
    const std::string pre = l >= 0 ? block_name(cfg, l) : (cfg.family == Family::Gpt2 ? "transformer." : "model.");
    const std::string kpre = l >= 0 ? "block" + std::to_string(l) + "." + module : "head." + module;
    n.w = param(pre + module + ".weight");
    n.w16 = param16(pre + module + ".weight");
    if (cfg.norm == NormKind::LayerNorm) {
        n.b = param(pre + module + ".bias");
        n.b16 = param16(pre + module + ".bias");
        n.mean = buffer(kpre + ".mean", rows);
    }
    n.rstd = buffer(kpre + ".rstd", rows);
}

Model::Model(const Config& c, const PlanOptions& opt, const LoraOptions& lora_)
    : cfg(c), B(opt.B), T(opt.T), N(opt.B * opt.T), full(opt.full), lora(lora_), plan_(make_plan(c, opt)), arena_(plan_),
      chunk_rows_(opt.chunk_rows), threads_(std::max(1, opt.threads)) {
    const int C = cfg.C, V = cfg.vocab, F = cfg.F, H = cfg.H, KV = cfg.KV, hd = cfg.head_dim, L = cfg.L;
    const int qd = H * hd, kvd = KV * hd;
    const bool gpt2 = cfg.family == Family::Gpt2;
    const size_t NC = (size_t)N * C, NF = (size_t)N * F;
    ldq_ = gpt2 ? 3 * C : qd;
    ldkv_ = gpt2 ? 3 * C : kvd;

    // parameters: packed into their shard's params.* buffer in order (fp32, or 16-bit frozen)
    frozen_.kind = opt.frozen;
    param_base_ = arena_.base + arena_.offset[0];
    for (const PlanBuffer& b : plan_.buffers) {
        if (b.name.rfind("params.", 0) != 0) continue;
        char* p = reinterpret_cast<char*>(buffer(b.name, b.elements));
        for (const ParamTensor& t : plan_.params) {
            if (t.shard != b.shard) continue;
            size_t n = 1;
            for (auto d : t.shape) n *= (size_t)d;
            params_.push_back({t.name, t.shape, (size_t)(p - reinterpret_cast<char*>(param_base_)) / b.width, n});
            p += b.width * (b.width == 4 ? padded(n) : padded16(n));
        }
    }
    // params_ back in transformers' order (init streams and saved files follow it)
    std::vector<ParamEntry> ordered;
    for (const ParamTensor& t : plan_.params)
        for (const ParamEntry& e : params_)
            if (e.name == t.name) ordered.push_back(e);
    params_ = ordered;
    if (full) grad_base_ = buffer("grads.embed", plan_.find("params.embed")->elements);

    wte = param(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight");
    wte16 = param16(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight");
    if (gpt2) wpe = param("transformer.wpe.weight"), wpe16 = param16("transformer.wpe.weight");
    blocks_.resize(L);
    for (int l = 0; l < L; l++) {
        Block& b = blocks_[l];
        b.x = kept(l, "x", NC);
        if (gpt2) {
            make_norm(b.ln1, l, "ln_1", N);
            make_linear(b.qkv, l, "attn.c_attn", C, 3 * C);
            make_linear(b.o, l, "attn.c_proj", C, C);
            make_norm(b.ln2, l, "ln_2", N);
            make_linear(b.up, l, "mlp.c_fc", C, F);
            make_linear(b.down, l, "mlp.c_proj", F, C);
            b.qkv_out = kept(l, "attn.qkv", NC * 3);
            b.q_out = b.qkv_out, b.k_out = b.qkv_out + C, b.v_out = b.qkv_out + 2 * C;
            b.res2 = kept(l, "residual", NC);
            b.act_d = kept(l, "mlp.act_d", NF);
        } else {
            make_linear(b.q, l, "self_attn.q_proj", C, qd);
            make_linear(b.k, l, "self_attn.k_proj", C, kvd);
            make_linear(b.v, l, "self_attn.v_proj", C, kvd);
            make_linear(b.o, l, "self_attn.o_proj", qd, C);
            if (cfg.qk_norm) {
                make_norm(b.q_norm, l, "self_attn.q_norm", N * H);
                make_norm(b.k_norm, l, "self_attn.k_norm", N * KV);
                b.q_raw = kept(l, "attn.q_raw", (size_t)N * qd);
                b.k_raw = kept(l, "attn.k_raw", (size_t)N * kvd);
            }
            make_linear(b.gate, l, "mlp.gate_proj", C, F);
            make_linear(b.up, l, "mlp.up_proj", C, F);
            make_linear(b.down, l, "mlp.down_proj", F, C);
            make_norm(b.ln1, l, "input_layernorm", N);
            if (cfg.post_norms) {
                make_norm(b.post_attn, l, "post_attention_layernorm", N);
                make_norm(b.ln2, l, "pre_feedforward_layernorm", N);
                make_norm(b.post_mlp, l, "post_feedforward_layernorm", N);
                b.proj = kept(l, "attn.proj", NC);
                b.mlp_out = kept(l, "mlp.down", NC);
            } else {
                make_norm(b.ln2, l, "post_attention_layernorm", N);
            }
            b.q_out = kept(l, "attn.q", (size_t)N * qd);
            b.k_out = kept(l, "attn.k", (size_t)N * kvd);
            b.v_out = kept(l, "attn.v", (size_t)N * kvd);
            b.res2 = kept(l, "residual", NC);
            b.gate_out = kept(l, "mlp.gate", NF);
            b.up_out = kept(l, "mlp.up", NF);
        }
        if (opt.memory_efficient) b.lse = kept(l, "attn.lse", (size_t)B * H * T);
        else b.att = kept(l, "attn.probs", (size_t)B * H * T * T);
        b.atty = kept(l, "attn.out", (size_t)N * qd);
        b.act_out = kept_if(l, "mlp.act_out", NF);
    }
    make_norm(lnf, -1, gpt2 ? "ln_f" : "norm", N);
    lm_head = cfg.tied ? wte : param("lm_head.weight");
    lm_head16 = cfg.tied ? wte16 : param16("lm_head.weight");
    x_final = buffer("head.x", NC);

    s_ln = buffer("scratch.ln", NC);
    s_act = buffer("scratch.act", NF);
    s_dres = buffer("scratch.dres", NC);
    s_dln = buffer("scratch.dln", NC);
    s_dq = buffer("scratch.dqkv", (size_t)N * (gpt2 ? 3 * C : qd + 2 * kvd));
    s_dk = s_dq + (gpt2 ? C : (size_t)N * qd);
    s_dv = gpt2 ? s_dq + 2 * C : s_dk + (size_t)N * kvd;
    s_datty = buffer("scratch.datty", (size_t)N * qd);
    s_dh = buffer("scratch.dh", NF);
    s_dup = cfg.gated ? buffer("scratch.dup", NF) : nullptr;
    s_logits = buffer("head.logits", (size_t)chunk_rows_ * V);
    s_lnc = buffer("head.ln_chunk", (size_t)chunk_rows_ * C);
    s_dlnc = buffer("head.dln_chunk", (size_t)chunk_rows_ * C);
    s_du = buffer("scratch.du", (size_t)N * std::max(1, lora.r));
    s_ones = buffer("scratch.ones", N);
    s_datt = buffer("scratch.datt", (size_t)threads_ * (opt.memory_efficient ? attention_me_scratch(T, kAttnBlock) : (size_t)T * T));
    s_normpart = buffer("scratch.normpart", (size_t)threads_ * 2 * std::max(C, hd));
    if (lora.dropout > 0.0) {
        dropout_.p = lora.dropout;
        dropout_.scratch = buffer("scratch.lora_x", lora_dropout_scratch_elements(plan_));
    }
    if (frozen_.kind != Half::None) {
        frozen_.capacity = weight_scratch_elements(cfg);
        frozen_.scratch = buffer("scratch.weight", frozen_.capacity);
    }
    std::fill(s_ones, s_ones + N, 1.f);
    rows_.reserve(N);
    row_targets_.reserve(N);

    const size_t half = hd / 2;
    if (plan_.find("rope.cos")) {
        rope_cos_ = buffer("rope.cos", (size_t)L * T * half);
        rope_sin_ = buffer("rope.sin", (size_t)L * T * half);
        for (int l = 0; l < L; l++)
            rope_tables(&rope_cos_[(size_t)l * T * half], &rope_sin_[(size_t)l * T * half], T, hd, cfg.layers[l].rope_theta,
                        cfg.layers[l].rope_factor);
    }

    // LoRA adapters: A then B of each adapted layer, packed into lora.params in module order
    if (!full) {
        float* p = buffer("lora.params", plan_.find("lora.params")->elements);
        float* g = buffer("lora.grads", plan_.find("lora.grads")->elements);
        for (Linear* l : lora_layers_) {
            size_t na = (size_t)l->r * l->in, nb = (size_t)l->out * l->r;
            l->A = p, l->dA = g;
            p += padded(na), g += padded(na);
            l->B = p, l->dB = g;
            p += padded(nb), g += padded(nb);
        }
    }
    auto grad = [&](float* p) { return full && p ? grad_base_ + (p - param_base_) : nullptr; };
    auto norm_grads = [&](Norm& n) { n.dw = grad(n.w), n.db = grad(n.b); };
    dwte = grad(wte);
    dwpe = grad(wpe);
    dlm_head = grad(lm_head);
    norm_grads(lnf);
    for (Block& b : blocks_) {
        for (Norm* n : {&b.ln1, &b.ln2, &b.post_attn, &b.post_mlp, &b.q_norm, &b.k_norm}) norm_grads(*n);
        for (Linear* l : {&b.qkv, &b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
            if (l->frozen) l->dw = grad(l->w), l->db = grad(l->b);
    }
    if (full) {
        for (size_t k = 0; k < params_.size(); k++) {
            const ParamEntry& e = params_[k];
            trainable_.push_back({e.name, e.shape, param_base_ + e.offset, grad_base_ + e.offset, e.numel, e.shape.size() >= 2,
                                  plan_.params[k].shard});
        }
    } else {
        for (Linear* l : lora_layers_) {
            trainable_.push_back({"base_model.model." + l->name + ".lora_A.weight", {l->r, l->in}, l->A, l->dA, (size_t)l->r * l->in, true, ""});
            trainable_.push_back({"base_model.model." + l->name + ".lora_B.weight", {l->out, l->r}, l->B, l->dB, (size_t)l->out * l->r, true, ""});
        }
    }
}

void Model::zero_grads() {
    if (plan_.opt.offload_gradients) return;  // the step program zeroes each shard's gradient at its first use
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

// LoRA dropout's masks, from the same generator (model.h, Dropout)
void Model::dropout_at(uint64_t seed, int step, int micro_batch) {
    dropout_.seed = seed, dropout_.step = step, dropout_.micro_batch = micro_batch;
}

void Dropout::apply(int id, const float* x, float* out, size_t n, bool accumulate) const {
    const uint64_t stream = mix64(mix64(mix64((uint64_t)step) ^ (uint64_t)micro_batch) ^ (uint64_t)id);
    const float keep = (float)(1.0 / (1.0 - p));
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        const float v = uniform01(seed, stream, i) >= p ? x[i] * keep : 0.f;
        out[i] = accumulate ? out[i] + v : v;
    }
}

// Elements [first, first + n) of the stream (first even).
static void fill_normal(float* p, size_t n, float std, uint64_t seed, uint64_t stream, size_t first = 0) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < (n + 1) / 2; i++) {  // Box-Muller: one pair of uniforms, two normals
        const size_t k = first + 2 * i;
        double u1 = uniform01(seed, stream, k), u2 = uniform01(seed, stream, k + 1);
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

// LoRA adapters as peft initialises them: A kaiming-uniform (a = sqrt(5), i.e.
// U(-1/sqrt(in), 1/sqrt(in))), B zero.
void Model::init_adapters(uint64_t seed) {
    for (size_t k = 0; k < lora_layers_.size(); k++) {
        Linear* l = lora_layers_[k];
        fill_uniform(l->A, (size_t)l->r * l->in, 1.f / std::sqrt((float)l->in), seed, 1000003 + k);
        std::fill(l->B, l->B + (size_t)l->out * l->r, 0.f);
    }
}

template <class Fill>
void Model::set_param(const ParamEntry& e, Fill fill) {
    if (frozen_.kind == Half::None) return fill(param_base_ + e.offset, 0, e.numel);
    uint16_t* p = reinterpret_cast<uint16_t*>(param_base_) + e.offset;
    const size_t chunk = frozen_.capacity & ~(size_t)1;  // even: normal pairs stay whole
    for (size_t first = 0; first < e.numel; first += chunk) {
        const size_t n = std::min(chunk, e.numel - first);
        fill(frozen_.scratch, first, n);
        narrow(frozen_.kind, frozen_.scratch, p + first, n);
    }
}

// As transformers initialises: N(0, initializer_range) for matrices and embeddings (GPT-2:
// N(0, 0.02 / sqrt(2 L)) for the residual projections c_proj), zero biases, norm gains of
// one (zero for Gemma's (1 + w) norms); adapters as peft does.
void Model::random_init(uint64_t seed, const std::string& shard) {
    float std0 = cfg.raw.value("initializer_range", 0.02f);
    for (size_t k = 0; k < params_.size(); k++) {
        const ParamEntry& e = params_[k];
        if (!shard.empty() && plan_.params[k].shard != shard) continue;
        if (e.shape.size() >= 2) {
            float s = ends_with(e.name, "c_proj.weight") ? std0 / std::sqrt(2.f * cfg.L) : std0;
            set_param(e, [&](float* p, size_t first, size_t n) { fill_normal(p, n, s, seed, k + 1, first); });
        } else {
            bool gain = !ends_with(e.name, ".bias") && !cfg.norm_plus_one;
            set_param(e, [&](float* p, size_t, size_t n) { std::fill(p, p + n, gain ? 1.f : 0.f); });
        }
    }
}


void Model::load_weights(const std::string& path, const std::string& shard) {
    SafetensorsReader rd(path);
    for (size_t k = 0; k < params_.size(); k++) {
        const ParamEntry& e = params_[k];
        if (!shard.empty() && plan_.params[k].shard != shard) continue;
        std::string name = e.name;
        // original OpenAI checkpoints name tensors without the "transformer." prefix
        if (cfg.family == Family::Gpt2 && !rd.has(name) && rd.has(name.substr(12))) name = name.substr(12);
        set_param(e, [&](float* p, size_t first, size_t n) { rd.read_f32(name, e.shape, p, first, n); });
    }
}

void Model::load_adapter(const std::string& path) {
    SafetensorsReader rd(path);
    std::set<std::string> used;
    for (Linear* l : lora_layers_) {
        std::string pre = "base_model.model." + l->name;
        rd.read_f32(pre + ".lora_A.weight", {l->r, l->in}, l->A);
        rd.read_f32(pre + ".lora_B.weight", {l->out, l->r}, l->B);
        used.insert({pre + ".lora_A.weight", pre + ".lora_B.weight"});
    }
    for (const std::string& n : rd.names())  // an adapter this run would not train is not dropped silently
        if (!used.count(n))
            throw Error(path, "tensor '" + n + "' is not an adapter of the targeted modules",
                        "lora_A and lora_B of exactly the modules the targets match");
}

// ---------------------------------------------------------------------------------------
// forward and backward

void Model::norm_forward(Norm& n, float* out, const float* x, int rows, int width) {
    const float *w = frozen_.get(n.w, n.w16, width), *b = frozen_.get(n.b, n.b16, width, width);
    if (cfg.norm == NormKind::LayerNorm) layernorm_forward(out, n.mean, n.rstd, x, w, b, rows, width, cfg.eps);
    else rmsnorm_forward(out, n.rstd, x, w, rows, width, cfg.eps, cfg.norm_plus_one);
}

// Recompute a norm's output from its kept statistics.
void Model::norm_apply(const Norm& n, float* out, const float* x, int rows, int width) {
    const float *w = frozen_.get(n.w, n.w16, width), *b = frozen_.get(n.b, n.b16, width, width);
    if (cfg.norm == NormKind::LayerNorm) layernorm_apply(out, n.mean, n.rstd, x, w, b, rows, width);
    else rmsnorm_apply(out, n.rstd, x, w, rows, width, cfg.norm_plus_one);
}

// dx (+)= norm'(dout); the weight (and bias) gradients accumulate when trained.
void Model::norm_backward(Norm& n, float* dx, const float* dout, const float* x, int rows, int width, bool accumulate) {
    const float* w = frozen_.get(n.w, n.w16, width);
    if (cfg.norm == NormKind::LayerNorm) {
        if (!accumulate) std::fill(dx, dx + (size_t)rows * width, 0.f);
        layernorm_backward(dx, n.dw, n.db, s_normpart, threads_, dout, x, w, n.mean, n.rstd, rows, width);
    } else {
        rmsnorm_backward(dx, n.dw, s_normpart, threads_, dout, x, w, n.rstd, rows, width, cfg.norm_plus_one, accumulate);
    }
}

// One transformer block: from blocks_[l].x to out.
void Model::block_forward(int l, float* out) {
    Block& b = blocks_[l];
    const LayerAttn& la = cfg.layers[l];
    const int C = cfg.C, F = cfg.F, H = cfg.H, KV = cfg.KV, hd = cfg.head_dim;
    const size_t NC = (size_t)N * C, NF = (size_t)N * F;
    // attention
    norm_forward(b.ln1, s_ln, b.x, N, C);
    if (cfg.family == Family::Gpt2) {
        linear_forward(b.qkv, s_ln, b.qkv_out, N, 0.f);
    } else {
        linear_forward(b.q, s_ln, cfg.qk_norm ? b.q_raw : b.q_out, N, 0.f);
        linear_forward(b.k, s_ln, cfg.qk_norm ? b.k_raw : b.k_out, N, 0.f);
        linear_forward(b.v, s_ln, b.v_out, N, 0.f);
    }
    if (cfg.qk_norm) {
        norm_forward(b.q_norm, b.q_out, b.q_raw, N * H, hd);
        norm_forward(b.k_norm, b.k_out, b.k_raw, N * KV, hd);
    }
    if (la.rope_theta > 0) {
        const float *cs = &rope_cos_[(size_t)l * T * (hd / 2)], *sn = &rope_sin_[(size_t)l * T * (hd / 2)];
        rope_forward(b.q_out, cs, sn, N, T, H, hd, ldq_);
        rope_forward(b.k_out, cs, sn, N, T, KV, hd, ldkv_);
    }
    if (b.lse)
        attention_me_forward(b.atty, b.lse, s_datt, threads_, b.q_out, b.k_out, b.v_out, B, T, H, KV, hd, ldq_, ldkv_, H * hd,
                             la.scale, la.window, kAttnBlock);
    else
        attention_forward(b.atty, b.att, b.q_out, b.k_out, b.v_out, B, T, H, KV, hd, ldq_, ldkv_, H * hd, la.scale, la.window);
    if (cfg.post_norms) {
        linear_forward(b.o, b.atty, b.proj, N, 0.f);
        norm_forward(b.post_attn, s_ln, b.proj, N, C);
        add(b.res2, b.x, s_ln, NC);
    } else {
        std::memcpy(b.res2, b.x, NC * 4);
        linear_forward(b.o, b.atty, b.res2, N, 1.f);
    }
    // MLP
    norm_forward(b.ln2, s_ln, b.res2, N, C);
    float* a = b.act_out ? b.act_out : s_act;
    if (cfg.gated) {
        linear_forward(b.gate, s_ln, b.gate_out, N, 0.f);
        linear_forward(b.up, s_ln, b.up_out, N, 0.f);
        gated_forward(a, b.gate_out, b.up_out, NF, cfg.act);
    } else {
        linear_forward(b.up, s_ln, s_dh, N, 0.f);  // s_dh: the pre-activation, only needed here
        act_forward_deriv(a, b.act_d, s_dh, NF, cfg.act);
    }
    if (cfg.post_norms) {
        linear_forward(b.down, a, b.mlp_out, N, 0.f);
        norm_forward(b.post_mlp, s_ln, b.mlp_out, N, C);
        add(out, b.res2, s_ln, NC);
    } else {
        std::memcpy(out, b.res2, NC * 4);
        linear_forward(b.down, a, out, N, 1.f);
    }
}

// s_dres holds d(block output) on entry and d(block input) on return (for layer 0 without
// trained embeddings the input gradient is not needed and left out).
void Model::block_backward(int l) {
    Block& b = blocks_[l];
    const LayerAttn& la = cfg.layers[l];
    const int C = cfg.C, F = cfg.F, H = cfg.H, KV = cfg.KV, hd = cfg.head_dim;
    const size_t NF = (size_t)N * F;
    // MLP: d(res2) = d(out) + ln2'(mlp'(d(out)))
    const float* dmlp = s_dres;
    if (cfg.post_norms) {
        norm_backward(b.post_mlp, s_dln, s_dres, b.mlp_out, N, C, false);
        dmlp = s_dln;
    }
    norm_apply(b.ln2, s_ln, b.res2, N, C);
    linear_backward(b.down, b.act_out, dmlp, s_dh, false, s_du, s_ones, N);  // act_out: null when down learns nothing
    if (cfg.gated) {
        gated_backward(s_dh, s_dup, s_dh, b.gate_out, b.up_out, NF, cfg.act);
        linear_backward(b.gate, s_ln, s_dh, s_dln, false, s_du, s_ones, N);
        linear_backward(b.up, s_ln, s_dup, s_dln, true, s_du, s_ones, N);
    } else {
        mul_inplace(s_dh, b.act_d, NF);
        linear_backward(b.up, s_ln, s_dh, s_dln, false, s_du, s_ones, N);
    }
    norm_backward(b.ln2, s_dres, s_dln, b.res2, N, C, true);
    // attention: d(x) = d(res2) + ln1'(attention'(d(res2)))
    const float* dproj = s_dres;
    if (cfg.post_norms) {
        norm_backward(b.post_attn, s_dln, s_dres, b.proj, N, C, false);
        dproj = s_dln;
    }
    linear_backward(b.o, b.atty, dproj, s_datty, false, s_du, s_ones, N);
    if (b.lse)
        attention_me_backward(s_dq, s_dk, s_dv, s_datt, threads_, s_datty, b.q_out, b.k_out, b.v_out, b.atty, b.lse, B, T, H, KV,
                              hd, ldq_, ldkv_, H * hd, la.scale, la.window, kAttnBlock);
    else
        attention_backward(s_dq, s_dk, s_dv, s_datt, threads_, s_datty, b.q_out, b.k_out, b.v_out, b.att, B, T, H, KV, hd, ldq_,
                           ldkv_, H * hd, la.scale, la.window);
    if (la.rope_theta > 0) {
        const float *cs = &rope_cos_[(size_t)l * T * (hd / 2)], *sn = &rope_sin_[(size_t)l * T * (hd / 2)];
        rope_backward(s_dq, cs, sn, N, T, H, hd, ldq_);
        rope_backward(s_dk, cs, sn, N, T, KV, hd, ldkv_);
    }
    if (cfg.qk_norm) {  // in place: d(q before its norm) over d(q after it)
        norm_backward(b.q_norm, s_dq, s_dq, b.q_raw, N * H, hd, false);
        norm_backward(b.k_norm, s_dk, s_dk, b.k_raw, N * KV, hd, false);
    }
    norm_apply(b.ln1, s_ln, b.x, N, C);
    const bool need_dx = full || l > 0;  // with frozen embeddings nothing below layer 0 learns
    float* dx = need_dx ? s_dln : nullptr;
    if (cfg.family == Family::Gpt2) {
        linear_backward(b.qkv, s_ln, s_dq, dx, false, s_du, s_ones, N);
    } else {
        linear_backward(b.q, s_ln, s_dq, dx, false, s_du, s_ones, N);
        linear_backward(b.k, s_ln, s_dk, dx, true, s_du, s_ones, N);
        linear_backward(b.v, s_ln, s_dv, dx, true, s_du, s_ones, N);
    }
    if (need_dx) norm_backward(b.ln1, s_dres, s_dln, b.x, N, C, true);
}

// Final norm, LM head and cross-entropy, chunked over rows so that only chunk_rows_ x V
// logits exist at a time; with backward, each chunk's d(logits) is turned into d(norm out)
// and d(lm_head) at once. Rows without a target (masked prompt tokens) are skipped unless
// logits are requested. Leaves d(x_final) in s_dres.
double Model::head(const int* targets, bool backward, float grad_scale, float* logits_out) {
    const int C = cfg.C, V = cfg.vocab;
    norm_forward(lnf, s_ln, x_final, N, C);
    rows_.clear();
    row_targets_.clear();
    for (int n = 0; n < N; n++)
        if (logits_out || targets[n] >= 0) rows_.push_back(n), row_targets_.push_back(targets[n]);
    const int R = (int)rows_.size();
    // the head's rows [v0, v0 + vb): a 16-bit head is widened VB vocabulary rows at a time
    // (scratch.weight bounds it; the whole head widened would be V x C fp32), fp32 is one block
    const int VB = lm_head16 ? (int)(frozen_.capacity / C) : V;
    auto head_rows = [&](int v0, int vb) {
        return lm_head16 ? frozen_.get(nullptr, lm_head16 + (size_t)v0 * C, (size_t)vb * C) : lm_head + (size_t)v0 * C;
    };
    if (backward) std::fill(s_dln, s_dln + (size_t)N * C, 0.f);
    double loss = 0.0;
    for (int r0 = 0; r0 < R; r0 += chunk_rows_) {
        const int rows = std::min(chunk_rows_, R - r0);
        const int* idx = rows_.data() + r0;
#pragma omp parallel for schedule(static)
        for (int i = 0; i < rows; i++) std::memcpy(s_lnc + (size_t)i * C, s_ln + (size_t)idx[i] * C, (size_t)C * 4);
        for (int v0 = 0; v0 < V; v0 += VB) {
            const int vb = std::min(VB, V - v0);
            sgemm(false, true, rows, vb, C, 1.f, s_lnc, C, head_rows(v0, vb), C, 0.f, s_logits + v0, V);
        }
        if (logits_out)
            for (int i = 0; i < rows; i++) std::memcpy(logits_out + (size_t)idx[i] * V, s_logits + (size_t)i * V, (size_t)V * 4);
        loss += cross_entropy_chunk(s_logits, row_targets_.data() + r0, rows, V, backward, grad_scale);
        if (backward) {
            for (int v0 = 0; v0 < V; v0 += VB) {
                const int vb = std::min(VB, V - v0);
                sgemm(false, false, rows, C, vb, 1.f, s_logits + v0, V, head_rows(v0, vb), C, v0 ? 1.f : 0.f, s_dlnc, C);
            }
#pragma omp parallel for schedule(static)
            for (int i = 0; i < rows; i++) std::memcpy(s_dln + (size_t)idx[i] * C, s_dlnc + (size_t)i * C, (size_t)C * 4);
            if (dlm_head) sgemm(true, false, V, C, rows, 1.f, s_logits, V, s_lnc, C, 1.f, dlm_head, C);
        }
    }
    if (backward) norm_backward(lnf, s_dres, s_dln, x_final, N, C, false);
    return loss;
}

double Model::step(const int* inputs, const int* targets, bool backward, float grad_scale, float* logits_out) {
    const int C = cfg.C, L = cfg.L;
    const float es = cfg.embed_scale;
    float* x0 = blocks_[0].x;
    dropout_.training = backward;
    // sharding: before each owner's ops, the io the step program puts there, and a wait for
    // the parts they need; then the owner's region starts (timed when on_region is set)
    std::string region;
    const char* region_phase = nullptr;
    double region_start = 0.0;
    auto end_region = [&] {
        if (on_region && region_phase) on_region(region, region_phase, region_start, now_s());
        region_phase = nullptr;
    };
    auto enter = [&](const std::string& owner, const char* phase) {
        end_region();
        if (shards) shards->enter(owner, phase);
        if (on_region) region = owner, region_phase = phase, region_start = now_s();
    };
    auto block = [](int l) { return "block" + std::to_string(l); };
    enter("embed", "forward");
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* o = x0 + (size_t)n * C;
        const size_t e = (size_t)inputs[n] * C, pos = (size_t)(n % T) * C;
        if (wte16) {  // 16-bit embeddings: rows widened on the fly
            for (int i = 0; i < C; i++) o[i] = half_to_f32(frozen_.kind, wte16[e + i]) * es;
            if (wpe16)
                for (int i = 0; i < C; i++) o[i] += half_to_f32(frozen_.kind, wpe16[pos + i]);
            continue;
        }
        for (int i = 0; i < C; i++) o[i] = wte[e + i] * es;
        if (wpe)
            for (int i = 0; i < C; i++) o[i] += wpe[pos + i];
    }
    for (int l = 0; l < L; l++) {
        enter(block(l), "forward");
        block_forward(l, l + 1 < L ? blocks_[l + 1].x : x_final);
    }
    enter("head", "forward");
    double loss = head(targets, backward, grad_scale, logits_out);
    if (!backward) {
        end_region();
        return loss;
    }
    for (int l = L - 1; l >= 0; l--) {
        // checkpointing: the block's forward again, the same kernels on the same input, so its
        // recomputed buffers hold the very values the forward wrote (its output is rewritten too:
        // nothing reads it any more)
        if (plan_.checkpointed(l)) {
            enter(block(l), "recompute");
            block_forward(l, l + 1 < L ? blocks_[l + 1].x : x_final);
        }
        enter(block(l), "backward");
        block_backward(l);
    }
    if (full) {  // embeddings: scatter-add, parallel over channel ranges so rows never race
        enter("embed", "backward");
        const int CB = 64;
#pragma omp parallel for schedule(static)
        for (int c0 = 0; c0 < C; c0 += CB) {
            int c1 = std::min(C, c0 + CB);
            for (int n = 0; n < N; n++) {
                const float* d = s_dres + (size_t)n * C;
                float* ge = dwte + (size_t)inputs[n] * C;
                for (int i = c0; i < c1; i++) ge[i] += d[i] * es;
                if (dwpe) {
                    float* gp = dwpe + (size_t)(n % T) * C;
                    for (int i = c0; i < c1; i++) gp[i] += d[i];
                }
            }
        }
    }
    end_region();
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
    for (size_t k = 0; k < params_.size(); k++) {
        const float* p = param_base_ + params_[k].offset;
        if (shards)  // its shard alone resident while it is written
            w.add(params_[k].name, params_[k].shape, [this, p, shard = plan_.params[k].shard] {
                shards->hold(shard);
                return p;
            });
        else w.add(params_[k].name, params_[k].shape, p);
    }
    w.write(dir + "/model.safetensors", {{"format", "pt"}});
    if (shards) shards->hold("");
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
              {"lora_alpha", lora.alpha},   {"lora_dropout", lora.dropout}, {"target_modules", lora.targets},
              {"fan_in_fan_out", cfg.family == Family::Gpt2},     {"bias", "none"},            {"base_model_name_or_path", base_model},
              {"inference_mode", true},     {"init_lora_weights", true}, {"use_rslora", false},
              {"use_dora", false},          {"modules_to_save", nullptr}};
    write_file_atomic(dir + "/adapter_config.json", c.dump(2) + "\n");
}

}  // namespace mfb

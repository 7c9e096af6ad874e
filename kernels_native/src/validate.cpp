#include "validate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <vector>

#include "common.h"
#include "model.h"
#include "plan.h"

namespace mfb {

namespace {

// The shortest form that reads back as v (-0.1, not -0.10000000000000001).
std::string num(double v) {
    char buf[32];
    if (v == std::floor(v) && std::fabs(v) < 1e15) {
        std::snprintf(buf, sizeof buf, "%.0f", v);
        return buf;
    }
    for (int digits = 1; digits <= 17; digits++) {
        std::snprintf(buf, sizeof buf, "%.*g", digits, v);
        if (std::strtod(buf, nullptr) == v) break;
    }
    return buf;
}

// One option: its flag and its run spec field, so an error names it as the user wrote it.
struct Check {
    const RunOptions& o;
    bool spec() const { return !o.spec_path.empty(); }
    void fail(const char* flag, const char* field, double v, const std::string& expected) const {
        if (spec()) throw Error(o.spec_path, std::string(field) + " is " + num(v), expected);
        throw Error("", std::string("option --") + flag + " got '" + num(v) + "'", expected);
    }
    void at_least(const char* flag, const char* field, double v, double lo) const {
        if (!(v >= lo) || !std::isfinite(v)) fail(flag, field, v, "a number >= " + num(lo));
    }
    void above(const char* flag, const char* field, double v, double lo) const {
        if (!(v > lo) || !std::isfinite(v)) fail(flag, field, v, "a number > " + num(lo));
    }
    void fraction(const char* flag, const char* field, double v) const {  // [0, 1)
        if (!(v >= 0 && v < 1)) fail(flag, field, v, "a number >= 0 and < 1");
    }
};

// Products of sizes in 64 bits, checked: the first that passes kMaxElements is an error
// naming its factors (config fields or options) and where they came from.
struct Sizes {
    std::string file;
    uint64_t product(std::initializer_list<std::pair<const char*, uint64_t>> factors) const {
        uint64_t p = 1;
        bool over = false;
        std::string names, values;
        for (const auto& f : factors) {
            over = over || __builtin_mul_overflow(p, f.second, &p);
            names += (names.empty() ? "" : " x ") + std::string(f.first);
            values += (values.empty() ? "" : " x ") + std::to_string(f.second);
        }
        if (over || p > kMaxElements)
            throw Error(file, names + ": " + values + (over ? " overflows 64 bits" : " = " + std::to_string(p)),
                        "at most " + std::to_string(kMaxElements) + " values in one buffer or row count");
        return p;
    }
};

}  // namespace

void validate_options(const RunOptions& o) {
    Check c{o};
    const bool lora = o.method == "lora";
    if (lora) {
        c.at_least("lora-r", "method.rank", o.lora_r, 1);
        c.above("lora-alpha", "method.alpha", o.lora_alpha, 0);
        c.fraction("lora-dropout", "method.dropout", o.lora_dropout);
    } else if (o.lora_dropout != 0) {  // dropout is the adapters' (peft's lora_dropout); Full-FT has none
        c.fail("lora-dropout", "method.dropout", o.lora_dropout, "0 for Full-FT (dropout applies to LoRA adapters)");
    }
    c.at_least("seq-len", "seq_len", o.seq_len, 0);  // 0: the flags' default, min(128, positions)
    c.at_least("batch", "micro_batch", o.micro_batch, 1);
    c.at_least("accum", "batch", o.micro_batches, 1);
    c.at_least("steps", "steps", o.steps, 0);
    c.at_least("lr", "optimizer.lr", o.lr, 0);
    c.at_least("min-lr", "optimizer.min_lr", o.min_lr, 0);
    c.at_least("weight-decay", "optimizer.weight_decay", o.weight_decay, 0);
    c.fraction("beta1", "optimizer.beta1", o.beta1);
    c.fraction("beta2", "optimizer.beta2", o.beta2);
    c.above("eps", "optimizer.eps", o.eps, 0);
    c.at_least("warmup", "optimizer.warmup_steps", o.warmup, 0);
    c.at_least("grad-clip", "optimizer.grad_clip", o.grad_clip, 0);  // 0: off (null in a run spec)
    c.at_least("ce-chunk-rows", "memory.ce_chunk_rows", o.ce_chunk_rows, -1);  // -1: auto
    if (o.threads < 1 || o.threads > kMaxThreads)
        c.fail("threads", "threads", o.threads, "an integer from 1 to " + std::to_string(kMaxThreads));
    c.at_least("sample-ms", "sample_ms", o.sample_ms, 0);
    c.at_least("checkpoint-every", "checkpoint_every", o.checkpoint_every, 0);
    c.above("pause-poll-s", "pause_poll_s", o.pause_poll_s, 0);
}

void read_adapter_config(RunOptions& o, bool r_given, bool alpha_given, bool targets_given) {
    using json = nlohmann::json;
    const std::string path = o.lora_init + "/adapter_config.json";
    std::ifstream in(path);
    if (!in) throw Error(path, "cannot open", "a peft adapter folder (adapter_config.json, adapter_model.safetensors)");
    json j;
    try {
        j = json::parse(in);
    } catch (const json::exception&) {
        throw Error(path, "not valid JSON", "a peft adapter_config.json");
    }
    if (!j.is_object()) throw Error(path, "not a JSON object", "a peft adapter_config.json");
    auto field = [&](const char* k) -> const json& {
        static const json null_value;
        return j.contains(k) ? j[k] : null_value;
    };
    if (field("peft_type") != "LORA") throw Error(path, "peft_type is " + field("peft_type").dump(), "\"LORA\"");
    // settings that change what the adapter computes: only their neutral value (or absence)
    for (const char* k : {"use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
                          "layers_pattern", "exclude_modules", "modules_to_save", "target_parameters",
                          "trainable_token_indices", "layer_replication", "use_qalora", "alora_invocation_tokens",
                          "use_bdlora"}) {
        const json& v = field(k);
        if (!(v.is_null() || v == false || (v.is_object() && v.empty()) || (v.is_array() && v.empty())))
            throw Error(path, std::string(k) + " is " + v.dump() + ": not supported by the native trainer", "null, false or empty");
    }
    if (!field("bias").is_null() && field("bias") != "none")
        throw Error(path, "bias is " + field("bias").dump() + ": not supported by the native trainer", "\"none\"");
    const json &r = field("r"), &alpha = field("lora_alpha"), &targets = field("target_modules");
    if (!r.is_number_unsigned() || r.get<uint64_t>() < 1 || r.get<uint64_t>() > INT32_MAX)
        throw Error(path, "r is " + r.dump(), "a positive integer");
    if (!alpha.is_number() || !(alpha.get<double>() > 0) || !std::isfinite(alpha.get<double>()))
        throw Error(path, "lora_alpha is " + alpha.dump(), "a number > 0");
    if (!targets.is_array() || targets.empty())
        throw Error(path, "target_modules is " + targets.dump(), "a list of module names (a regex string is not supported)");
    std::vector<std::string> names;
    for (const json& t : targets) {
        if (!t.is_string() || t.get<std::string>().empty()) throw Error(path, "target_modules is " + targets.dump(), "a list of module names");
        names.push_back(t.get<std::string>());
    }
    std::set<std::string> have(names.begin(), names.end()), want(o.lora_targets.begin(), o.lora_targets.end());
    if (r_given && o.lora_r != r.get<int>())
        throw Error(path, "r is " + r.dump() + " but --lora-r is " + std::to_string(o.lora_r), "the same rank, or no --lora-r");
    if (alpha_given && o.lora_alpha != alpha.get<double>())
        throw Error(path, "lora_alpha is " + alpha.dump() + " but --lora-alpha is " + num(o.lora_alpha), "the same alpha, or no --lora-alpha");
    if (targets_given && have != want)
        throw Error(path, "target_modules is " + targets.dump() + " but --lora-targets is " + json(o.lora_targets).dump(),
                    "the same modules, or no --lora-targets");
    o.lora_r = r.get<int>();
    o.lora_alpha = alpha.get<double>();
    o.lora_targets = names;
}

void check_sizes(const Config& c, const RunOptions& o, int T) {
    const bool gpt2 = c.family == Family::Gpt2, flags = o.spec_path.empty();
    const char *V = "vocab_size", *C = gpt2 ? "n_embd" : "hidden_size",
               *L = gpt2 ? "n_layer" : "num_hidden_layers", *H = gpt2 ? "n_head" : "num_attention_heads",
               *KV = gpt2 ? "n_head" : "num_key_value_heads", *hd = "head_dim",
               *P = gpt2 ? "n_positions" : "max_position_embeddings";
    const char *Bn = flags ? "--batch" : "micro_batch", *Tn = flags ? "--seq-len" : "seq_len",
               *Kn = flags ? "--accum" : "batch / micro_batch", *Rn = flags ? "--lora-r" : "method.rank",
               *Pn = flags ? "--threads" : "threads";
    // the model alone: its file
    Sizes m{o.config_path};
    const uint64_t qd = m.product({{H, c.H}, {hd, c.head_dim}}), kvd = m.product({{KV, c.KV}, {hd, c.head_dim}});
    const uint64_t width = std::max({(uint64_t)c.C, (uint64_t)c.F, qd, kvd, gpt2 ? 3 * (uint64_t)c.C : 0});
    m.product({{V, c.vocab}, {C, c.C}});
    m.product({{P, c.max_pos}, {C, c.C}});
    m.product({{C, c.C}, {"the widest projection", width}});
    if ((uint64_t)c.L > kMaxLayers)
        throw Error(m.file, std::string(L) + " is " + std::to_string(c.L), "at most " + std::to_string(kMaxLayers) + " layers");
    // the run's shape: the spec's file (flags: none); the config's when its fields take part
    Sizes r{o.spec_path};
    const uint64_t N = r.product({{Bn, o.micro_batch}, {Tn, T}});
    r.product({{Kn, o.micro_batches}, {Bn, o.micro_batch}, {Tn, T}});
    Sizes rm{o.config_path};
    const uint64_t passes = (uint64_t)o.micro_batches * c.L;  // both < 2^31: no overflow
    if (passes > kMaxLayerPasses)
        throw Error(rm.file, std::string(Kn) + " x " + L + ": " + std::to_string(o.micro_batches) + " x " + std::to_string(c.L),
                    "at most " + std::to_string(kMaxLayerPasses) + " layer passes a step (the plan lists every op)");
    rm.product({{Bn, o.micro_batch}, {Tn, T}, {"the widest activation", width}});
    if (o.memory_efficient) rm.product({{Bn, o.micro_batch}, {H, c.H}, {Tn, T}});
    else rm.product({{Bn, o.micro_batch}, {H, c.H}, {Tn, T}, {Tn, T}});
    rm.product({{Pn, o.threads}, {Tn, T}, {Tn, T}});
    rm.product({{Pn, o.threads}, {"2", 2}, {"the widest norm", std::max(c.C, c.head_dim)}});
    rm.product({{L, c.L}, {Tn, T}, {hd, c.head_dim}});
    rm.product({{"ce chunk rows", (uint64_t)resolve_chunk_rows(o.ce_chunk_rows, (int)N, c.vocab)}, {V, c.vocab}});
    if (o.method == "lora") {
        rm.product({{Bn, o.micro_batch}, {Tn, T}, {Rn, o.lora_r}});
        rm.product({{Rn, o.lora_r}, {"the widest projection", width}});
    }
}

void check_plan(const Plan& p, const std::string& config_path) {
    for (const PlanBuffer& b : p.buffers)
        if (b.elements > kMaxElements)
            throw Error(config_path, "buffer " + b.name + " would hold " + std::to_string(b.elements) + " values",
                        "at most " + std::to_string(kMaxElements) + " in one buffer: a smaller model, batch or seq-len");
}

}  // namespace mfb

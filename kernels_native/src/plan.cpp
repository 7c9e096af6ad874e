#include "plan.h"

#include <algorithm>
#include <map>
#include <set>
#include <stdexcept>
#include <nlohmann/json.hpp>

#include "common.h"
#include "layers.h"
#include "model.h"
#include "shard.h"

namespace mfb {

using json = nlohmann::json;

bool lora_matches(const std::string& name, const std::string& t) {
    return name == t || (name.size() > t.size() && name.compare(name.size() - t.size() - 1, std::string::npos, "." + t) == 0);
}

namespace {

// One entry of a block's parameter list: a linear (in -> out) or a norm of `width`.
struct Module {
    std::string name;  // relative to the block, e.g. "attn.c_attn"
    bool linear;
    int in, out;  // linear
    bool bias;
    int width;  // norm
};

std::vector<Module> block_modules(const Config& c) {
    const int C = c.C, F = c.F, qd = c.H * c.head_dim, kvd = c.KV * c.head_dim;
    auto lin = [](std::string n, int in, int out, bool bias) { return Module{std::move(n), true, in, out, bias, 0}; };
    auto norm = [](std::string n, int w) { return Module{std::move(n), false, 0, 0, false, w}; };
    if (c.family == Family::Gpt2)
        return {norm("ln_1", C), lin("attn.c_attn", C, 3 * C, true), lin("attn.c_proj", C, C, true), norm("ln_2", C),
                lin("mlp.c_fc", C, F, true), lin("mlp.c_proj", F, C, true)};
    std::vector<Module> m = {lin("self_attn.q_proj", C, qd, c.qkv_bias), lin("self_attn.k_proj", C, kvd, c.qkv_bias),
                             lin("self_attn.v_proj", C, kvd, c.qkv_bias), lin("self_attn.o_proj", qd, C, c.o_bias)};
    if (c.qk_norm) m.push_back(norm("self_attn.q_norm", c.head_dim)), m.push_back(norm("self_attn.k_norm", c.head_dim));
    for (Module x : {lin("mlp.gate_proj", C, F, false), lin("mlp.up_proj", C, F, false), lin("mlp.down_proj", F, C, false),
                     norm("input_layernorm", C), norm("post_attention_layernorm", C)})
        m.push_back(x);
    if (c.post_norms) m.push_back(norm("pre_feedforward_layernorm", C)), m.push_back(norm("post_feedforward_layernorm", C));
    return m;
}

std::string block_prefix(const Config& c, int l) {
    return (c.family == Family::Gpt2 ? "transformer.h." : "model.layers.") + std::to_string(l) + ".";
}

const char* lifetime_name(Lifetime lt) {
    switch (lt) {
        case Lifetime::Static: return "static";
        case Lifetime::Scratch: return "scratch";
        case Lifetime::Kept: return "kept";
        case Lifetime::Recomputed: return "recomputed";
        case Lifetime::Sharded: return "sharded";
    }
    return "";
}

using Alloc = std::vector<std::pair<std::string, size_t>>;  // kept buffers an op writes first: name, elements

// Emits the ops of one micro-batch; records the kept buffers (of micro-batch 0) in order.
struct Emitter {
    const Config& c;
    const PlanOptions& o;
    const std::map<std::string, bool>& adapted;  // HF module name -> has an adapter
    std::vector<PlanOp>& ops;
    std::vector<PlanBuffer>* kept;  // null after micro-batch 0
    int m;
    std::vector<std::string> owned;  // kept buffers of the block being emitted (its frees)

    void op(const std::string& owner, const std::string& kernel, const char* kind, const char* phase, int layer,
            const Alloc& alloc = {}) {
        PlanOp p;
        p.name = "mb" + std::to_string(m) + "." + owner + "." + kernel;
        p.kind = kind;
        p.phase = phase;
        p.layer = layer;
        p.shard = layer >= 0 ? "block" + std::to_string(layer) : "embed";
        p.micro_batch = m;
        for (const auto& a : alloc) {
            p.alloc.push_back(a.first);
            if (kept && p.phase == "forward") kept->push_back({a.first, a.second, a.second, Lifetime::Kept, ""});
        }
        ops.push_back(std::move(p));
    }
    // A block op; its kept buffers, except the next block's input, belong to the block.
    void bop(int l, const std::string& kernel, const char* kind, const char* phase, const Alloc& alloc = {},
             const std::string& next_x = "") {
        Alloc named;
        for (const auto& a : alloc) {
            std::string n = a.first == next_x && !next_x.empty() ? a.first : "block" + std::to_string(l) + "." + a.first;
            if (n == next_x && std::string(phase) == "recompute") continue;  // the block's output is still alive
            named.push_back({n, a.second});
            if (n != next_x) owned.push_back(n);
        }
        op("block" + std::to_string(l), kernel, kind, phase, l, named);
    }
    bool is_adapted(int l, const std::string& module) const {
        auto it = adapted.find(block_prefix(c, l) + module);
        return it != adapted.end() && it->second;
    }
    void linear(int l, const std::string& module, const char* phase, const Alloc& alloc = {}, const std::string& next_x = "") {
        bop(l, module, "linear", phase, alloc, next_x);
        if (is_adapted(l, module)) {
            const size_t N = (size_t)o.B * o.T;
            bop(l, module + ".lora", "lora", phase,
                std::string(phase) != "backward" ? Alloc{{module + ".lora_u", N * o.lora_r}} : Alloc{});
        }
    }
    Alloc stats(const std::string& norm, size_t rows) const {
        if (c.norm == NormKind::LayerNorm) return {{norm + ".mean", rows}, {norm + ".rstd", rows}};
        return {{norm + ".rstd", rows}};
    }
    void norm(int l, const std::string& n, const char* phase, Alloc alloc = {}, const std::string& next_x = "") {
        bop(l, n, "norm", phase, alloc, next_x);
    }

    // Block l's forward ops, phase "forward" or "recompute" (checkpointing: the same ops again,
    // allocating the block's own buffers). A checkpointed block's last forward op frees them.
    void block_forward(int l, const char* ph) {
        const size_t N = (size_t)o.B * o.T, C = c.C, F = c.F, qd = (size_t)c.H * c.head_dim, kvd = (size_t)c.KV * c.head_dim;
        const auto att = o.memory_efficient ? std::make_pair(std::string("attn.lse"), (size_t)o.B * c.H * o.T)
                                            : std::make_pair(std::string("attn.probs"), (size_t)o.B * c.H * o.T * o.T);
        const std::string next = l + 1 < c.L ? "block" + std::to_string(l + 1) + ".x" : "head.x";
        const std::string down = c.family == Family::Gpt2 ? "mlp.c_proj" : "mlp.down_proj";
        Alloc act_out;
        if (o.full || is_adapted(l, down)) act_out.push_back({"mlp.act_out", N * F});
        owned = {"block" + std::to_string(l) + ".x"};
        if (c.family == Family::Gpt2) {
            norm(l, "ln_1", ph, stats("ln_1", N));
            linear(l, "attn.c_attn", ph, {{"attn.qkv", N * 3 * C}});
            bop(l, "attn.sdpa", "attention", ph, {att, {"attn.out", N * C}});
            linear(l, "attn.c_proj", ph, {{"residual", N * C}});
            norm(l, "ln_2", ph, stats("ln_2", N));
            linear(l, "mlp.c_fc", ph);
            Alloc act = {{"mlp.act_d", N * F}};
            act.insert(act.end(), act_out.begin(), act_out.end());
            bop(l, "mlp.act", "elementwise", ph, act);
            linear(l, "mlp.c_proj", ph, {{next, N * C}}, next);
            return end_forward(l, ph);
        }
        const bool gemma = c.post_norms;
        norm(l, "input_layernorm", ph, stats("input_layernorm", N));
        linear(l, "self_attn.q_proj", ph, {{gemma ? "attn.q_raw" : "attn.q", N * qd}});
        linear(l, "self_attn.k_proj", ph, {{gemma ? "attn.k_raw" : "attn.k", N * kvd}});
        linear(l, "self_attn.v_proj", ph, {{"attn.v", N * kvd}});
        if (c.qk_norm) {
            Alloc q = stats("self_attn.q_norm", N * c.H), k = stats("self_attn.k_norm", N * c.KV);
            q.push_back({"attn.q", N * qd});
            k.push_back({"attn.k", N * kvd});
            norm(l, "self_attn.q_norm", ph, q);
            norm(l, "self_attn.k_norm", ph, k);
        }
        bop(l, "rope", "elementwise", ph);
        bop(l, "attn.sdpa", "attention", ph, {att, {"attn.out", N * qd}});
        if (gemma) {
            linear(l, "self_attn.o_proj", ph, {{"attn.proj", N * C}});
            Alloc a = stats("post_attention_layernorm", N);
            a.push_back({"residual", N * C});
            norm(l, "post_attention_layernorm", ph, a);
            norm(l, "pre_feedforward_layernorm", ph, stats("pre_feedforward_layernorm", N));
        } else {
            linear(l, "self_attn.o_proj", ph, {{"residual", N * C}});
            norm(l, "post_attention_layernorm", ph, stats("post_attention_layernorm", N));
        }
        linear(l, "mlp.gate_proj", ph, {{"mlp.gate", N * F}});
        linear(l, "mlp.up_proj", ph, {{"mlp.up", N * F}});
        bop(l, "mlp.act", "elementwise", ph, act_out);
        if (gemma) {
            linear(l, "mlp.down_proj", ph, {{"mlp.down", N * C}});
            Alloc a = stats("post_feedforward_layernorm", N);
            a.push_back({next, N * C});
            norm(l, "post_feedforward_layernorm", ph, a, next);
        } else {
            linear(l, "mlp.down_proj", ph, {{next, N * C}}, next);
        }
        end_forward(l, ph);
    }
    void end_forward(int l, const char* ph) {
        if (std::string(ph) == "forward" && o.recompute_every > 0 && l % o.recompute_every == 0)
            ops.back().free.assign(owned.begin() + 1, owned.end());  // block{l}.x stays: it is the checkpoint
    }

    void block_backward(int l, const std::vector<std::string>& frees) {
        if (c.family == Family::Gpt2) {
            norm(l, "ln_2", "recompute");
            linear(l, "mlp.c_proj", "backward");
            bop(l, "mlp.act", "elementwise", "backward");
            linear(l, "mlp.c_fc", "backward");
            norm(l, "ln_2", "backward");
            linear(l, "attn.c_proj", "backward");
            bop(l, "attn.sdpa", "attention", "backward");
            norm(l, "ln_1", "recompute");
            linear(l, "attn.c_attn", "backward");
        } else {
            const bool gemma = c.post_norms;
            const std::string ln2 = gemma ? "pre_feedforward_layernorm" : "post_attention_layernorm";
            if (gemma) norm(l, "post_feedforward_layernorm", "backward");
            norm(l, ln2, "recompute");
            linear(l, "mlp.down_proj", "backward");
            bop(l, "mlp.act", "elementwise", "backward");
            linear(l, "mlp.gate_proj", "backward");
            linear(l, "mlp.up_proj", "backward");
            norm(l, ln2, "backward");
            if (gemma) norm(l, "post_attention_layernorm", "backward");
            linear(l, "self_attn.o_proj", "backward");
            bop(l, "attn.sdpa", "attention", "backward");
            bop(l, "rope", "elementwise", "backward");
            if (c.qk_norm) norm(l, "self_attn.q_norm", "backward"), norm(l, "self_attn.k_norm", "backward");
            norm(l, "input_layernorm", "recompute");
            linear(l, "self_attn.q_proj", "backward");
            linear(l, "self_attn.k_proj", "backward");
            linear(l, "self_attn.v_proj", "backward");
        }
        // the input norm's backward only when something below the block learns
        if (o.full || l > 0) norm(l, c.family == Family::Gpt2 ? "ln_1" : "input_layernorm", "backward");
        ops.back().free = frees;
    }
};

}  // namespace

Plan make_plan(const Config& c, const PlanOptions& o) {
    Plan p;
    p.family = c.family == Family::Gpt2 ? "gpt2" : c.family == Family::Qwen2 ? "qwen2" : "gemma3_text";
    p.method = o.full ? "full" : "lora";
    p.opt = o;
    const bool gpt2 = c.family == Family::Gpt2, rotary = !gpt2;
    const size_t N = (size_t)o.B * o.T, C = c.C, V = c.vocab, F = c.F, L = c.L, hd = c.head_dim;
    const size_t qd = (size_t)c.H * hd, kvd = (size_t)c.KV * hd, R = o.chunk_rows;
    const bool lora = !o.full && o.lora_r > 0;

    // parameters, in transformers' order, each in its shard
    auto add_module = [&](const std::string& pre, const Module& m, const std::string& shard) {
        if (m.linear) {
            std::vector<int64_t> w = gpt2 ? std::vector<int64_t>{m.in, m.out} : std::vector<int64_t>{m.out, m.in};
            p.params.push_back({pre + m.name + ".weight", w, shard});
            if (m.bias) p.params.push_back({pre + m.name + ".bias", {m.out}, shard});
        } else {
            p.params.push_back({pre + m.name + ".weight", {m.width}, shard});
            if (c.norm == NormKind::LayerNorm) p.params.push_back({pre + m.name + ".bias", {m.width}, shard});
        }
    };
    p.params.push_back({gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight", {(int64_t)V, (int64_t)C}, "embed"});
    if (gpt2) p.params.push_back({"transformer.wpe.weight", {c.max_pos, (int64_t)C}, "embed"});
    const std::vector<Module> modules = block_modules(c);
    std::map<std::string, bool> adapted;
    for (int l = 0; l < c.L; l++) {
        const std::string pre = block_prefix(c, l), shard = "block" + std::to_string(l);
        for (const Module& m : modules) {
            add_module(pre, m, shard);
            if (!m.linear) continue;
            bool a = false;
            for (const auto& t : o.lora_targets) a = a || lora_matches(pre + m.name, t);
            adapted[pre + m.name] = lora && a;
            if (lora && a) p.adapters.push_back({pre + m.name, m.in, m.out});
        }
    }
    add_module(gpt2 ? "transformer." : "model.", {gpt2 ? "ln_f" : "norm", false, 0, 0, false, c.C}, "embed");
    if (!c.tied) p.params.push_back({"lm_head.weight", {(int64_t)V, (int64_t)C}, "embed"});
    if (lora)
        for (const auto& t : o.lora_targets) {  // peft would ignore a typo if another target matched
            bool found = false;
            for (const AdapterSpec& a : p.adapters) found = found || lora_matches(a.name, t);
            if (!found)
                throw Error(o.targets_file, o.targets_field + " '" + t + "' matches no module",
                            gpt2 ? "names such as c_attn, attn.c_proj, c_fc, mlp.c_proj"
                                 : "names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
        }

    // static buffers
    std::vector<std::string> shards = {"embed"};
    for (int l = 0; l < c.L; l++) shards.push_back("block" + std::to_string(l));
    std::vector<PlanBuffer> shard_bufs;
    if (o.full && o.frozen != Half::None) throw std::logic_error("Full-FT has no frozen parameters to hold 16-bit");
    const bool sharded = o.budget_bytes >= 0;
    for (const std::string& s : shards) {
        PlanBuffer b{"params." + s, 0, 0, sharded ? Lifetime::Sharded : Lifetime::Static, s, o.frozen == Half::None ? 4u : 2u};
        for (const ParamTensor& t : p.params)
            if (t.shard == s) {
                size_t n = 1;
                for (auto d : t.shape) n *= (size_t)d;
                b.elements += n;
                b.reserved += b.width == 4 ? padded(n) : padded16(n) / 2;
            }
        shard_bufs.push_back(b);
        p.buffers.push_back(b);
    }
    size_t trainable = 0;
    if (o.full) {
        for (const PlanBuffer& b : shard_bufs) {
            if (o.offload_gradients) p.buffers.push_back({"grads." + b.shard, b.elements, b.reserved, Lifetime::Sharded, b.shard});
            else p.buffers.push_back({"grads." + b.shard, b.elements, b.reserved, Lifetime::Static, ""});
            trainable += b.elements;
        }
    } else {
        size_t n = 0, r = 0;
        for (const AdapterSpec& a : p.adapters) {
            size_t na = (size_t)o.lora_r * a.in, nb = (size_t)a.out * o.lora_r;
            n += na + nb;
            r += padded(na) + padded(nb);
        }
        p.buffers.push_back({"lora.params", n, r, Lifetime::Static, ""});
        p.buffers.push_back({"lora.grads", n, r, Lifetime::Static, ""});
        trainable = n;
    }
    p.trainable_params = trainable;
    if (!o.offload_optimizer) {  // else on flash, streamed through scratch.moments
        p.buffers.push_back({"optimizer.m", trainable, trainable, Lifetime::Static, ""});
        p.buffers.push_back({"optimizer.v", trainable, trainable, Lifetime::Static, ""});
    }
    p.buffers.push_back({"tokens.inputs", o.K * N, o.K * N, Lifetime::Static, ""});
    p.buffers.push_back({"tokens.targets", o.K * N, o.K * N, Lifetime::Static, ""});
    if (rotary) {
        size_t n = L * o.T * (hd / 2);
        p.buffers.push_back({"rope.cos", n, n, Lifetime::Static, ""});
        p.buffers.push_back({"rope.sin", n, n, Lifetime::Static, ""});
    }

    // ops; the kept buffers are those micro-batch 0 allocates
    std::vector<PlanBuffer> kept;
    const std::string final_norm = gpt2 ? "ln_f" : "norm";
    for (int m = 0; m < o.K; m++) {
        Emitter e{c, o, adapted, p.ops, m == 0 ? &kept : nullptr, m, {}};
        e.op("embed", "embed", "embedding", "forward", -1, {{"block0.x", N * C}});
        std::vector<std::vector<std::string>> owned(c.L);
        for (int l = 0; l < c.L; l++) {
            e.block_forward(l, "forward");
            owned[l] = e.owned;
        }
        Alloc head_stats = e.stats("head." + final_norm, N);
        e.op("head", final_norm, "norm", "forward", -1, head_stats);
        e.op("head", "lm_head", "head", "forward", -1);
        e.op("head", "lm_head", "head", "backward", -1);
        e.op("head", final_norm, "norm", "backward", -1);
        e.ops.back().free = {"head.x"};
        for (const auto& s : head_stats) e.ops.back().free.push_back(s.first);
        for (int l = c.L - 1; l >= 0; l--) {
            if (p.checkpointed(l)) e.block_forward(l, "recompute");
            e.block_backward(l, owned[l]);
        }
        if (o.full) e.op("embed", "embed", "embedding", "backward", -1);
    }
    for (PlanBuffer& b : kept)  // written again by a recompute op: recomputed
        for (const PlanOp& op : p.ops)
            if (op.micro_batch == 0 && op.phase == "recompute" &&
                std::find(op.alloc.begin(), op.alloc.end(), b.name) != op.alloc.end())
                b.lifetime = Lifetime::Recomputed;
    p.buffers.insert(p.buffers.end(), kept.begin(), kept.end());
    auto update = [&](const std::string& name, const std::string& shard) {
        PlanOp u;
        u.name = name;
        u.kind = u.phase = "update";
        u.shard = shard;
        u.micro_batch = -1;
        p.ops.push_back(u);
    };
    if (o.grad_clip) update("update.grad_norm", "");
    if (o.full)
        for (const std::string& s : shards) update("update." + s, s);
    else
        update("update.lora", "");

    // scratch
    auto scratch = [&](const std::string& name, size_t n) { p.buffers.push_back({name, n, n, Lifetime::Scratch, ""}); };
    scratch("scratch.ln", N * C);
    scratch("scratch.act", N * F);
    scratch("scratch.dres", N * C);
    scratch("scratch.dln", N * C);
    scratch("scratch.dqkv", N * (gpt2 ? 3 * C : qd + 2 * kvd));
    scratch("scratch.datty", N * qd);
    scratch("scratch.dh", N * F);
    if (c.gated) scratch("scratch.dup", N * F);
    scratch("head.logits", R * V);
    scratch("head.ln_chunk", R * C);
    scratch("head.dln_chunk", R * C);
    scratch("scratch.du", N * std::max(1, lora ? o.lora_r : 0));
    scratch("scratch.ones", N);
    scratch("scratch.datt", (size_t)o.threads * (o.memory_efficient ? attention_me_scratch(o.T, kAttnBlock) : (size_t)o.T * o.T));
    scratch("scratch.normpart", (size_t)o.threads * 2 * std::max(C, hd));
    if (lora && o.lora_dropout) scratch("scratch.lora_x", lora_dropout_scratch_elements(p));
    if (o.frozen != Half::None) scratch("scratch.weight", weight_scratch_elements(c));
    if (o.offload_optimizer) scratch("scratch.moments", 2 * std::min(kMomentChunk, trainable));
    if (sharded || o.offload_optimizer) plan_shard_io(p);
    return p;
}

size_t weight_scratch_elements(const Config& c) {
    size_t n = 2 * (size_t)std::max(c.C, c.head_dim);
    for (const Module& m : block_modules(c))
        if (m.linear) n = std::max(n, (size_t)m.in * m.out);
    return n;
}

size_t lora_dropout_scratch_elements(const Plan& p) {
    size_t in = 0;
    for (const AdapterSpec& a : p.adapters) in = std::max(in, (size_t)a.in);
    return (size_t)p.opt.B * p.opt.T * in;
}

size_t Plan::peak_bytes() const {
    // the same replay as program.py memory_deltas: a kept buffer stays resident from its first
    // write to the step's end (the arena keeps its pages), unless checkpointing lays the
    // recompute region over freed ones
    std::map<std::string, size_t> size;
    bool recomputes = false;
    for (const PlanBuffer& b : buffers) size[b.name] = b.bytes(), recomputes = recomputes || b.lifetime == Lifetime::Recomputed;
    std::set<std::string> kept, written;
    if (!recomputes)
        for (const PlanBuffer& b : buffers)
            if (b.lifetime == Lifetime::Kept) kept.insert(b.name);
    size_t live = 0, peak = 0;
    for (const PlanOp& op : ops) {
        for (const auto& n : op.alloc)
            if (!written.count(n)) {
                live += size[n];
                if (kept.count(n)) written.insert(n);
            }
        peak = std::max(peak, live);
        for (const auto& n : op.free)
            if (!kept.count(n)) live -= size[n];
    }
    return bytes(Lifetime::Static) + bytes(Lifetime::Scratch) + peak;
}

const PlanBuffer* Plan::find(const std::string& name) const {
    for (const PlanBuffer& b : buffers)
        if (b.name == name) return &b;
    return nullptr;
}

size_t Plan::bytes(Lifetime lt) const {
    size_t n = 0;
    for (const PlanBuffer& b : buffers)
        if (b.lifetime == lt) n += b.bytes();
    return n;
}

size_t Plan::total_bytes() const {
    size_t n = 0;
    for (const PlanBuffer& b : buffers) n += b.bytes();
    return n;
}

std::string Plan::json() const {
    auto nullable = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
    nlohmann::json bs = nlohmann::json::array(), os = nlohmann::json::array();
    for (const PlanBuffer& b : buffers)
        bs.push_back({{"bytes", b.bytes()}, {"lifetime", lifetime_name(b.lifetime)}, {"name", b.name}, {"shard", nullable(b.shard)}});
    for (const PlanOp& op : ops)
        os.push_back({{"alloc", op.alloc},
                      {"free", op.free},
                      {"io_bytes", op.io_bytes},
                      {"kind", op.kind},
                      {"layer", op.layer < 0 ? nlohmann::json(nullptr) : nlohmann::json(op.layer)},
                      {"micro_batch", op.micro_batch},
                      {"name", op.name},
                      {"phase", op.phase},
                      {"shard", nullable(op.shard)}});
    nlohmann::json j = {{"buffers", bs},       {"ce_chunk_rows", opt.chunk_rows}, {"family", family},
                        {"method", method},    {"micro_batch", opt.B},            {"micro_batches", opt.K},
                        {"ops", os},           {"seq_len", opt.T},                {"threads", opt.threads},
                        {"trainable_params", trainable_params}, {"version", 1}};
    return j.dump();
}

}  // namespace mfb

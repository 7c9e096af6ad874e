#include "config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include "common.h"
#include "validate.h"

namespace mfb {

using json = nlohmann::json;

static const char* kUsage = R"(usage: mfbench-train (--model DIR | --config FILE) --data FILE [options]
       mfbench-train --workload run.json [--plan] [--quiet] [--sample-ms MS] [--checkpoint-every N] [--resume]
                                  [--dump-grads FILE] [--dump-logits FILE]

model:   --model DIR          HF folder: config.json + model.safetensors (F32/F16/BF16)
         --config FILE        config.json only: random init (with --seed)
data:    --data FILE          token file written by `mfbench tokenize` (see docs/native.md)
         --seq-len T (min(128, positions))  --batch B (8, rows per micro-batch)  --accum K (1 micro-batches a step)
method:  --method full|lora (full)   --lora-r 8   --lora-alpha 16   --lora-dropout 0 (p, in training)
         --lora-targets LIST  peft module names (GPT-2: c_attn,attn.c_proj; Qwen, Gemma: q_proj,k_proj,v_proj,o_proj)
         --lora-init DIR      start from a peft adapter folder instead of fresh adapters
optim:   --steps N (100)  --lr 1e-4  --min-lr 0  --warmup 0  --schedule constant|cosine|linear (constant)
         --weight-decay 0 (matrices only)  --beta1 0.9  --beta2 0.999  --eps 1e-8  --grad-clip 1.0 (0: off)
memory:  --ce-chunk-rows R    rows of logits alive at once in the loss (default: min(N, max(128, 8388608 / vocab));
                              0: all N = batch x seq-len rows)
         --frozen-dtype float32|bfloat16|float16 (float32)  LoRA: hold the frozen weights 16-bit, compute in fp32
run:     --threads N (all cores)  --seed 1234  --sample-ms MS (RSS samples in the trace; 0: off)  --quiet
output:  --out DIR  writes trace.jsonl, summary.json and the model (Full-FT) or adapter (LoRA)
         --checkpoint-every N  a checkpoint in DIR/checkpoints every N steps (0: off; SIGTERM, SIGINT
                               still checkpoint, then stop)   --resume  continue from the newest one
         --no-save  skip the model/adapter   --plan  print the buffer plan (docs/contracts.md) as JSON and exit
spec:    --workload FILE      a run spec (docs/contracts.md section 1) instead of the flags above
sched:   --control stdio      before each step write an observation line to stdout, read a decision line
                              from stdin (the policy protocol, docs/contracts.md)
         --policy NAME        the policy's name in the trace's decision events (default: the run spec's)
         --pause-poll-s 10    a paused run asks again after this long
         --sysfs-root DIR     read sensors under DIR/sys (default $MFBENCH_SYSFS_ROOT, else /)
checks:  --dump-grads FILE   gradients of the first step (before clipping), as safetensors
         --dump-logits FILE  logits [B, T, V] and loss of the first micro-batch after training
)";

const char* usage() { return kUsage; }

int resolve_chunk_rows(int requested, int N, int V) {
    if (requested < 0) return std::min(N, std::max(128, (int)(8388608 / V)));
    return requested == 0 ? N : std::min(N, requested);
}

namespace {

const char* kWithSpec = "only --plan, --quiet, --sample-ms, --checkpoint-every, --resume, --dump-grads, --dump-logits with --workload";

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= s.size()) {
        size_t e = s.find(sep, start);
        if (e == std::string::npos) e = s.size();
        if (e > start) out.push_back(s.substr(start, e - start));
        start = e + 1;
    }
    return out;
}

struct Args {
    std::map<std::string, std::string> kv;
    std::set<std::string> flags;
    std::string get(const std::string& k, const std::string& d = "") const {
        auto it = kv.find(k);
        return it == kv.end() ? d : it->second;
    }
    bool has(const std::string& k) const { return kv.count(k) || flags.count(k); }
    double num(const std::string& k, double d) const {
        auto it = kv.find(k);
        if (it == kv.end()) return d;
        char* end = nullptr;
        double v = std::strtod(it->second.c_str(), &end);
        if (it->second.empty() || *end || !std::isfinite(v)) throw Error("", "option --" + k + " got '" + it->second + "'", "a number");
        return v;
    }
    int integer(const std::string& k, int d, int lo) const {
        double v = num(k, d);
        if (v != std::floor(v) || v < lo || v > 1e9) throw Error("", "option --" + k + " got '" + get(k) + "'", "an integer >= " + std::to_string(lo));
        return (int)v;
    }
};

Args parse_args(int argc, char** argv) {
    static const std::set<std::string> flag_names = {"no-save", "plan", "quiet", "help", "resume"};
    static const std::set<std::string> value_names = {
        "model", "config", "data", "seq-len", "batch", "accum", "method", "lora-r", "lora-alpha", "lora-dropout", "lora-targets",
        "lora-init", "steps", "lr", "min-lr", "warmup", "schedule", "weight-decay", "beta1", "beta2", "eps",
        "grad-clip", "ce-chunk-rows", "threads", "seed", "sample-ms", "checkpoint-every", "out", "dump-grads", "dump-logits",
        "workload", "control", "policy", "pause-poll-s", "sysfs-root", "frozen-dtype"};
    Args a;
    for (int i = 1; i < argc; i++) {
        std::string s = argv[i];
        if (s.rfind("--", 0) != 0) throw Error("", "unexpected argument '" + s + "'", "--option value pairs; see --help");
        std::string k = s.substr(2), v;
        size_t eq = k.find('=');
        bool inline_value = eq != std::string::npos;
        if (inline_value) v = k.substr(eq + 1), k = k.substr(0, eq);
        if (flag_names.count(k)) a.flags.insert(k);
        else if (value_names.count(k)) {
            if (!inline_value) {
                if (i + 1 >= argc) throw Error("", "option --" + k + " needs a value", "--" + k + " VALUE");
                v = argv[++i];
            }
            a.kv[k] = v;
        } else throw Error("", "unknown option --" + k, "an option listed by --help");
    }
    return a;
}

// memory.frozen_dtype (--frozen-dtype): how LoRA holds the frozen parameters. Full-FT trains
// every parameter, so a 16-bit frozen dtype there is an error rather than silently ignored.
Half frozen_dtype(const std::string& v, const std::string& method, const std::string& file, const std::string& field) {
    Half h = Half::None;
    if (v == "bfloat16") h = Half::BF16;
    else if (v == "float16") h = Half::F16;
    else if (v != "float32") throw Error(file, field + " '" + v + "'", "float32, bfloat16 or float16");
    if (h != Half::None && method != "lora")
        throw Error(file, field + " '" + v + "' needs LoRA: Full-FT freezes no parameter", "float32 with method full");
    return h;
}

// Reads a run spec: every key is known, every value one the trainer can run.
struct Spec {
    std::string path;

    [[noreturn]] void fail(const std::string& what, const std::string& expected) const { throw Error(path, what, expected); }
    static std::string join(const std::string& where, const std::string& key) { return where.empty() ? key : where + "." + key; }
    void object(const json& o, const std::string& where, std::initializer_list<const char*> allowed) const {
        if (!o.is_object()) fail(where + " is " + o.dump(), "an object");
        for (auto it = o.begin(); it != o.end(); ++it) {
            bool ok = false;
            for (const char* k : allowed) ok = ok || it.key() == k;
            if (!ok) fail("unknown field '" + join(where, it.key()) + "'", "only the fields of docs/contracts.md section 1");
        }
    }
    // the value at o[key], or null when absent (required: an error instead)
    const json& at(const json& o, const std::string& where, const char* key, bool required = false) const {
        static const json null_value;
        if (o.contains(key)) return o[key];
        if (required) fail("missing field '" + join(where, key) + "'", "a complete run spec (docs/contracts.md section 1)");
        return null_value;
    }
    // hi: most fields become an int
    long long integer(const json& o, const std::string& where, const char* key, long long dflt, long long lo,
                      bool required = false, long long hi = INT32_MAX) const {
        const json& v = at(o, where, key, required);
        if (v.is_null() && !required && !o.contains(key)) return dflt;
        if (!v.is_number_integer() || v.get<long long>() < lo)
            fail(join(where, key) + " is " + v.dump(), "an integer >= " + std::to_string(lo));
        if (v.get<long long>() > hi) fail(join(where, key) + " is " + v.dump(), "an integer <= " + std::to_string(hi));
        return v.get<long long>();
    }
    double number(const json& o, const std::string& where, const char* key, double dflt, double lo) const {
        if (!o.contains(key)) return dflt;
        const json& v = o[key];
        if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < lo)
            fail(join(where, key) + " is " + v.dump(), "a number >= " + json(lo).dump());
        return v.get<double>();
    }
    std::string str(const json& o, const std::string& where, const char* key, const std::string& dflt, bool required = false,
                    bool nullable = false) const {
        const json& v = at(o, where, key, required);
        if (!o.contains(key) || (nullable && v.is_null())) return dflt;
        if (!v.is_string()) fail(join(where, key) + " is " + v.dump(), nullable ? "a string or null" : "a string");
        return v.get<std::string>();
    }
    // A value the trainer cannot run yet: `field 'value' is not supported ...`.
    void only(const std::string& field, const std::string& got, const std::string& want) const {
        if (got != want) fail(field + " '" + got + "' is not supported by the native trainer yet", want);
    }
};

}  // namespace

RunOptions read_run_spec(const std::string& path) {
    Spec s{path};
    std::ifstream in(path);
    if (!in) s.fail("cannot open", "a run spec JSON file");
    json j;
    try {
        j = json::parse(in);
    } catch (const json::exception&) {
        s.fail("not valid JSON", "a run spec (docs/contracts.md section 1)");
    }
    if (!j.is_object()) s.fail("not a JSON object", "a run spec (docs/contracts.md section 1)");
    // values first (so an unsupported policy is named before its parameters), then unknown keys
    RunOptions o;
    if (s.integer(j, "", "version", 1, 0, true) != 1) s.fail("version " + j["version"].dump(), "1");
    o.workload = s.str(j, "", "name", "", false, true);

    const json& model = s.at(j, "", "model", true);
    s.object(model, "model", {"config", "weights"});
    o.config_path = s.str(model, "model", "config", "", true);
    o.weights_path = s.str(model, "model", "weights", "", false, true);

    const json& method = s.at(j, "", "method", true);
    s.object(method, "method", {"kind", "rank", "alpha", "targets", "dropout"});
    o.method = s.str(method, "method", "kind", "", true);
    if (o.method != "full" && o.method != "lora") s.fail("method.kind '" + o.method + "'", "full or lora");
    o.lora_r = (int)s.integer(method, "method", "rank", 8, 1);
    o.lora_alpha = s.number(method, "method", "alpha", 16, 0);
    if (method.contains("targets")) {
        const json& t = method["targets"];
        // Full-FT trains every module: its targets are unused (the workload schema defaults them to [])
        const bool lora = o.method == "lora";
        if (!t.is_array() || (lora && t.empty())) s.fail("method.targets is " + t.dump(), "a non-empty list of module names");
        for (const json& x : t) {
            if (!x.is_string() || x.get<std::string>().empty()) s.fail("method.targets is " + t.dump(), "a list of module names");
            if (lora) o.lora_targets.push_back(x.get<std::string>());
        }
    }
    o.lora_dropout = s.number(method, "method", "dropout", 0, 0);

    const json& data = s.at(j, "", "data", true);
    s.object(data, "data", {"tokens"});
    o.data_path = s.str(data, "data", "tokens", "", true);

    o.seq_len = (int)s.integer(j, "", "seq_len", 0, 1, true);
    int batch = (int)s.integer(j, "", "batch", 0, 1, true);
    o.micro_batch = (int)s.integer(j, "", "micro_batch", batch, 1);
    if (batch % o.micro_batch)
        s.fail("micro_batch " + std::to_string(o.micro_batch) + " does not divide batch " + std::to_string(batch), "a divisor of batch");
    o.micro_batches = batch / o.micro_batch;
    o.steps = (int)s.integer(j, "", "steps", o.steps, 0);
    o.seed = (uint64_t)s.integer(j, "", "seed", (long long)o.seed, 0, false, INT64_MAX);
    o.threads = (int)s.integer(j, "", "threads", o.threads, 1);

    if (j.contains("optimizer")) {
        const json& op = j["optimizer"];
        s.object(op, "optimizer", {"name", "lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "warmup_steps", "schedule",
                                   "grad_clip"});
        s.only("optimizer.name", s.str(op, "optimizer", "name", "adamw"), "adamw");
        o.lr = s.number(op, "optimizer", "lr", o.lr, 0);
        o.min_lr = s.number(op, "optimizer", "min_lr", o.min_lr, 0);
        o.weight_decay = s.number(op, "optimizer", "weight_decay", o.weight_decay, 0);
        o.beta1 = s.number(op, "optimizer", "beta1", o.beta1, 0);
        o.beta2 = s.number(op, "optimizer", "beta2", o.beta2, 0);
        o.eps = s.number(op, "optimizer", "eps", o.eps, 0);
        o.warmup = (int)s.integer(op, "optimizer", "warmup_steps", o.warmup, 0);
        o.schedule = s.str(op, "optimizer", "schedule", o.schedule);
        if (o.schedule != "constant" && o.schedule != "cosine" && o.schedule != "linear")
            s.fail("optimizer.schedule '" + o.schedule + "'", "constant, cosine or linear");
        if (op.contains("grad_clip") && op["grad_clip"].is_null()) o.grad_clip = 0;
        else if ((o.grad_clip = s.number(op, "optimizer", "grad_clip", o.grad_clip, 0)) == 0)
            s.fail("optimizer.grad_clip is 0", "a number > 0, or null for no clipping");
    }
    if (j.contains("memory")) {
        const json& m = j["memory"];
        if (!m.is_object()) s.fail("memory is " + m.dump(), "an object");
        if (m.contains("sharding")) {  // none, lru {budget_mb, dir}, prefetch {budget_mb, ahead, dir} (mfbench.policies)
            const json& p = m["sharding"];
            if (!p.is_object()) s.fail("memory.sharding is " + p.dump(), "an object {\"policy\": NAME, ...}");
            o.sharding = s.str(p, "memory.sharding", "policy", "none");
            if (o.sharding == "none") {
                s.object(p, "memory.sharding", {"policy"});
            } else if (o.sharding == "lru" || o.sharding == "prefetch") {
                if (!p.contains("budget_mb")) s.fail("missing field 'memory.sharding.budget_mb'", "a budget in MB > 0");
                o.budget_mb = s.number(p, "memory.sharding", "budget_mb", 0, 0);
                if (!(o.budget_mb > 0)) s.fail("memory.sharding.budget_mb is " + p["budget_mb"].dump(), "a budget in MB > 0");
                o.shard_dir = s.str(p, "memory.sharding", "dir", "", false, true);
                if (o.sharding == "prefetch") {
                    o.ahead = (int)s.integer(p, "memory.sharding", "ahead", 1, 1);
                    s.object(p, "memory.sharding", {"policy", "budget_mb", "ahead", "dir"});
                } else {
                    s.object(p, "memory.sharding", {"policy", "budget_mb", "dir"});
                }
            } else {
                s.fail("memory.sharding.policy '" + o.sharding + "'", "none, lru or prefetch");
            }
        }
        if (m.contains("offload")) {  // Full-FT: [optimizer, gradients], each at most once
            const json& a = m["offload"];
            if (!a.is_array()) s.fail("memory.offload is " + a.dump(), "a list of optimizer, gradients");
            for (const json& x : a) {
                const std::string v = x.is_string() ? x.get<std::string>() : x.dump();
                if (v == "optimizer") o.offload_optimizer = true;
                else if (v == "gradients") o.offload_gradients = true;
                else s.fail("memory.offload '" + v + "'", "a list of optimizer, gradients");
            }
            if (!a.empty() && o.method != "full") s.fail("memory.offload " + a.dump() + " needs Full-FT", "[] with method lora");
            if (o.offload_gradients && o.sharding == "none")
                s.fail("memory.offload gradients without sharding", "a memory.sharding policy (lru or prefetch) with them");
        }
        if (m.contains("checkpointing")) {  // none, every_block, every_k {k} (mfbench.policies)
            const json& p = m["checkpointing"];
            if (!p.is_object()) s.fail("memory.checkpointing is " + p.dump(), "an object {\"policy\": NAME, ...}");
            const std::string policy = s.str(p, "memory.checkpointing", "policy", "none");
            if (policy == "every_k") {
                o.recompute_every = (int)s.integer(p, "memory.checkpointing", "k", 0, 1, true);
                s.object(p, "memory.checkpointing", {"policy", "k"});
            } else {
                if (policy == "every_block") o.recompute_every = 1;
                else if (policy != "none") s.fail("memory.checkpointing.policy '" + policy + "'", "none, every_block or every_k");
                s.object(p, "memory.checkpointing", {"policy"});
            }
        }
        const std::string attention = s.str(m, "memory", "attention", "standard");
        if (attention != "standard" && attention != "memory_efficient")
            s.fail("memory.attention '" + attention + "'", "standard or memory_efficient");
        o.memory_efficient = attention == "memory_efficient";
        o.ce_chunk_rows = (int)s.integer(m, "memory", "ce_chunk_rows", -1, 0);
        o.frozen = frozen_dtype(s.str(m, "memory", "frozen_dtype", "float32"), o.method, path, "memory.frozen_dtype");
        s.object(m, "memory", {"sharding", "checkpointing", "attention", "ce_chunk_rows", "frozen_dtype", "offload"});
    }
    // any scheduling policy: it runs in the controller (--control stdio), not here
    if (j.contains("scheduling")) {
        const json& p = j["scheduling"];
        if (!p.is_object()) s.fail("scheduling is " + p.dump(), "an object {\"policy\": NAME, ...}");
        o.scheduling = s.str(p, "scheduling", "policy", "none");
        if (o.scheduling == "none") s.object(p, "scheduling", {"policy"});
    }
    o.out = s.str(j, "", "out", "", false, true);
    o.provenance = json::object();
    if (j.contains("provenance")) {
        if (!j["provenance"].is_object()) s.fail("provenance is " + j["provenance"].dump(), "an object");
        o.provenance = j["provenance"];
    }
    s.object(j, "", {"version", "name", "model", "method", "data", "seq_len", "batch", "micro_batch", "steps", "seed", "threads",
                     "optimizer", "memory", "scheduling", "out", "provenance"});
    return o;
}

RunOptions parse_options(int argc, char** argv, bool& help) {
    Args a = parse_args(argc, argv);
    help = a.has("help");
    RunOptions o;
    std::string command;
    for (int i = 0; i < argc; i++) command += (i ? " " : "") + std::string(argv[i]);
    if (help) return o;
    if (a.has("workload")) {
        // how to measure, not what to train: allowed next to a run spec
        static const std::set<std::string> with_spec = {"workload", "plan", "quiet", "sample-ms", "checkpoint-every", "resume",
                                                        "dump-grads", "dump-logits", "control", "policy", "pause-poll-s",
                                                        "sysfs-root"};
        for (const auto& kv : a.kv)
            if (!with_spec.count(kv.first))
                throw Error("", "--" + kv.first + " cannot be combined with --workload", kWithSpec);
        for (const auto& f : a.flags)
            if (!with_spec.count(f))
                throw Error("", "--" + f + " cannot be combined with --workload", kWithSpec);
        o = read_run_spec(a.get("workload"));
        o.spec_path = a.get("workload");
        o.sample_ms = a.integer("sample-ms", 0, 0);
    } else {
        o.model_dir = a.get("model");
        o.config_path = a.get("config");
        if (o.model_dir.empty() == o.config_path.empty())
            throw Error("", "give exactly one of --model DIR and --config FILE", "--model or --config");
        if (!o.model_dir.empty()) {
            o.config_path = o.model_dir + "/config.json";
            o.weights_path = o.model_dir + "/model.safetensors";
        }
        o.data_path = a.get("data");
        o.method = a.get("method", "full");
        if (o.method != "full" && o.method != "lora") throw Error("", "--method " + o.method, "full or lora");
        o.lora_r = a.integer("lora-r", 8, 1);
        o.lora_alpha = a.num("lora-alpha", 16);
        o.lora_dropout = a.num("lora-dropout", 0);
        if (a.has("lora-targets")) {
            o.lora_targets = split(a.get("lora-targets"), ',');
            if (o.lora_targets.empty()) throw Error("", "--lora-targets is empty", "module names such as c_attn,c_proj or q_proj,v_proj");
        }
        o.lora_init = a.get("lora-init");
        if (!o.lora_init.empty() && o.method != "lora") throw Error("", "--lora-init needs --method lora", "--method lora");
        if (!o.lora_init.empty()) read_adapter_config(o, a.has("lora-r"), a.has("lora-alpha"), a.has("lora-targets"));
        o.seq_len = a.has("seq-len") ? a.integer("seq-len", 0, 1) : 0;
        o.micro_batch = a.integer("batch", 8, 1);
        o.micro_batches = a.integer("accum", 1, 1);
        o.steps = a.integer("steps", 100, 0);  // the workload schema's default
        o.lr = a.num("lr", o.lr);
        o.min_lr = a.num("min-lr", o.min_lr);
        o.warmup = a.integer("warmup", o.warmup, 0);
        o.schedule = a.get("schedule", o.schedule);
        if (o.schedule != "cosine" && o.schedule != "linear" && o.schedule != "constant")
            throw Error("", "--schedule " + o.schedule, "constant, cosine or linear");
        o.weight_decay = a.num("weight-decay", o.weight_decay);
        o.beta1 = a.num("beta1", o.beta1);
        o.beta2 = a.num("beta2", o.beta2);
        o.eps = a.num("eps", o.eps);
        o.grad_clip = a.num("grad-clip", o.grad_clip);
        o.ce_chunk_rows = a.has("ce-chunk-rows") ? a.integer("ce-chunk-rows", 0, 0) : -1;
        o.frozen = frozen_dtype(a.get("frozen-dtype", "float32"), o.method, "", "--frozen-dtype");
        o.threads = a.integer("threads", std::clamp((int)std::thread::hardware_concurrency(), 1, kMaxThreads), 1);
        o.seed = (uint64_t)a.integer("seed", (int)o.seed, 0);
        o.sample_ms = a.integer("sample-ms", 0, 0);
        o.out = a.get("out");
        o.save = !a.has("no-save");
        o.provenance = {{"command", command}};
    }
    o.control = a.get("control");
    if (a.has("control") && o.control != "stdio") throw Error("", "--control " + o.control, "stdio");
    o.scheduling = a.get("policy", o.control.empty() ? o.scheduling : (o.scheduling == "none" ? "control" : o.scheduling));
    if (o.scheduling != "none" && o.control.empty() && !a.has("plan"))
        throw Error(o.spec_path, "scheduling.policy '" + o.scheduling + "' needs a controller",
                    "--control stdio (mfbench run passes it and runs the policy)");
    o.pause_poll_s = a.num("pause-poll-s", o.pause_poll_s);
    o.sysfs_root = a.get("sysfs-root");
    o.checkpoint_every = a.integer("checkpoint-every", 0, 0);
    o.resume = a.has("resume");
    if (o.resume && o.out.empty() && !a.has("plan"))
        throw Error(a.get("workload"), "--resume needs an output folder", a.has("workload") ? "a run spec with out" : "--out DIR");
    o.plan_only = a.has("plan");
    o.quiet = a.has("quiet");
    o.dump_grads = a.get("dump-grads");
    o.dump_logits = a.get("dump-logits");
    validate_options(o);
    return o;
}

}  // namespace mfb

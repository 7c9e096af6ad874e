// mfbench-train: Full-FT and LoRA training of an HF model folder on a pre-tokenized file.
// Run with --help for the options; docs/native.md describes inputs, outputs and formats.
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <vector>

#include "common.h"
#include "data.h"
#include "gemm.h"
#include "model.h"
#include "safetensors.h"

using namespace mfb;
using json = nlohmann::json;

static const char* kUsage = R"(usage: mfbench-train (--model DIR | --config FILE) --data FILE [options]

model:   --model DIR          HF folder: config.json + model.safetensors (F32/F16/BF16)
         --config FILE        config.json only: random init (with --seed)
data:    --data FILE          token file written by `mfbench tokenize` (see docs/native.md)
         --seq-len T (128)    --batch B (8, rows per micro-batch)   --accum K (1 micro-batches a step)
method:  --method full|lora (full)   --lora-r 8   --lora-alpha 16
         --lora-targets LIST  peft module names (GPT-2: c_attn,attn.c_proj; Qwen, Gemma: q_proj,k_proj,v_proj,o_proj)
         --lora-init DIR      start from a peft adapter folder instead of fresh adapters
optim:   --steps N (10)  --lr 3e-4  --min-lr 0  --warmup 0  --schedule cosine|linear|constant
         --weight-decay 0.0 (matrices only)  --beta1 0.9  --beta2 0.999  --eps 1e-8  --grad-clip 1.0 (0: off)
memory:  --ce-chunk-rows R (rows of logits alive at once in the loss; default ~32 MB worth)
run:     --threads N (all cores)  --seed 1234  --sample-ms MS (RSS samples in the trace; 0: off)  --quiet
output:  --out DIR  writes trace.jsonl, summary.json and the model (Full-FT) or adapter (LoRA)
         --no-save  skip the model/adapter   --plan  print the buffer plan as JSON and exit
checks:  --dump-grads FILE   gradients of the first step (before clipping), as safetensors
         --dump-logits FILE  logits [B, T, V] and loss of the first micro-batch after training
)";

namespace {

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
    static const std::set<std::string> flag_names = {"no-save", "plan", "quiet", "help"};
    static const std::set<std::string> value_names = {
        "model", "config", "data", "seq-len", "batch", "accum", "method", "lora-r", "lora-alpha", "lora-targets",
        "lora-init", "steps", "lr", "min-lr", "warmup", "schedule", "weight-decay", "beta1", "beta2", "eps",
        "grad-clip", "ce-chunk-rows", "threads", "seed", "sample-ms", "out", "dump-grads", "dump-logits"};
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

size_t peak_rss_bytes() {
    if (FILE* f = std::fopen("/proc/self/status", "r")) {
        char line[256];
        size_t kb = 0;
        while (std::fgets(line, sizeof line, f))
            if (std::sscanf(line, "VmHWM: %zu kB", &kb) == 1) break;
        std::fclose(f);
        if (kb) return kb * 1024;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (size_t)ru.ru_maxrss * 1024;
}

double cpu_seconds() {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

size_t current_rss_bytes() {
    long pages = 0, resident = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        std::fclose(f);
    }
    return (size_t)resident * (size_t)sysconf(_SC_PAGESIZE);
}

// JSON Lines trace, written to <out>/trace.jsonl.partial and renamed when the run ends.
struct Trace {
    FILE* f = nullptr;
    std::string path;
    std::mutex mu;
    void open(const std::string& p) {
        path = p;
        f = std::fopen((p + ".partial").c_str(), "w");
        if (!f) throw Error(p, std::string("cannot write: ") + std::strerror(errno), "a writable folder");
    }
    void write(const json& j) {
        if (!f) return;
        std::lock_guard<std::mutex> lock(mu);
        std::string s = j.dump() + "\n";
        std::fwrite(s.data(), 1, s.size(), f);
        std::fflush(f);
    }
    void close() {
        if (!f) return;
        FILE* done = f;
        f = nullptr;
        finish_atomic(done, path + ".partial", path);
    }
};

void make_dirs(const std::string& dir) {
    std::string cur;
    for (size_t i = 0; i <= dir.size(); i++) {
        if (i == dir.size() || (dir[i] == '/' && i > 0)) {
            cur = dir.substr(0, i);
            struct stat st;
            if (stat(cur.c_str(), &st) == 0) {
                if (!S_ISDIR(st.st_mode)) throw Error(dir, "'" + cur + "' exists and is not a folder", "a writable output folder");
            } else if (mkdir(cur.c_str(), 0777) != 0 && errno != EEXIST) {
                throw Error(dir, std::string("cannot create output folder: ") + std::strerror(errno), "a writable output folder");
            }
        }
    }
    std::string probe = dir + "/.mfbench-write-test." + std::to_string(getpid());
    FILE* f = std::fopen(probe.c_str(), "w");
    if (!f) throw Error(dir, std::string("output folder is not writable: ") + std::strerror(errno), "a writable output folder");
    std::fclose(f);
    std::remove(probe.c_str());
}

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

double lr_at(int step, int steps, int warmup, double lr, double min_lr, const std::string& sched) {
    if (step < warmup) return lr * (step + 1) / warmup;
    if (sched == "constant") return lr;
    double prog = (double)(step - warmup) / std::max(1, steps - warmup);
    if (sched == "linear") return lr + (min_lr - lr) * prog;
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * prog));
}

// AdamW as torch.optim.AdamW: decoupled decay, bias-corrected moments.
// gscale multiplies every gradient first (global-norm clipping, fused to save a pass).
void adamw(std::vector<TrainSegment>& segs, std::vector<float>& m, std::vector<float>& v, int t, float lr, float b1,
           float b2, float eps, float wd, float gscale) {
    const float bc1 = 1.f - std::pow(b1, (float)t), bc2 = 1.f - std::pow(b2, (float)t);
    const float step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
    size_t off = 0;
    for (TrainSegment& s : segs) {
        float* mm = m.data() + off;
        float* vv = v.data() + off;
        const float decay = s.decay ? 1.f - lr * wd : 1.f;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < s.n; i++) {
            float g = s.g[i] * gscale;
            mm[i] = b1 * mm[i] + (1.f - b1) * g;
            vv[i] = b2 * vv[i] + (1.f - b2) * g * g;
            s.p[i] = s.p[i] * decay - step_size * mm[i] / (std::sqrt(vv[i]) / bc2_sqrt + eps);
        }
        off += s.n;
    }
}

double grad_norm(std::vector<TrainSegment>& segs) {
    double total = 0.0;
    for (TrainSegment& s : segs) {
        double acc = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : acc)
        for (size_t i = 0; i < s.n; i++) acc += (double)s.g[i] * s.g[i];
        total += acc;
    }
    return std::sqrt(total);
}

bool file_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

int run(int argc, char** argv) {
    Args a = parse_args(argc, argv);
    if (a.has("help") || argc == 1) {
        std::fputs(kUsage, a.has("help") ? stdout : stderr);
        return a.has("help") ? 0 : 2;
    }
    const bool quiet = a.has("quiet");
    const int threads = a.integer("threads", std::max(1, (int)std::thread::hardware_concurrency()), 1);
    set_threads(threads);

    std::string model_dir = a.get("model"), config_path = a.get("config");
    if (model_dir.empty() == config_path.empty()) throw Error("", "give exactly one of --model DIR and --config FILE", "--model or --config");
    if (!model_dir.empty()) config_path = model_dir + "/config.json";
    Config cfg = load_config(config_path);
    cfg.source_dir = model_dir;

    const std::string method = a.get("method", "full");
    if (method != "full" && method != "lora") throw Error("", "--method " + method, "full or lora");
    LoraOptions lo;
    if (method == "lora") {
        lo.r = a.integer("lora-r", 8, 1);
        lo.alpha = (float)a.num("lora-alpha", 16);
        const bool gpt2 = cfg.family == Family::Gpt2;
        lo.targets = split(a.get("lora-targets", gpt2 ? "c_attn,attn.c_proj" : "q_proj,k_proj,v_proj,o_proj"), ',');
        if (lo.targets.empty())
            throw Error("", "--lora-targets is empty", gpt2 ? "module names such as c_attn,c_proj,c_fc" : "module names such as q_proj,v_proj,down_proj");
    }
    const int T = a.integer("seq-len", std::min(128, cfg.max_pos), 1);
    const std::string pos_field = cfg.family == Family::Gpt2 ? "n_positions" : "max_position_embeddings";
    if (T > cfg.max_pos)
        throw Error(config_path, "--seq-len " + std::to_string(T) + " exceeds " + pos_field + " " + std::to_string(cfg.max_pos), "seq-len <= " + pos_field);
    const int B = a.integer("batch", 8, 1), K = a.integer("accum", 1, 1), steps = a.integer("steps", 10, 0);
    const double lr = a.num("lr", 3e-4), min_lr = a.num("min-lr", 0.0);
    const int warmup = a.integer("warmup", 0, 0);
    const std::string sched = a.get("schedule", "cosine");
    if (sched != "cosine" && sched != "linear" && sched != "constant") throw Error("", "--schedule " + sched, "cosine, linear or constant");
    const float wd = (float)a.num("weight-decay", 0.0), b1 = (float)a.num("beta1", 0.9), b2 = (float)a.num("beta2", 0.999),
                eps = (float)a.num("eps", 1e-8), clip = (float)a.num("grad-clip", 1.0);
    const uint64_t seed = (uint64_t)a.integer("seed", 1234, 0);
    const int sample_ms = a.integer("sample-ms", 0, 0);

    Model model(cfg, B, T, method == "full", lo, threads, a.integer("ce-chunk-rows", 0, 0));
    if (a.has("plan")) {
        std::printf("%s\n", model.plan_json().c_str());
        return 0;
    }
    const std::string out = a.get("out");
    if (!out.empty()) make_dirs(out);
    for (const char* k : {"dump-grads", "dump-logits"}) {
        std::string p = a.get(k);
        if (p.empty()) continue;
        size_t slash = p.rfind('/');
        make_dirs(slash == std::string::npos ? "." : (slash == 0 ? "/" : p.substr(0, slash)));
    }
    if (!a.has("data")) throw Error("", "missing --data FILE", "a token file written by `mfbench tokenize`");
    TokenFile data = read_token_file(a.get("data"), (uint32_t)cfg.vocab);
    if (data.ids.size() < (size_t)T + 1)
        throw Error(a.get("data"), "only " + std::to_string(data.ids.size()) + " tokens", "at least seq-len + 1 = " + std::to_string(T + 1));

    if (!model_dir.empty()) {
        std::string st = model_dir + "/model.safetensors";
        if (!file_exists(st) && file_exists(st + ".index.json"))
            throw Error(st + ".index.json", "sharded checkpoints are not supported yet", "a single model.safetensors");
        if (!file_exists(st)) throw Error(st, "missing", "model.safetensors next to config.json (or use --config for random init)");
        model.load_weights(st);
    } else {
        model.random_init(seed);
    }
    if (a.has("lora-init")) {
        if (method != "lora") throw Error("", "--lora-init needs --method lora", "--method lora");
        model.load_adapter(a.get("lora-init") + "/adapter_model.safetensors");
    } else {
        model.init_adapters(seed);
    }

    const size_t ntrain = model.num_trainable();
    std::vector<float> m(ntrain, 0.f), v(ntrain, 0.f);
    BatchLoader loader(data, T);
    std::vector<int> inputs((size_t)K * B * T), targets((size_t)K * B * T);

    Trace trace;
    if (!out.empty()) trace.open(out + "/trace.jsonl");
    const double t_start = now_s();
    std::atomic<bool> stop{false};
    std::mutex smu;
    std::condition_variable scv;
    std::thread sampler;
    if (sample_ms > 0 && !out.empty())
        sampler = std::thread([&] {
            std::unique_lock<std::mutex> lk(smu);
            while (!stop) {
                trace.write({{"type", "sample"}, {"t", now_s() - t_start}, {"rss", current_rss_bytes()}});
                scv.wait_for(lk, std::chrono::milliseconds(sample_ms), [&] { return stop.load(); });
            }
        });
    auto stop_sampler = [&] {
        if (sampler.joinable()) {
            {
                std::lock_guard<std::mutex> lk(smu);
                stop = true;
            }
            scv.notify_all();
            sampler.join();
        }
    };

    std::vector<double> durations;
    double last_loss = NAN;
    if (!quiet)
        std::fprintf(stderr, "mfbench-train: %s, %zu trainable parameters, %d threads, gemm %s\n", method.c_str(), ntrain, threads,
                     gemm_backend());
    try {
        for (int s = 0; s < steps; s++) {
            double t0 = now_s(), c0 = cpu_seconds();
            for (int k = 0; k < K; k++) loader.next(B, &inputs[(size_t)k * B * T], &targets[(size_t)k * B * T]);
            size_t counted = 0;
            for (int t : targets) counted += t >= 0;
            model.zero_grads();
            double loss_sum = 0.0;
            for (int k = 0; k < K; k++)
                loss_sum += model.step(&inputs[(size_t)k * B * T], &targets[(size_t)k * B * T], true,
                                       counted ? 1.f / (float)counted : 0.f);
            double loss = counted ? loss_sum / counted : 0.0;
            if (s == 0 && a.has("dump-grads")) {
                SafetensorsWriter w;
                float lossf = (float)loss;
                for (auto& seg : model.trainable()) w.add(seg.name, seg.shape, seg.g);
                w.add("loss", {}, &lossf);
                w.write(a.get("dump-grads"), {{"format", "pt"}});
            }
            double norm = grad_norm(model.trainable());
            float gscale = clip > 0 && norm > clip ? (float)(clip / (norm + 1e-6)) : 1.f;
            double lr_s = lr_at(s, steps, warmup, lr, min_lr, sched);
            adamw(model.trainable(), m, v, s + 1, (float)lr_s, b1, b2, eps, wd, gscale);
            double t1 = now_s();
            durations.push_back(t1 - t0);
            last_loss = loss;
            trace.write({{"type", "step"}, {"index", s}, {"t", t1 - t_start}, {"loss", loss}, {"tokens", (size_t)K * B * T},
                         {"duration", t1 - t0}, {"lr", lr_s}, {"grad_norm", norm}});
            if (!quiet)
                std::fprintf(stderr, "step %d/%d loss %.4f lr %.3g norm %.3f %.2fs (cpu %.2fs)\n", s + 1, steps, loss, lr_s, norm,
                             t1 - t0, cpu_seconds() - c0);
        }
    } catch (...) {
        stop_sampler();
        throw;
    }
    stop_sampler();

    if (a.has("dump-logits")) {
        BatchLoader first(data, T);
        first.next(B, inputs.data(), targets.data());
        std::vector<float> logits((size_t)B * T * cfg.vocab);
        size_t counted = 0;
        for (int i = 0; i < B * T; i++) counted += targets[i] >= 0;
        float lossf = (float)(model.step(inputs.data(), targets.data(), false, 0.f, logits.data()) / std::max<size_t>(1, counted));
        SafetensorsWriter w;
        w.add("logits", {B, T, cfg.vocab}, logits.data());
        w.add("loss", {}, &lossf);
        w.write(a.get("dump-logits"), {{"format", "pt"}});
    }
    if (!out.empty()) {
        if (!a.has("no-save")) {
            if (method == "full") model.save_full(out);
            else model.save_adapter(out, model_dir.empty() ? config_path : model_dir);
        }
        std::vector<double> d = durations;
        std::sort(d.begin(), d.end());
        double med = d.empty() ? 0.0 : (d.size() % 2 ? d[d.size() / 2] : 0.5 * (d[d.size() / 2 - 1] + d[d.size() / 2]));
        json summary = {{"source", "measured"},
                        {"steps", steps},
                        {"median_step_s", med},
                        {"tokens_per_s", med > 0 ? (double)K * B * T / med : 0.0},
                        {"peak_memory_bytes", peak_rss_bytes()},
                        {"final_loss", std::isfinite(last_loss) ? json(last_loss) : json(nullptr)},
                        {"killed", false},
                        {"kill_reason", nullptr},
                        {"details",
                         {{"method", method},
                          {"trainable_params", ntrain},
                          {"threads", threads},
                          {"gemm", gemm_backend()},
                          {"batch", B},
                          {"accum", K},
                          {"seq_len", T},
                          {"tokens_per_step", (size_t)K * B * T},
                          {"plan", json::parse(model.plan_json())}}}};
        trace.close();
        write_file_atomic(out + "/summary.json", summary.dump(2) + "\n");
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const Error& e) {
        std::fprintf(stderr, "%s\n", e.line().c_str());
        return 2;
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "mfbench-train: error: out of memory (expected a smaller batch, seq-len or model)\n");
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mfbench-train: error: %s\n", e.what());
        return 1;
    }
}

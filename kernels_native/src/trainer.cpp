#include "trainer.h"

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
#include <mutex>
#include <thread>
#include <vector>

#include "common.h"
#include "control.h"
#include "data.h"
#include "gemm.h"
#include "model.h"
#include "optimizer.h"
#include "safetensors.h"
#include "telemetry.h"

namespace mfb {

using json = nlohmann::json;

namespace {

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

// Telemetry samples into the trace every `ms` milliseconds on its own thread, until stop().
struct Sampler {
    std::atomic<bool> stopping{false};
    std::mutex mu;
    std::condition_variable cv;
    std::thread th;
    void start(Trace& trace, int ms, Telemetry& tel) {
        th = std::thread([this, &trace, ms, &tel] {
            std::unique_lock<std::mutex> lk(mu);
            while (!stopping) {
                trace.write(tel.sample(tel.read()));
                cv.wait_for(lk, std::chrono::milliseconds(ms), [this] { return stopping.load(); });
            }
        });
    }
    void stop() {
        if (!th.joinable()) return;
        {
            std::lock_guard<std::mutex> lk(mu);
            stopping = true;
        }
        cv.notify_all();
        th.join();
    }
    ~Sampler() { stop(); }
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

std::string parent_dir(const std::string& p) {
    size_t slash = p.rfind('/');
    return slash == std::string::npos ? "." : (slash == 0 ? "/" : p.substr(0, slash));
}

bool file_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

double median(std::vector<double> d) {
    std::sort(d.begin(), d.end());
    return d.size() % 2 ? d[d.size() / 2] : 0.5 * (d[d.size() / 2 - 1] + d[d.size() / 2]);
}

json number_or_null(double x) { return std::isfinite(x) ? json(x) : json(nullptr); }

}  // namespace

int train(const RunOptions& opt) {
    set_threads(opt.threads);
    Config cfg = load_config(opt.config_path);
    // tokenizer files are copied from, and adapters name, the folder the weights came from
    const std::string model_dir = !opt.model_dir.empty() ? opt.model_dir : (opt.weights_path.empty() ? "" : parent_dir(opt.config_path));
    cfg.source_dir = model_dir;

    const bool gpt2 = cfg.family == Family::Gpt2;
    LoraOptions lo;
    if (opt.method == "lora") {
        lo.r = opt.lora_r;
        lo.alpha = (float)opt.lora_alpha;
        lo.targets = opt.lora_targets;
        if (lo.targets.empty()) lo.targets = gpt2 ? std::vector<std::string>{"c_attn", "attn.c_proj"}
                                                  : std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"};
    }
    const int T = opt.seq_len > 0 ? opt.seq_len : std::min(128, cfg.max_pos);
    const std::string pos_field = gpt2 ? "n_positions" : "max_position_embeddings";
    if (T > cfg.max_pos)
        throw Error(opt.config_path, "--seq-len " + std::to_string(T) + " exceeds " + pos_field + " " + std::to_string(cfg.max_pos),
                    "seq-len <= " + pos_field);
    const int B = opt.micro_batch, K = opt.micro_batches, steps = opt.steps, N = B * T;

    PlanOptions po;
    po.B = B, po.T = T, po.K = K, po.full = opt.method == "full", po.lora_r = lo.r, po.lora_targets = lo.targets;
    po.threads = opt.threads, po.chunk_rows = resolve_chunk_rows(opt.ce_chunk_rows, N, cfg.vocab), po.grad_clip = opt.grad_clip > 0;
    po.checkpoint_every = opt.checkpoint_every, po.memory_efficient = opt.memory_efficient;
    if (!opt.spec_path.empty()) po.targets_file = opt.spec_path, po.targets_field = "method.targets";
    Model model(cfg, po, lo);
    const Plan& plan = model.plan();
    if (opt.plan_only) {
        std::printf("%s\n", plan.json().c_str());
        return 0;
    }
    const std::string& out = opt.out;
    if (!out.empty()) make_dirs(out);
    for (const std::string& p : {opt.dump_grads, opt.dump_logits})
        if (!p.empty()) make_dirs(parent_dir(p));
    if (opt.data_path.empty()) throw Error("", "missing --data FILE", "a token file written by `mfbench tokenize`");
    TokenFile data = read_token_file(opt.data_path, (uint32_t)cfg.vocab);
    if (data.ids.size() < (size_t)T + 1)
        throw Error(opt.data_path, "only " + std::to_string(data.ids.size()) + " tokens", "at least seq-len + 1 = " + std::to_string(T + 1));

    if (!opt.weights_path.empty()) {
        const std::string& st = opt.weights_path;
        if (!file_exists(st) && file_exists(st + ".index.json"))
            throw Error(st + ".index.json", "sharded checkpoints are not supported yet", "a single model.safetensors");
        if (!file_exists(st)) throw Error(st, "missing", "model.safetensors next to config.json (or use --config for random init)");
        model.load_weights(st);
    } else {
        model.random_init(opt.seed);
    }
    if (!opt.lora_init.empty()) model.load_adapter(opt.lora_init + "/adapter_model.safetensors");
    else model.init_adapters(opt.seed);

    const size_t ntrain = model.num_trainable();
    AdamW adamw;
    adamw.b1 = (float)opt.beta1, adamw.b2 = (float)opt.beta2, adamw.eps = (float)opt.eps, adamw.wd = (float)opt.weight_decay;
    adamw.m = model.buffer("optimizer.m", ntrain);
    adamw.v = model.buffer("optimizer.v", ntrain);
    int* inputs = model.int_buffer("tokens.inputs", (size_t)K * N);
    int* targets = model.int_buffer("tokens.targets", (size_t)K * N);
    std::vector<const PlanOp*> updates;
    for (const PlanOp& op : plan.ops)
        if (op.phase == "update") updates.push_back(&op);
    BatchLoader loader(data, T);

    Trace trace;
    if (!out.empty()) trace.open(out + "/trace.jsonl");
    const double t_start = now_s();
    Telemetry tel(sysfs_root(opt.sysfs_root), t_start);
    SchedulerOptions so;
    so.control = opt.control == "stdio", so.policy = opt.scheduling, so.pause_poll_s = opt.pause_poll_s;
    so.capacity = so.threads = opt.threads;
    Scheduler sched(tel, so, [&trace](const json& j) { trace.write(j); });
    Sampler sampler;
    if (opt.sample_ms > 0 && !out.empty()) sampler.start(trace, opt.sample_ms, tel);

    std::vector<double> durations;
    double last_loss = NAN, first_start = NAN, last_end = NAN;
    const char* method = plan.method.c_str();
    if (!opt.quiet)
        std::fprintf(stderr, "mfbench-train: %s, %zu trainable parameters, %d threads, gemm %s\n", method, ntrain, opt.threads,
                     gemm_backend());
    const size_t tokens_per_step = (size_t)K * N;
    for (int s = 0; s < steps; s++) {
        if (!sched.before_step(s)) break;
        sched.step_started();
        double t0 = now_s(), c0 = cpu_seconds();
        if (s == 0) first_start = t0;
        for (int k = 0; k < K; k++) loader.next(B, inputs + (size_t)k * N, targets + (size_t)k * N);
        size_t counted = 0;
        for (size_t i = 0; i < tokens_per_step; i++) counted += targets[i] >= 0;
        model.zero_grads();
        double loss_sum = 0.0;
        for (int k = 0; k < K; k++)
            loss_sum += model.step(inputs + (size_t)k * N, targets + (size_t)k * N, true, counted ? 1.f / (float)counted : 0.f);
        double loss = counted ? loss_sum / counted : 0.0;
        if (s == 0 && !opt.dump_grads.empty()) {
            SafetensorsWriter w;
            float lossf = (float)loss;
            for (auto& seg : model.trainable()) w.add(seg.name, seg.shape, seg.g);
            w.add("loss", {}, &lossf);
            w.write(opt.dump_grads, {{"format", "pt"}});
        }
        const double lr_s = lr_at(s, steps, opt.warmup, opt.lr, opt.min_lr, opt.schedule);
        double norm = NAN;
        float gscale = 1.f;
        for (const PlanOp* op : updates) {
            if (op->name == "update.grad_norm") {
                norm = grad_norm(model.trainable());
                if (norm > opt.grad_clip) gscale = (float)(opt.grad_clip / (norm + 1e-6));
            } else {
                adamw.update(model.trainable(), op->shard, s + 1, (float)lr_s, gscale);
            }
        }
        double t1 = now_s();
        durations.push_back(t1 - t0);
        sched.step_done(t1 - t0);
        last_loss = loss;
        last_end = t1;
        trace.write({{"type", "step"}, {"index", s}, {"t", t1 - t_start}, {"duration", t1 - t0}, {"tokens", tokens_per_step},
                     {"loss", loss}, {"lr", lr_s}, {"grad_norm", number_or_null(norm)}});
        if (!opt.quiet)
            std::fprintf(stderr, "step %d/%d loss %.4f lr %.3g norm %.3f %.2fs (cpu %.2fs)\n", s + 1, steps, loss, lr_s, norm, t1 - t0,
                         cpu_seconds() - c0);
    }
    sampler.stop();

    if (!opt.dump_logits.empty()) {
        BatchLoader first(data, T);
        first.next(B, inputs, targets);
        std::vector<float> logits((size_t)N * cfg.vocab);
        size_t counted = 0;
        for (int i = 0; i < N; i++) counted += targets[i] >= 0;
        float lossf = (float)(model.step(inputs, targets, false, 0.f, logits.data()) / std::max<size_t>(1, counted));
        SafetensorsWriter w;
        w.add("logits", {B, T, cfg.vocab}, logits.data());
        w.add("loss", {}, &lossf);
        w.write(opt.dump_logits, {{"format", "pt"}});
    }
    if (!out.empty()) {
        if (opt.save) {
            if (plan.method == "full") model.save_full(out);
            else model.save_adapter(out, model_dir.empty() ? opt.config_path : model_dir);
        }
        const double med = durations.empty() ? NAN : median(durations);
        const double wall = durations.empty() ? NAN : last_end - first_start;
        const opt_double energy = tel.energy_j(), b0 = tel.battery_start(), b1 = tel.battery_end();
        const double tokens = (double)durations.size() * tokens_per_step;
        auto opt_json = [](const opt_double& v) { return v ? json(*v) : json(nullptr); };
        json device = "local";
        if (opt.provenance.is_object() && opt.provenance.contains("target") && opt.provenance["target"].is_string())
            device = opt.provenance["target"];
        json summary = {{"schema", 1},
                        {"source", "measured"},
                        {"workload", opt.workload},
                        {"device", device},
                        {"steps", (int)durations.size()},
                        {"tokens_per_step", tokens_per_step},
                        {"median_step_s", number_or_null(med)},
                        {"step_tokens_per_s", number_or_null(tokens_per_step / med)},
                        {"wall_s", number_or_null(wall)},
                        {"wall_tokens_per_s", number_or_null(durations.size() * tokens_per_step / wall)},
                        {"peak_memory_bytes", peak_rss_bytes()},
                        {"energy_j", opt_json(energy)},
                        {"j_per_token", energy && tokens ? json(*energy / tokens) : json(nullptr)},
                        {"battery_start_pct", opt_json(b0)},
                        {"battery_end_pct", opt_json(b1)},
                        {"battery_drop_pct", b0 && b1 ? json(*b0 - *b1) : json(nullptr)},
                        {"max_temperature_c", opt_json(tel.max_temperature())},
                        {"io_read_bytes", 0},
                        {"io_write_bytes", 0},
                        {"final_loss", number_or_null(last_loss)},
                        {"killed", false},
                        {"kill_reason", nullptr},
                        {"stop_reason", sched.stop_reason.empty() ? json(nullptr) : json(sched.stop_reason)},
                        {"provenance", opt.provenance},
                        {"details",
                         {{"threads", sched.threads()},
                          {"cluster", sched.cluster()},
                          {"gemm", gemm_backend()},
                          {"method", plan.method},
                          {"trainable_params", ntrain},
                          {"micro_batch", B},
                          {"micro_batches", K},
                          {"seq_len", T},
                          {"plan",
                           {{"static_bytes", plan.bytes(Lifetime::Static)},
                            {"kept_bytes", plan.bytes(Lifetime::Kept) + plan.bytes(Lifetime::Recomputed)},
                            {"scratch_bytes", plan.bytes(Lifetime::Scratch)},
                            {"total_bytes", plan.total_bytes()},
                            {"peak_bytes", plan.peak_bytes()}}}}}};
        trace.close();
        write_file_atomic(out + "/summary.json", summary.dump(2) + "\n");
    }
    return 0;
}

}  // namespace mfb

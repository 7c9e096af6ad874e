#include "trainer.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "checkpoint.h"
#include "shard.h"
#include "common.h"
#include "control.h"
#include "data.h"
#include "gemm.h"
#include "model.h"
#include "optimizer.h"
#include "safetensors.h"
#include "telemetry.h"
#include "outputs.h"
#include "validate.h"

namespace mfb {

using json = nlohmann::json;

namespace {

bool file_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
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

// JSON Lines trace, written to <out>/trace.jsonl.partial and renamed when the run ends.
// A write error (a full disk) is kept in `err` for the step loop to report: the sampler
// thread cannot throw.
struct Trace {
    FILE* f = nullptr;
    std::string path;
    std::mutex mu;
    std::atomic<int> err{0};
    void open(const std::string& p) {
        path = p;
        f = std::fopen((p + ".partial").c_str(), "w");
        if (!f) throw Error(p, std::string("cannot write: ") + std::strerror(errno), "a writable folder");
    }
    // Resume: continue the partial trace (or the finished one) cut to its checkpoint's
    // length, so no event after the checkpoint stays and a line torn by a kill goes.
    void reopen(const std::string& p, uint64_t keep) {
        path = p;
        const std::string partial = p + ".partial";
        if (!file_exists(partial) && file_exists(p) && std::rename(p.c_str(), partial.c_str()) != 0)
            throw Error(p, std::string("cannot rename: ") + std::strerror(errno), "a writable folder");
        struct stat st;
        uint64_t size = stat(partial.c_str(), &st) == 0 ? (uint64_t)st.st_size : 0;
        if (size < keep)
            throw Error(partial, "holds " + std::to_string(size) + " bytes, fewer than the " + std::to_string(keep) + " of its checkpoint",
                        "the trace of the checkpointed run");
        f = std::fopen(partial.c_str(), "a");
        if (f && ftruncate(fileno(f), (off_t)keep) != 0) std::fclose(f), f = nullptr;
        if (!f) throw Error(partial, std::string("cannot write: ") + std::strerror(errno), "a writable folder");
    }
    void write(const json& j) {
        std::lock_guard<std::mutex> lock(mu);  // before testing f: close() may run on another thread
        if (!f) return;
        std::string s = j.dump() + "\n";
        if (std::fwrite(s.data(), 1, s.size(), f) != s.size() || std::fflush(f) != 0) err = errno ? errno : EIO;
    }
    // Durable up to here; returns the length (a checkpoint records it).
    uint64_t sync() {
        std::lock_guard<std::mutex> lock(mu);
        if (!f) return 0;
        struct stat st;
        if (std::fflush(f) != 0 || fsync(fileno(f)) != 0 || fstat(fileno(f), &st) != 0) {
            err = errno ? errno : EIO;
            return 0;
        }
        return (uint64_t)st.st_size;
    }
    void check() const {
        if (int e = err) throw Error(path + ".partial", std::string("cannot write: ") + std::strerror(e), "a writable folder with free space");
    }
    // Durable and closed; the output set renames it at its commit.
    void seal() {
        FILE* done;
        {
            std::lock_guard<std::mutex> lock(mu);
            done = f;
            f = nullptr;
        }
        check();
        if (done && (std::fflush(done) != 0 || fsync(fileno(done)) != 0)) err = errno ? errno : EIO;
        if (done && std::fclose(done) != 0 && !err) err = errno ? errno : EIO;
        check();
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

double median(std::vector<double> d) {
    std::sort(d.begin(), d.end());
    return d.size() % 2 ? d[d.size() / 2] : 0.5 * (d[d.size() / 2 - 1] + d[d.size() / 2]);
}

json number_or_null(double x) { return std::isfinite(x) ? json(x) : json(nullptr); }

// A non-finite loss, gradient or weight: the run stops (exit 1) and saves nothing; its
// checkpoints hold the last finite state.
[[noreturn]] void diverged(int step, const std::string& what) {
    throw std::runtime_error("training diverged at step " + std::to_string(step + 1) + ": " + what +
                             " (expected finite values: a lower --lr, or gradient clipping)");
}

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
        lo.dropout = opt.lora_dropout;
        if (lo.targets.empty()) lo.targets = gpt2 ? std::vector<std::string>{"c_attn", "attn.c_proj"}
                                                  : std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"};
    }
    const int T = opt.seq_len > 0 ? opt.seq_len : std::min(128, cfg.max_pos);
    const std::string pos_field = gpt2 ? "n_positions" : "max_position_embeddings";
    if (T > cfg.max_pos)
        throw Error(opt.config_path, "--seq-len " + std::to_string(T) + " exceeds " + pos_field + " " + std::to_string(cfg.max_pos),
                    "seq-len <= " + pos_field);
    check_sizes(cfg, opt, T);  // every product below fits
    const int B = opt.micro_batch, K = opt.micro_batches, steps = opt.steps, N = B * T;

    PlanOptions po;
    po.B = B, po.T = T, po.K = K, po.full = opt.method == "full", po.lora_r = lo.r, po.lora_targets = lo.targets;
    po.lora_dropout = lo.dropout > 0;
    po.threads = opt.threads, po.chunk_rows = resolve_chunk_rows(opt.ce_chunk_rows, N, cfg.vocab), po.grad_clip = opt.grad_clip > 0;
    po.frozen = opt.frozen;
    po.recompute_every = opt.recompute_every, po.memory_efficient = opt.memory_efficient;
    po.budget_bytes = opt.sharding == "none" ? -1 : (long long)(opt.budget_mb * 1048576.0);
    po.ahead = opt.sharding == "prefetch" ? opt.ahead : 0;
    po.offload_optimizer = opt.offload_optimizer, po.offload_gradients = opt.offload_gradients;
    if (!opt.spec_path.empty()) po.targets_file = opt.spec_path, po.targets_field = "method.targets";
    check_plan(make_plan(cfg, po), opt.config_path);
    Model model(cfg, po, lo);
    const Plan& plan = model.plan();
    if (opt.plan_only) {
        std::printf("%s\n", plan.json().c_str());
        return 0;
    }
    const std::string& out = opt.out;
    std::unique_ptr<OutputSet> outputs;  // before the trace: destroyed after it
    if (!out.empty()) make_dirs(out), outputs = std::make_unique<OutputSet>(out);
    for (const std::string& p : {opt.dump_grads, opt.dump_logits})
        if (!p.empty()) make_dirs(parent_dir(p));
    if (opt.data_path.empty()) throw Error("", "missing --data FILE", "a token file written by `mfbench tokenize`");
    TokenFile data = read_token_file(opt.data_path, (uint32_t)cfg.vocab);
    if (data.ids.size() < (size_t)T + 1)
        throw Error(opt.data_path, "only " + std::to_string(data.ids.size()) + " tokens", "at least seq-len + 1 = " + std::to_string(T + 1));

    // sharding and offload (shard.h): the parts' files, made before anything is trained
    std::unique_ptr<Shards> shards;
    if (po.budget_bytes >= 0 || po.offload_optimizer) {
        const std::string dir = !opt.shard_dir.empty() ? opt.shard_dir : out.empty() ? "" : out + "/shards";
        if (dir.empty()) throw Error(opt.spec_path, "memory.sharding.dir is null and so is out", "a backing folder for the shards");
        if (!opt.dump_logits.empty() || (!opt.dump_grads.empty() && po.offload_gradients))
            throw Error(opt.spec_path, "--dump-logits (and --dump-grads with offloaded gradients) with sharding is not supported",
                        "a run without them");
        shards = std::make_unique<Shards>(plan, [&](const std::string& n) { return model.buffer(n, plan.find(n)->elements); }, dir,
                                          opt.sharding == "prefetch");
        model.shards = shards.get();
    }
    const bool sharded = po.budget_bytes >= 0;
    if (!opt.weights_path.empty()) {
        const std::string& st = opt.weights_path;
        if (!file_exists(st) && file_exists(st + ".index.json"))
            throw Error(st + ".index.json", "sharded checkpoints are not supported yet", "a single model.safetensors");
        if (!file_exists(st)) throw Error(st, "missing", "model.safetensors next to config.json (or use --config for random init)");
    }
    // a sharded run initializes one shard at a time, each written to flash before the next
    for (const PlanBuffer& b : plan.buffers) {
        if (sharded && b.name.rfind("params.", 0) != 0) continue;
        const std::string shard = sharded ? b.shard : "";
        if (!opt.weights_path.empty()) model.load_weights(opt.weights_path, shard);
        else model.random_init(opt.seed, shard);
        if (!sharded) break;
        shards->write_initial(shard);
    }
    if (!opt.lora_init.empty()) model.load_adapter(opt.lora_init + "/adapter_model.safetensors");
    else model.init_adapters(opt.seed);

    const size_t ntrain = model.num_trainable();
    if (outputs) {  // the disk is found full now, not after the training
        const uint64_t weights = opt.save ? 4 * (uint64_t)ntrain : 0;
        const uint64_t checkpoint = opt.checkpoint_every > 0 ? 12 * (uint64_t)ntrain + 32 * (uint64_t)steps : 0;
        outputs->require_space(weights + checkpoint, weights ? "the model or adapter and a checkpoint" : "a checkpoint");
    }
    AdamW adamw;
    adamw.b1 = (float)opt.beta1, adamw.b2 = (float)opt.beta2, adamw.eps = (float)opt.eps, adamw.wd = (float)opt.weight_decay;
    if (!po.offload_optimizer) {
        adamw.m = model.buffer("optimizer.m", ntrain);
        adamw.v = model.buffer("optimizer.v", ntrain);
    }
    // the checkpointed state (trainable values, m, v): from RAM, or from a sharded run's files
    auto state_io = [&](bool save, const PutFn& put, const float* values) {
        checkpoint_state(save, model.trainable(), shards.get(), sharded && po.full, adamw.m, adamw.v, ntrain, put, values);
    };
    int* inputs = model.int_buffer("tokens.inputs", (size_t)K * N);
    int* targets = model.int_buffer("tokens.targets", (size_t)K * N);
    std::vector<const PlanOp*> updates;
    for (const PlanOp& op : plan.ops)
        if (op.phase == "update") updates.push_back(&op);
    BatchLoader loader(data, T);

    // Checkpoints: everything that decides the numerics is either in `identity` (resume
    // requires the same) or saved (step, data position, trainable values, m, v); there is
    // no random state past initialization (dropout masks are a function of seed, step and
    // micro-batch). Checkpoints fall on optimizer-step boundaries.
    CheckpointState ck;
    ck.identity = {{"method", plan.method}, {"lora_r", lo.r}, {"lora_alpha", lo.alpha}, {"lora_targets", lo.targets},
                   {"seq_len", T}, {"micro_batch", B}, {"micro_batches", K}, {"steps", steps}, {"seed", opt.seed},
                   {"lr", opt.lr}, {"min_lr", opt.min_lr}, {"weight_decay", opt.weight_decay}, {"beta1", opt.beta1},
                   {"beta2", opt.beta2}, {"eps", opt.eps}, {"warmup", opt.warmup}, {"schedule", opt.schedule},
                   {"grad_clip", opt.grad_clip}, {"frozen_dtype", (int)opt.frozen},
                   {"memory_efficient", opt.memory_efficient}, {"data_tokens", data.ids.size()},
                   {"trainable", ntrain}};
    if (lo.dropout > 0) ck.identity["lora_dropout"] = lo.dropout;  // (absent: checkpoints from before it resume)
    const std::string ckpt_dir = out.empty() ? "" : out + "/checkpoints";
    int first_step = 0;
    if (opt.resume) {
        if (load_checkpoint(ckpt_dir, ck, ntrain, [&](const float* values) { state_io(false, nullptr, values); })) {
            if (ck.data_pos >= data.ids.size() || ck.step > (uint64_t)steps)
                throw Error(ckpt_dir + "/ckpt-" + std::to_string(ck.step) + ".bin", "data position or step out of range",
                            "a checkpoint of this run");
            loader.seek(ck.data_pos);
            first_step = (int)ck.step;
            if (!opt.quiet) std::fprintf(stderr, "mfbench-train: resuming after step %d from %s\n", first_step, ckpt_dir.c_str());
        } else if (!opt.quiet) {
            std::fprintf(stderr, "mfbench-train: no checkpoint in %s: starting from step 0\n", ckpt_dir.c_str());
        }
    }
    install_stop_signals();

    // checkpoint folders are made with mkdir, not make_dirs: its write probe would outlive a kill -9
    if (!out.empty() && (opt.checkpoint_every > 0 || opt.resume)) mkdir(ckpt_dir.c_str(), 0777);
    Trace trace;
    if (!out.empty()) {
        if (opt.resume) trace.reopen(out + "/trace.jsonl", ck.trace_bytes);
        else trace.open(out + "/trace.jsonl");
        outputs->set_partial_trace(out + "/trace.jsonl.partial");
    }
    const double t_start = now_s() - ck.trace_t;  // a resumed trace's clock continues from its checkpoint
    Telemetry tel(sysfs_root(opt.sysfs_root), t_start);
    SchedulerOptions so;
    so.control = opt.control == "stdio", so.policy = opt.scheduling, so.pause_poll_s = opt.pause_poll_s;
    so.capacity = so.threads = opt.threads;
    Scheduler sched(tel, so, [&trace](const json& j) { trace.write(j); });
    Sampler sampler;
    if (opt.sample_ms > 0 && !out.empty()) sampler.start(tel, opt.sample_ms, [&trace](const json& e) { trace.write(e); });

    std::vector<double> durations = ck.durations;
    double last_loss = first_step ? ck.last_loss : NAN, first_start = NAN, last_end = NAN;
    std::string stop_reason;
    const char* method = plan.method.c_str();
    if (!opt.quiet)
        std::fprintf(stderr, "mfbench-train: %s, %zu trainable parameters, %d threads, gemm %s\n", method, ntrain, opt.threads,
                     gemm_backend());
    const size_t tokens_per_step = (size_t)K * N;
    // the state after `done` steps, durably, with the trace up to it
    int done_steps = first_step, saved_steps = first_step;
    auto checkpoint = [&](int done) {
        mkdir(ckpt_dir.c_str(), 0777);  // also without --checkpoint-every: signals and pauses checkpoint
        saved_steps = done;
        ck.step = done, ck.data_pos = loader.pos(), ck.trace_t = now_s() - t_start;
        ck.wall_s = ck.wall_s + (last_end - first_start), first_start = last_end;
        ck.last_loss = last_loss, ck.durations = durations;
        ck.trace_bytes = trace.sync();
        trace.check();
        save_checkpoint(ckpt_dir, ck, ntrain, [&](const PutFn& put) { state_io(true, put, nullptr); });
    };
    sched.should_stop = [] {
        std::string reason;
        return stop_requested(reason);
    };
    sched.on_pause = [&] {
        if (!out.empty() && done_steps > saved_steps) checkpoint(done_steps);
    };
    std::vector<double> grad_sq_parts(model.trainable().size());  // offloaded gradients: each segment's sum of squares
    if (shards) {
        shards->on_io = [&trace](const json& j) { trace.write(j); };
        shards->t0 = t_start;
        if (po.offload_gradients && po.grad_clip)
            shards->on_grads_final = [&](const std::string& shard) {
                for (size_t k = 0; k < grad_sq_parts.size(); k++)
                    if (model.trainable()[k].shard == shard) grad_sq_parts[k] = grad_sq(model.trainable()[k]);
            };
    }
    // op events: each region of the first steps (as the simulator's op events, an owner's ops
    // in one phase here: "block3.backward"; the head's backward runs inside its forward region)
    bool trace_ops = false;  // set for the first steps of a run with an output folder
    auto op_event = [&](const std::string& name, const std::string& shard, double start, double end) {
        trace.write({{"type", "op"}, {"name", name}, {"start", start - t_start}, {"duration", end - start},
                     {"shard", shard.empty() ? json(nullptr) : json(shard)}, {"bytes", nullptr}});
    };
    const decltype(model.on_region) region_event = [&](const std::string& owner, const char* phase, double start,
                                                       double end) { op_event(owner + "." + phase, owner, start, end); };
    for (int s = first_step; s < steps; s++) {
        if (!sched.before_step(s)) {  // a signal, or the policy ended the run (a pause too long): keep what it had
            if (!stop_requested(stop_reason)) stop_reason = sched.stop_reason;
            if (!out.empty() && s > first_step) checkpoint(s);
            break;
        }
        double t0 = now_s(), c0 = cpu_seconds();
        trace_ops = s < first_step + 3 && !out.empty();  // as the simulator, op and io events of the first steps
        model.on_region = trace_ops ? region_event : nullptr;  // untimed after them
        if (shards) shards->trace_io = trace_ops;
        if (s == first_step) first_start = t0;
        for (int k = 0; k < K; k++) loader.next(B, inputs + (size_t)k * N, targets + (size_t)k * N);
        size_t counted = 0;
        for (size_t i = 0; i < tokens_per_step; i++) counted += targets[i] >= 0;
        model.zero_grads();
        double loss_sum = 0.0;
        for (int k = 0; k < K; k++) {
            model.dropout_at(opt.seed, s, k);
            loss_sum += model.step(inputs + (size_t)k * N, targets + (size_t)k * N, true, counted ? 1.f / (float)counted : 0.f);
        }
        double loss = counted ? loss_sum / counted : 0.0;
        if (!std::isfinite(loss)) diverged(s, "its loss is " + std::to_string(loss));
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
            if (shards) shards->enter(op->name, "update");
            const double u0 = now_s();
            if (op->name == "update.grad_norm") {
                if (po.offload_gradients) {  // summed as grad_norm sums them, segment by segment
                    double total = 0.0;
                    for (double x : grad_sq_parts) total += x;
                    norm = std::sqrt(total);
                } else {
                    norm = grad_norm(model.trainable());
                }
                if (!std::isfinite(norm)) diverged(s, "its gradient norm is " + std::to_string(norm));
                if (norm > opt.grad_clip) gscale = (float)(opt.grad_clip / (norm + 1e-6));
            } else if (shards) {
                const PlanBuffer* scratch = plan.find("scratch.moments");
                shards->update(adamw, model.trainable(), op->shard, s + 1, (float)lr_s, gscale,
                               scratch ? model.buffer(scratch->name, scratch->elements) : nullptr, scratch ? scratch->elements : 0);
            } else {
                adamw.update(model.trainable(), op->shard, s + 1, (float)lr_s, gscale);
            }
            if (trace_ops) op_event(op->name + ".update", op->shard, u0, now_s());
        }
        if (shards) shards->finish_step();
        double t1 = now_s();
        durations.push_back(t1 - t0);
        done_steps = s + 1;
        sched.step_done(t1 - t0);
        last_loss = loss;
        last_end = t1;
        trace.write({{"type", "step"}, {"index", s}, {"t", t1 - t_start}, {"duration", t1 - t0}, {"tokens", tokens_per_step},
                     {"loss", loss}, {"lr", lr_s}, {"grad_norm", number_or_null(norm)}});
        if (!opt.quiet)
            std::fprintf(stderr, "step %d/%d loss %.4f lr %.3g norm %.3f %.2fs (cpu %.2fs)\n", s + 1, steps, loss, lr_s, norm, t1 - t0,
                         cpu_seconds() - c0);
        trace.check();
        const bool stop = stop_requested(stop_reason);
        if (!out.empty() && (stop || (opt.checkpoint_every > 0 && (s + 1) % opt.checkpoint_every == 0))) checkpoint(s + 1);
        if (stop) {
            if (!opt.quiet) std::fprintf(stderr, "mfbench-train: stopped after step %d (%s)\n", s + 1, stop_reason.c_str());
            break;
        }
    }
    sampler.stop();
    model.on_region = nullptr;  // what runs after the steps (--dump-logits) is no step's region
    trace.check();

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
        if (opt.save && stop_reason.empty()) {  // a stopped run's state is its checkpoint
            for (const TrainSegment& seg : model.trainable()) {
                if (sharded && po.full) shards->hold(seg.shard);  // parameters on flash: a shard resident at a time
                for (size_t i = 0; i < seg.n; i++)
                    if (!std::isfinite(seg.p[i])) diverged(steps - 1, seg.name + " holds " + std::to_string(seg.p[i]));
            }
            if (sharded && po.full) shards->hold("");
            if (plan.method == "full") model.save_full(outputs->staging());
            else model.save_adapter(outputs->staging(), model_dir.empty() ? opt.config_path : model_dir);
        }
        const double med = durations.empty() ? NAN : median(durations);
        // wall time of earlier processes (a resumed run) plus this one's since its last checkpoint
        const double wall = durations.empty() ? NAN : ck.wall_s + (std::isnan(first_start) ? 0.0 : last_end - first_start);
        const opt_double energy = tel.energy_j(), b0 = tel.battery_start(), b1 = tel.battery_end();
        const double tokens = (double)durations.size() * tokens_per_step;
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
                        {"io_read_bytes", shards ? shards->read_bytes : 0},
                        {"io_write_bytes", shards ? shards->write_bytes : 0},
                        {"final_loss", number_or_null(last_loss)},
                        {"killed", false},
                        {"kill_reason", nullptr},
                        {"stop_reason", stop_reason.empty() ? json(nullptr) : json(stop_reason)},
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
        trace.seal();
        outputs->rename_at_commit(out + "/trace.jsonl.partial", out + "/trace.jsonl");
        write_file_atomic(outputs->staging() + "/summary.json", summary.dump(2) + "\n");
        outputs->commit();
    }
    return 0;
}

}  // namespace mfb

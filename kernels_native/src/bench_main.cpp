// mfbench-bench: microbenchmarks of the trainer's own kernels, for `mfbench calibrate`.
//
//   mfbench-bench SPEC.json [--out RESULT.json]
//
// SPEC (written by mfbench.calibrate) says what to time: GEMM shapes (the step programs',
// cold or cached), thread counts, memory-bound kernels at given sizes, storage through plain
// file I/O in a folder. Each cluster of usable CPUs (telemetry.h: grouped by top frequency)
// is measured with its threads pinned to it. Every measurement is the median of repeated
// calls after a warm-up call, repeated until `min_time_s` has passed (at least `min_reps`
// calls). Output: one JSON object (docs/validation.md, "The benchmark binary"); sensors that
// do not exist are null, never invented.
#include <fcntl.h>
#include <omp.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint.h"
#include "common.h"
#include "gemm.h"
#include "layers.h"
#include "model.h"
#include "optimizer.h"
#include "shard.h"
#include "telemetry.h"

using nlohmann::json;
using namespace mfb;

namespace {

struct Timing {
    double min_time = 0.05;
    int min_reps = 3, max_reps = 1000;
    bool cpu = false;  // the process's CPU time instead of wall time ("clock": "cpu"; one thread only)
};

// A cold GEMM's operands are out of the caches, as a step's weights are (last used a step
// before): this many bytes are written before each timed call (twice this host's L3, more
// than a phone's).
constexpr size_t kFlushBytes = (size_t)64 << 20;

double cpu_now() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// The median of some timings (the upper middle one of an even count).
double median(std::vector<double> t) {
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    return t[t.size() / 2];
}

// Median seconds of one call of f (after one warm-up call); `before`, untimed, runs before
// each call.
double time_median(const Timing& tm, const std::function<void()>& f, const std::function<void()>& before = nullptr) {
    f();
    std::vector<double> t;
    auto clock = tm.cpu ? cpu_now : now_s;
    double start = now_s();
    while ((int)t.size() < tm.min_reps || (now_s() - start < tm.min_time && (int)t.size() < tm.max_reps)) {
        if (before) before();
        double t0 = clock();
        f();
        t.push_back(clock() - t0);
    }
    return median(t);
}

// The benchmark's own arrays are mapped and unmapped directly, so that what stays resident
// after a benchmark (the process's RSS) is the runtime's, not a heap that kept their pages.
struct Floats {
    float* p = nullptr;
    size_t n = 0;
    explicit Floats(size_t n_, float fill = 0.f) : n(n_) {
        void* m = mmap(nullptr, std::max<size_t>(1, n) * sizeof(float), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw Error("", "cannot map " + std::to_string(n * sizeof(float)) + " bytes", "free memory");
        p = static_cast<float*>(m);
        std::fill(p, p + n, fill);
    }
    ~Floats() { munmap(p, std::max<size_t>(1, n) * sizeof(float)); }
    Floats(const Floats&) = delete;
    Floats(Floats&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr, o.n = 0; }
    float* data() { return p; }
    float& operator[](size_t i) { return p[i]; }
};

Floats random_floats(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
    Floats v(n);
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> d(lo, hi);
    for (size_t i = 0; i < n; i++) v[i] = d(rng);
    return v;
}

// Pin every thread of a team of `threads` to the cluster's CPUs (as control.cpp does).
void pin(const Cluster& c, int threads) {
    set_threads(threads);
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int cpu : c.cpus) CPU_SET(cpu, &set);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : failed)
    failed += sched_setaffinity(0, sizeof set, &set) != 0;
    if (failed) throw Error("", "cannot pin threads to cluster " + c.name, "a cluster this process may run on");
}

json bench_gemm(const json& shapes, int threads, const Timing& tm) {
    json out = json::array();
    auto cold_of = [](const json& s) { return s.size() > 5 && s.at(5).get<int>() != 0; };  // [tA, tB, M, N, K, cold]
    Floats junk(std::any_of(shapes.begin(), shapes.end(), cold_of) ? kFlushBytes / sizeof(float) : 0);
    auto flush = [&] {  // a write to every cache line of a buffer larger than the caches
        for (size_t i = 0; i < junk.n; i += 16) junk.p[i] += 1.f;
    };
    for (const json& s : shapes) {
        bool tA = s.at(0).get<int>(), tB = s.at(1).get<int>();
        int M = s.at(2), N = s.at(3), K = s.at(4);
        const bool cold = cold_of(s);
        auto A = random_floats((size_t)M * K, 1), B = random_floats((size_t)K * N, 2);
        Floats C((size_t)M * N);
        double sec = time_median(tm, [&] {
            sgemm(tA, tB, M, N, K, 1.f, A.data(), tA ? M : K, B.data(), tB ? K : N, 0.f, C.data(), N);
        }, cold ? std::function<void()>(flush) : nullptr);
        out.push_back({{"shape", s}, {"threads", threads}, {"seconds", sec}, {"cold", cold}});
    }
    return out;
}

// Causal attention, forward and backward, standard or memory-efficient: [B, T, H, KV, hd, me].
json bench_attention(const json& shapes, int threads, const Timing& tm) {
    json out = json::array();
    for (const json& s : shapes) {
        const int B = s.at(0), T = s.at(1), H = s.at(2), KV = s.at(3), hd = s.at(4);
        const bool me = s.at(5).get<int>();
        const int ldq = H * hd, ldkv = KV * hd;
        const size_t nq = (size_t)B * T * ldq, nkv = (size_t)B * T * ldkv;
        auto q = random_floats(nq, 14), k = random_floats(nkv, 15), v = random_floats(nkv, 16), dy = random_floats(nq, 17);
        Floats y(nq), dq(nq), dk(nkv), dv(nkv);
        const float scale = 1.f / std::sqrt((float)hd);
        double fwd, bwd;
        if (me) {
            Floats lse((size_t)B * H * T), scratch((size_t)threads * attention_me_scratch(T, kAttnBlock));
            fwd = time_median(tm, [&] {
                attention_me_forward(y.data(), lse.data(), scratch.data(), threads, q.data(), k.data(), v.data(), B, T, H, KV, hd,
                                     ldq, ldkv, ldq, scale, 0, kAttnBlock);
            });
            bwd = time_median(tm, [&] {
                attention_me_backward(dq.data(), dk.data(), dv.data(), scratch.data(), threads, dy.data(), q.data(), k.data(),
                                      v.data(), y.data(), lse.data(), B, T, H, KV, hd, ldq, ldkv, ldq, scale, 0, kAttnBlock);
            });
        } else {
            Floats probs((size_t)B * H * T * T), dS((size_t)threads * T * T);
            fwd = time_median(tm, [&] {
                attention_forward(y.data(), probs.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd, ldq, ldkv, ldq, scale, 0);
            });
            bwd = time_median(tm, [&] {
                attention_backward(dq.data(), dk.data(), dv.data(), dS.data(), threads, dy.data(), q.data(), k.data(), v.data(),
                                   probs.data(), B, T, H, KV, hd, ldq, ldkv, ldq, scale, 0);
            });
        }
        out.push_back({{"shape", s}, {"threads", threads}, {"forward_s", fwd}, {"backward_s", bwd}});
    }
    return out;
}

// The memory-bound kernels of the step programs, by the names mfbench's cost model gives
// their classes; `elements` is the size of the kernel's main tensor (what the plan counts).
json bench_memory(const json& spec, int threads, const Timing& tm) {
    const int N = spec.at("rows"), C = spec.at("width"), F = spec.at("wide"), V = spec.at("vocab");
    const int ce_rows = spec.at("ce_rows");
    const size_t upd = spec.at("update");
    const size_t NC = (size_t)N * C, NF = (size_t)N * F;
    auto x = random_floats(NC, 3), dy = random_floats(NC, 4), w = random_floats(C, 5, 0.5f, 1.5f), b = random_floats(C, 6);
    Floats out(NC), dx(NC), mean(N), rstd(N), dw(C), db(C), part((size_t)threads * 2 * C);
    auto h = random_floats(NF, 7), g = random_floats(NF, 8);
    Floats o(NF), d(NF), e(NF);
    json res = json::array();
    auto add = [&](const char* kernel, const char* cls, size_t elements, const std::function<void()>& f) {
        res.push_back({{"kernel", kernel}, {"class", cls}, {"elements", elements}, {"threads", threads},
                       {"seconds", time_median(tm, f)}});
    };
    add("layernorm_forward", "layernorm", NC, [&] { layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f); });
    add("layernorm_backward", "layernorm_backward", NC, [&] {
        layernorm_backward(dx.data(), dw.data(), db.data(), part.data(), threads, dy.data(), x.data(), w.data(), mean.data(),
                           rstd.data(), N, C);
    });
    add("rmsnorm_forward", "rmsnorm", NC, [&] { rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f, false); });
    add("rmsnorm_backward", "rmsnorm_backward", NC, [&] {
        rmsnorm_backward(dx.data(), dw.data(), part.data(), threads, dy.data(), x.data(), w.data(), rstd.data(), N, C, false, true);
    });
    add("gelu_forward", "gelu", NF, [&] { act_forward_deriv(o.data(), d.data(), h.data(), NF, ActKind::GeluTanh); });
    add("swiglu_forward", "swiglu", NF, [&] { gated_forward(o.data(), h.data(), g.data(), NF, ActKind::Silu); });
    add("swiglu_backward", "swiglu_backward", NF, [&] { gated_backward(d.data(), e.data(), o.data(), h.data(), g.data(), NF, ActKind::Silu); });
    add("geglu_forward", "geglu", NF, [&] { gated_forward(o.data(), h.data(), g.data(), NF, ActKind::GeluTanh); });
    add("geglu_backward", "geglu_backward", NF, [&] { gated_backward(d.data(), e.data(), o.data(), h.data(), g.data(), NF, ActKind::GeluTanh); });
    {
        // LoRA dropout over an adapter's input: forward masks it; backward masks it again (for
        // dA) and adds the masked (du A) into dx
        Dropout drop;
        drop.p = 0.1, drop.training = true, drop.seed = 1;
        add("lora_dropout_forward", "lora_dropout", NC, [&] { drop.apply(0, x.data(), out.data(), NC, false); });
        add("lora_dropout_backward", "lora_dropout_backward", NC, [&] {
            drop.apply(0, x.data(), out.data(), NC, false);
            drop.apply(0, dy.data(), dx.data(), NC, true);
        });
    }
    {
        // the softmax of the loss: a chunk of rows x V logits, forward and backward
        size_t n = (size_t)ce_rows * V;
        auto logits = random_floats(n, 9);
        std::vector<int> targets(ce_rows);
        for (int i = 0; i < ce_rows; i++) targets[i] = (i * 7919) % V;
        add("cross_entropy", "cross_entropy", n, [&] { cross_entropy_chunk(logits.data(), targets.data(), ce_rows, V, true, 1e-3f); });
    }
    {
        // AdamW over `upd` values (one segment), as the trainer's update op
        auto p = random_floats(upd, 10), gr = random_floats(upd, 11);
        Floats m(upd), v(upd);
        std::vector<TrainSegment> segs{{"w", {(int64_t)upd}, p.data(), gr.data(), upd, true, ""}};
        AdamW opt;
        opt.m = m.data(), opt.v = v.data(), opt.wd = 0.01f;
        int t = 0;
        add("adamw", "update", upd, [&] { opt.update(segs, "", ++t, 1e-4f, 1.f); });
        add("grad_norm", "grad_norm", upd, [&] { (void)grad_norm(segs); });
        add("zero_grads", "zero", upd, [&] { std::memset(gr.data(), 0, upd * sizeof(float)); });
        // a streaming triad (y = a x + y): DRAM bandwidth for the small elementwise kernels
        add("triad", "stream", upd, [&] {
            float* pp = p.data();
            const float* gg = gr.data();
#pragma omp parallel for simd schedule(static)
            for (size_t i = 0; i < upd; i++) pp[i] = 0.5f * gg[i] + pp[i];
        });
    }
    return res;
}

// Storage through plain file I/O, as the trainer writes its files (files.cpp): fwrite,
// fflush, fsync; then the file's pages are dropped from the page cache and it is read back
// with fread, and `reads` 4 KiB preads at random offsets time one request; last, the cached
// file is loaded, stored and evicted as the trainer's shards are (shard.h).
json bench_storage(const json& spec) {
    const std::string dir = spec.at("dir");
    const size_t bytes = spec.at("bytes");
    const int reads = spec.value("reads", 200);
    const std::string path = dir + "/mfbench-bench." + std::to_string(getpid()) + ".bin";
    const size_t chunk = 1 << 20;
    auto data = random_floats(chunk / sizeof(float), 12);
    auto fail = [&](const char* what) {
        int err = errno;
        std::remove(path.c_str());
        throw Error(path, std::string(what) + ": " + std::strerror(err), "a writable folder with free space");
    };
    double t0 = now_s();
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) fail("cannot write");
    for (size_t done = 0; done < bytes; done += chunk)
        if (std::fwrite(data.data(), 1, std::min(chunk, bytes - done), f) != std::min(chunk, bytes - done)) fail("cannot write");
    if (std::fflush(f) != 0 || fsync(fileno(f)) != 0) fail("cannot sync");
    std::fclose(f);
    double write_s = now_s() - t0;

    auto drop = [&] {
        int fd = ::open(path.c_str(), O_RDONLY);
        if (fd < 0) fail("cannot open");
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        ::close(fd);
    };
    drop();
    std::vector<char> buf(chunk);
    t0 = now_s();
    f = std::fopen(path.c_str(), "rb");
    if (!f) fail("cannot read");
    size_t got = 0, n;
    while ((n = std::fread(buf.data(), 1, chunk, f)) > 0) got += n;
    std::fclose(f);
    double read_s = now_s() - t0;
    if (got != bytes) fail("short read");

    drop();
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) fail("cannot open");
    std::mt19937_64 rng(13);
    const size_t pages = std::max<size_t>(1, bytes / 4096);
    std::vector<double> lat;
    for (int i = 0; i < reads; i++) {
        off_t off = (off_t)(rng() % pages) * 4096;
        double s = now_s();
        if (pread(fd, buf.data(), 4096, off) < 0) { ::close(fd); fail("cannot read"); }
        lat.push_back(now_s() - s);
    }
    ::close(fd);

    // the file in the page cache (just read), as the trainer's shards use their files: a load
    // (populate a private mapping), a store (pwrite from RAM), an evict (the file mapped
    // again over the part); the medians of a few rounds
    fd = ::open(path.c_str(), O_RDWR);
    if (fd < 0) fail("cannot open");
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) { ::close(fd); fail("cannot map"); }
    std::vector<char> ram(bytes, 1);
    std::vector<double> map_s, store_s, unmap_s;
    for (int round = 0; round < 5; round++) {
        double s = now_s();
        populate(m, bytes);
        map_s.push_back(now_s() - s);
        s = now_s();
        if (pwrite(fd, ram.data(), bytes, 0) != (ssize_t)bytes) { ::close(fd); fail("cannot write"); }
        store_s.push_back(now_s() - s);
        s = now_s();
        map_file(m, bytes, fd, path);
        unmap_s.push_back(now_s() - s);
    }
    munmap(m, bytes);
    ::close(fd);
    std::remove(path.c_str());
    return {{"bytes", bytes}, {"write_s", write_s}, {"read_s", read_s}, {"latency_s", median(lat)}, {"reads", reads},
            {"map_s", median(map_s)}, {"store_s", median(store_s)}, {"unmap_s", median(unmap_s)}};
}

// ---- power and heat: only where a battery reports its current ----
//
// `power`: battery power (voltage x current) sampled every `sample_s` while the device idles
// and while each cluster runs a GEMM on 1 to all of its cores at each frequency step. `heat`:
// every core runs for `heat_s`, then idles for `cool_s` (the thermal network's heat-up and
// cool-down). Samples are the trainer's own `sample` events (telemetry.h), `phases` say what
// ran when; the fit (mfbench.calibrate) reads the medians of the power phases' windows and
// the whole heat trace. A step is set through cpufreq's scaling_min/max_freq where they are
// writable (root on a phone) and put back afterwards; elsewhere the governor picks and the
// samples say what it picked.

std::vector<double> numbers_in(const std::string& path) {
    std::ifstream f(path);
    std::vector<double> v;
    for (double x; f >> x;) v.push_back(x);
    return v;
}

bool write_text(const std::string& path, const std::string& text) {
    std::ofstream f(path);
    return f && (f << text << "\n") && f.flush();
}

// A cluster's frequency limits, set step by step where the kernel lets this process, and
// restored by the destructor (also when a benchmark throws).
class FreqLimits {
public:
    FreqLimits(const std::string& root, const Cluster& c) {
        for (int cpu : c.cpus) dirs_.push_back(root + "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/cpufreq/");
        available_ = numbers_in(dirs_[0] + "scaling_available_frequencies");  // kHz
        std::sort(available_.begin(), available_.end());
        for (const std::string& d : dirs_)
            saved_.push_back({read_line(d + "scaling_min_freq").value_or(""), read_line(d + "scaling_max_freq").value_or("")});
        touched_ = !available_.empty() && std::all_of(saved_.begin(), saved_.end(), [](auto& s) { return !s.first.empty() && !s.second.empty(); });
        settable_ = touched_ && set(available_.back());  // a write that fails: not ours to set
    }
    ~FreqLimits() {
        if (!touched_) return;
        for (size_t i = 0; i < dirs_.size(); i++) {  // widen first, so no limit ever crosses the other
            write_text(dirs_[i] + "scaling_min_freq", fmt(available_.front()));
            write_text(dirs_[i] + "scaling_max_freq", saved_[i].second);
            write_text(dirs_[i] + "scaling_min_freq", saved_[i].first);
        }
    }
    FreqLimits(const FreqLimits&) = delete;
    bool settable() const { return settable_; }
    const std::vector<double>& available_khz() const { return available_; }
    bool set(double khz) {
        bool ok = true;
        for (const std::string& d : dirs_)
            ok = write_text(d + "scaling_min_freq", fmt(available_.front())) && write_text(d + "scaling_max_freq", fmt(khz)) &&
                 write_text(d + "scaling_min_freq", fmt(khz)) && ok;
        return ok;
    }

private:
    static std::string fmt(double khz) { return std::to_string((long long)khz); }
    std::vector<std::string> dirs_;
    std::vector<double> available_;
    std::vector<std::pair<std::string, std::string>> saved_;  // (min, max) per CPU, as read
    bool touched_ = false, settable_ = false;
};

// SIGINT or SIGTERM during the power and heat parts (minutes long, with the phone's
// frequency limits changed) ends the phase at once and unwinds, so that they are put back.
struct Stopped {
    std::string reason;
};

bool stopping() {
    std::string reason;
    return stop_requested(reason);
}

// Every thread of the current team busy with GEMMs small enough to stay in the caches (so
// that the power is the cores', not DRAM's) for `seconds`.
void busy(double seconds) {
    const int n = 256;
    auto A = random_floats((size_t)n * n, 1), B = random_floats((size_t)n * n, 2);
    Floats C((size_t)n * n);
    for (double end = now_s() + seconds; now_s() < end && !stopping();)
        sgemm(false, false, n, n, n, 1.f, A.data(), n, B.data(), n, 0.f, C.data(), n);
}

void rest(double seconds) {
    for (double end = now_s() + seconds; now_s() < end && !stopping();)
        std::this_thread::sleep_for(std::chrono::duration<double>(std::min(0.05, std::max(0.0, end - now_s()))));
}

// A phase's window starts `lead` seconds into it (the power and frequency settle).
struct Phases {
    double t_start;
    bool quiet;
    json list = json::array();
    void run(json p, double lead, double seconds, const std::function<void(double)>& f) {
        if (!quiet) std::fprintf(stderr, "mfbench-bench: %s\n", p.dump().c_str());
        double t0 = now_s() - t_start;
        f(lead + seconds);
        std::string reason;
        if (stop_requested(reason)) throw Stopped{reason};
        p["t0"] = t0 + lead, p["t1"] = now_s() - t_start;
        list.push_back(p);
    }
};

// Idle, then each cluster busy on 1 to all of its cores at each frequency step.
json bench_power(const json& spec, Telemetry& tel, double t_start, const std::string& root, bool quiet) {
    const double settle = spec.value("settle_s", 2.0), window = spec.value("window_s", 5.0);
    Phases phases{t_start, quiet};
    json clusters = json::array(), samples = json::array();
    Sampler sampler;
    sampler.start(tel, (int)(1000 * spec.value("sample_s", 0.1)), [&samples](const json& e) { samples.push_back(e); });
    phases.run({{"what", "idle"}}, settle, spec.value("idle_s", 5.0), rest);
    for (size_t ci = 0; ci < tel.clusters().size(); ci++) {
        const Cluster& c = tel.clusters()[ci];
        FreqLimits limits(root, c);
        std::vector<double> steps = limits.settable() ? limits.available_khz() : std::vector<double>{0};  // 0: the governor's
        for (int t = 1; t <= (int)c.cpus.size(); t++) {
            pin(c, t);
            for (double khz : steps) {
                if (khz && !limits.set(khz)) throw Error("", "cannot set cluster " + c.name + " to " + std::to_string(khz) + " kHz", "writable cpufreq limits");
                phases.run({{"what", "load"}, {"cluster", ci}, {"threads", t}, {"set_mhz", khz ? json(khz / 1000) : json(nullptr)}}, settle, window, busy);
            }
        }
        json mhz = json::array();
        for (double k : limits.available_khz()) mhz.push_back(k / 1000);
        clusters.push_back({{"name", c.name}, {"cpus", c.cpus}, {"frequency_control", limits.settable()}, {"available_mhz", mhz}});
    }
    sampler.stop();
    return {{"samples", samples}, {"phases", phases.list}, {"clusters", clusters}};
}

// Every core busy (one team over all the usable CPUs) for `heat_s`, then idle for `cool_s`.
json bench_heat(const json& spec, Telemetry& tel, double t_start, bool quiet) {
    Phases phases{t_start, quiet};
    json samples = json::array();
    Sampler sampler;
    sampler.start(tel, (int)(1000 * spec.value("sample_s", 0.5)), [&samples](const json& e) { samples.push_back(e); });
    Cluster all{"all", {}};
    for (const Cluster& c : tel.clusters()) all.cpus.insert(all.cpus.end(), c.cpus.begin(), c.cpus.end());
    pin(all, (int)all.cpus.size());
    phases.run({{"what", "heat"}, {"threads", all.cpus.size()}}, 0, spec.value("heat_s", 300.0), busy);
    phases.run({{"what", "cool"}}, 0, spec.value("cool_s", 300.0), rest);
    sampler.stop();
    return {{"samples", samples}, {"phases", phases.list}};
}

void run(const json& spec, const std::string& out_path) {
    json out;
    out["version"] = 1;
    out["gemm_backend"] = gemm_backend();
    const double t_start = now_s();
    Telemetry tel(sysfs_root(""), t_start);
    Reading r = tel.read();
    out["rss_start_bytes"] = r.rss;  // the engine linked and loaded, nothing allocated yet
    Timing tm;
    tm.min_time = spec.value("min_time_s", 0.05);
    tm.min_reps = spec.value("min_reps", 3);
    tm.cpu = spec.value("clock", std::string("wall")) == "cpu";
    out["battery"] = {{"present", tel.has_battery()}, {"current_a", opt_json(r.current_a)}, {"voltage_v", opt_json(r.voltage_v)}};
    std::vector<int> asked = spec.value("threads", std::vector<int>{});
    json clusters = json::array();
    for (size_t ci = 0; ci < tel.clusters().size(); ci++) {
        const Cluster& c = tel.clusters()[ci];
        json cj = {{"name", c.name}, {"cpus", c.cpus}, {"gemm", json::array()}, {"attention", json::array()},
                   {"memory", json::array()}};
        std::vector<int> threads = asked;
        if (threads.empty())
            for (int t = 1; t <= (int)c.cpus.size(); t++) threads.push_back(t);
        for (int t : threads) {
            if (t < 1 || t > (int)c.cpus.size()) continue;
            pin(c, t);
            if (!spec.value("quiet", false)) std::fprintf(stderr, "mfbench-bench: cluster %s, %d thread%s\n", c.name.c_str(), t, t > 1 ? "s" : "");
            for (json& g : bench_gemm(spec.value("gemm", json::array()), t, tm)) cj["gemm"].push_back(g);
            for (json& a : bench_attention(spec.value("attention", json::array()), t, tm)) cj["attention"].push_back(a);
            if (spec.contains("memory"))
                for (json& m : bench_memory(spec["memory"], t, tm)) cj["memory"].push_back(m);
        }
        clusters.push_back(cj);
    }
    out["clusters"] = clusters;
    // what the BLAS kept after the products (their matrices are freed; large blocks go back to the OS)
    out["rss_after_bytes"] = tel.read().rss;
    out["storage"] = spec.contains("storage") ? bench_storage(spec["storage"]) : json(nullptr);
    // power and heat need a battery that reports its current (on a charger it reports the
    // charger's work instead: the fit refuses samples taken while charging)
    const bool sensor = tel.has_battery() && r.current_a, quiet = spec.value("quiet", false);
    if (sensor && (spec.contains("power") || spec.contains("heat"))) install_stop_signals();
    out["power"] = spec.contains("power") && sensor ? bench_power(spec["power"], tel, t_start, sysfs_root(""), quiet) : json(nullptr);
    out["heat"] = spec.contains("heat") && sensor ? bench_heat(spec["heat"], tel, t_start, quiet) : json(nullptr);
    std::string text = out.dump(1) + "\n";
    if (out_path.empty()) std::fwrite(text.data(), 1, text.size(), stdout);
    else write_file_atomic(out_path, text);
}

}  // namespace

int main(int argc, char** argv) {
    std::string spec_path, out_path;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "--out" && i + 1 < argc) out_path = argv[++i];
        else if (a == "--help" || a == "-h") {
            std::puts("usage: mfbench-bench SPEC.json [--out RESULT.json]");
            return 0;
        } else if (spec_path.empty() && a.rfind("--", 0) != 0) spec_path = a;
        else {
            std::fprintf(stderr, "mfbench-bench: error: unknown argument %s (expected SPEC.json [--out RESULT.json])\n", a.c_str());
            return 2;
        }
    }
    if (spec_path.empty()) {
        std::fprintf(stderr, "mfbench-bench: error: no SPEC.json given (expected mfbench-bench SPEC.json [--out RESULT.json])\n");
        return 2;
    }
    try {
        std::ifstream in(spec_path);
        if (!in) throw Error(spec_path, "cannot read", "a benchmark spec written by mfbench calibrate");
        json spec;
        try {
            spec = json::parse(in);
        } catch (const json::exception& e) {
            throw Error(spec_path, std::string("not valid JSON: ") + e.what(), "a benchmark spec");
        }
        try {
            run(spec, out_path);
        } catch (const json::exception& e) {
            throw Error(spec_path, std::string("bad field: ") + e.what(), "a benchmark spec written by mfbench calibrate");
        }
    } catch (const Error& e) {
        std::fprintf(stderr, "%s\n", e.line().replace(0, 13, "mfbench-bench").c_str());
        return 2;
    } catch (const Stopped& s) {
        std::fprintf(stderr, "mfbench-bench: stopped by %s; the frequency limits are as they were\n", s.reason.c_str());
        return 130;
    }
    return 0;
}

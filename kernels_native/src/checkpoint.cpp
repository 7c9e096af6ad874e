#include "checkpoint.h"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>

#include "common.h"

namespace mfb {

using json = nlohmann::json;

namespace {

// Layout: "MFBCKPT\0", u32 version, u32 0, u64 n, n bytes of JSON (the CheckpointState but
// its arrays), u64 d, d bytes of float32 (trainable values, m, v), u64 FNV-1a 64 of every
// byte before it. Little-endian.
const char kMagic[8] = {'M', 'F', 'B', 'C', 'K', 'P', 'T', '\0'};
const uint64_t kFnvOffset = 1469598103934665603ULL, kFnvPrime = 1099511628211ULL;

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * kFnvPrime;
    return h;
}

std::string ckpt_name(uint64_t step) { return "ckpt-" + std::to_string(step) + ".bin"; }

// The steps of the ckpt-<step>.bin files in dir, newest first; removes *.tmp.* leftovers.
std::vector<uint64_t> list_checkpoints(const std::string& dir, bool remove_temporaries) {
    std::vector<uint64_t> steps;
    DIR* d = opendir(dir.c_str());
    if (!d) return steps;
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        unsigned long long step = 0;
        char tail[8] = {0};
        if (n.find(".tmp.") != std::string::npos) {
            if (remove_temporaries) std::remove((dir + "/" + n).c_str());
        } else if (std::sscanf(n.c_str(), "ckpt-%llu.%7s", &step, tail) == 2 && std::strcmp(tail, "bin") == 0 &&
                   n == ckpt_name(step)) {
            steps.push_back(step);
        }
    }
    closedir(d);
    std::sort(steps.rbegin(), steps.rend());
    return steps;
}

// Writes while hashing; remembers the first failure (the write is abandoned at the end).
struct HashWriter {
    FILE* f;
    uint64_t h = kFnvOffset;
    int err = 0;
    void put(const void* p, size_t n) {
        h = fnv1a(h, p, n);
        if (!err && std::fwrite(p, 1, n, f) != n) err = errno ? errno : EIO;
    }
    void u64(uint64_t x) { put(&x, 8); }
};

}  // namespace

// Keeps the checkpoint of `step` and the newest older one; newer ones are from an abandoned
// (bad) future. After a save, and after a resume (a kill between a save and its pruning
// leaves three).
void prune_checkpoints(const std::string& dir, uint64_t step) {
    bool kept_older = false;
    for (uint64_t s : list_checkpoints(dir, false)) {
        if (s == step) continue;
        if (s < step && !kept_older) {
            kept_older = true;
            continue;
        }
        std::remove((dir + "/" + ckpt_name(s)).c_str());
    }
}

void save_checkpoint(const std::string& dir, const CheckpointState& st, size_t ntrain,
                     const std::function<void(const PutFn&)>& write_state) {
    const std::string path = dir + "/" + ckpt_name(st.step), tmp = path + ".tmp." + std::to_string(getpid());
    json meta = {{"step", st.step},         {"data_pos", st.data_pos}, {"trace_bytes", st.trace_bytes},
                 {"trace_t", st.trace_t},   {"wall_s", st.wall_s},     {"last_loss", std::isfinite(st.last_loss) ? json(st.last_loss) : json(nullptr)},
                 {"durations", st.durations}, {"identity", st.identity}, {"trainable", ntrain}};
    const std::string text = meta.dump();
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw Error(path, std::string("cannot write: ") + std::strerror(errno), "a writable checkpoint folder");
    HashWriter w{f};
    w.put(kMagic, 8);
    uint32_t version[2] = {kCheckpointVersion, 0};
    w.put(version, 8);
    w.u64(text.size());
    w.put(text.data(), text.size());
    w.u64(3 * ntrain * sizeof(float));
    uint64_t put = 0;
    write_state([&](const void* p, size_t n) { w.put(p, n), put += n; });
    if (put != 3 * ntrain * sizeof(float)) throw std::logic_error("checkpoint state of " + std::to_string(put) + " bytes");
    uint64_t sum = w.h;
    if (!w.err && std::fwrite(&sum, 1, 8, f) != 8) w.err = errno ? errno : EIO;
    if (w.err) {
        std::fclose(f);
        std::remove(tmp.c_str());
        throw Error(path, std::string("cannot write: ") + std::strerror(w.err), "a writable folder with free space");
    }
    finish_atomic(f, tmp, path);  // removes tmp and throws on failure (a full disk often shows only here)
    prune_checkpoints(dir, st.step);
}


namespace {

// Reads and verifies one checkpoint file; "" on success, else why it is unusable.
std::string read_checkpoint(const std::string& path, CheckpointState& st, std::vector<float>& values, size_t ntrain) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return std::string("cannot open: ") + std::strerror(errno);
    std::vector<unsigned char> buf;
    unsigned char chunk[1 << 16];
    size_t n;
    while ((n = std::fread(chunk, 1, sizeof chunk, f)) > 0) buf.insert(buf.end(), chunk, chunk + n);
    bool read_error = std::ferror(f);
    std::fclose(f);
    if (read_error) return "read error";
    auto u64 = [&](size_t off) {
        uint64_t x;
        std::memcpy(&x, buf.data() + off, 8);
        return x;
    };
    if (buf.size() < 32) return "truncated: " + std::to_string(buf.size()) + " bytes";
    if (std::memcmp(buf.data(), kMagic, 8) != 0) return "bad magic (not an mfbench checkpoint)";
    uint32_t version;
    std::memcpy(&version, buf.data() + 8, 4);
    if (version != kCheckpointVersion) return "format version " + std::to_string(version) + ", this trainer reads " +
                                               std::to_string(kCheckpointVersion);
    const uint64_t text_len = u64(16);
    const uint64_t want_data = 3 * (uint64_t)ntrain * sizeof(float);
    if (text_len > buf.size()) return "truncated: " + std::to_string(buf.size()) + " bytes";
    const uint64_t want = 24 + text_len + 8 + want_data + 8;
    if (buf.size() != want) return (buf.size() < want ? "truncated: " : "trailing bytes: ") + std::to_string(buf.size()) +
                                   " bytes where " + std::to_string(want) + " were written";
    if (fnv1a(kFnvOffset, buf.data(), want - 8) != u64(want - 8)) return "checksum mismatch (the file is corrupted)";
    if (u64(24 + text_len) != want_data) return "holds " + std::to_string(u64(24 + text_len) / 12) + " trainable values per moment, not " +
                                                std::to_string(ntrain);
    json meta;
    try {
        meta = json::parse(buf.begin() + 24, buf.begin() + 24 + text_len);
        st.step = meta.at("step").get<uint64_t>();
        st.data_pos = meta.at("data_pos").get<uint64_t>();
        st.trace_bytes = meta.at("trace_bytes").get<uint64_t>();
        st.trace_t = meta.at("trace_t").get<double>();
        st.wall_s = meta.at("wall_s").get<double>();
        st.last_loss = meta.at("last_loss").is_null() ? NAN : meta.at("last_loss").get<double>();  // null: no loss (NaN)
        st.durations = meta.at("durations").get<std::vector<double>>();
        st.identity = meta.at("identity");
    } catch (const json::exception& e) {
        return std::string("bad header: ") + e.what();
    }
    values.resize(3 * ntrain);
    std::memcpy(values.data(), buf.data() + 24 + text_len + 8, want_data);
    return "";
}

// "steps 30 in the checkpoint, 20 now" for the first option that differs.
std::string identity_difference(const json& saved, const json& now) {
    for (auto it = now.begin(); it != now.end(); ++it) {
        json was = saved.contains(it.key()) ? saved[it.key()] : json();
        if (was != it.value()) return it.key() + " " + was.dump() + " in the checkpoint, " + it.value().dump() + " now";
    }
    return "other options";
}

}  // namespace

bool load_checkpoint(const std::string& dir, CheckpointState& st, size_t ntrain,
                     const std::function<void(const float*)>& read_state) {
    std::vector<uint64_t> steps = list_checkpoints(dir, true);
    if (steps.empty()) return false;
    std::vector<std::string> bad;  // "path: why" of each newer checkpoint that failed
    std::string first_bad;
    for (uint64_t step : steps) {
        const std::string path = dir + "/" + ckpt_name(step);
        CheckpointState got;
        std::vector<float> values;
        std::string why = read_checkpoint(path, got, values, ntrain);
        if (why.empty() && got.identity != st.identity)
            throw Error(path, "written by a run with other options: " + identity_difference(got.identity, st.identity),
                        "the options of the checkpointed run");
        if (why.empty() && got.step != step) why = "holds step " + std::to_string(got.step);
        if (!why.empty()) {
            if (first_bad.empty()) first_bad = path;
            bad.push_back((bad.empty() ? "" : path + ": ") + why);
            continue;
        }
        for (const std::string& b : bad)
            std::fprintf(stderr, "mfbench-train: warning: %s; resuming from the previous checkpoint %s\n",
                         (b == bad[0] ? first_bad + ": " + b : b).c_str(), path.c_str());
        got.identity = st.identity;
        st = got;
        prune_checkpoints(dir, step);
        read_state(values.data());
        return true;
    }
    std::string all = bad[0];
    for (size_t i = 1; i < bad.size(); i++) all += "; older " + bad[i];
    throw Error(first_bad, all + "; no checkpoint verifies",
                "a checkpoint written by mfbench-train (or remove " + dir + " to start over)");
}

namespace {

volatile std::sig_atomic_t g_signal = 0;  // the signal number that asked for a stop

extern "C" void on_stop_signal(int sig) { g_signal = sig; }  // async-signal-safe: one store

}  // namespace

bool stop_requested(std::string& reason) {
    if (int sig = g_signal) {
        reason = sig == SIGTERM ? "signal SIGTERM" : sig == SIGINT ? "signal SIGINT" : "signal " + std::to_string(sig);
        return true;
    }
    return false;
}

void install_stop_signals() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // a blocking read or write continues; the loop checks the flag after each step
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
}

}  // namespace mfb

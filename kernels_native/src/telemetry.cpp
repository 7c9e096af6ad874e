#include "telemetry.h"

#include <dirent.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "common.h"

namespace mfb {

using json = nlohmann::json;

namespace {

opt_double read_number(const std::string& path) {
    auto s = read_line(path);
    if (!s || s->empty()) return std::nullopt;
    char* end = nullptr;
    double v = std::strtod(s->c_str(), &end);
    if (*end || !std::isfinite(v)) return std::nullopt;
    return v;
}

// Entries of a folder whose names start with `prefix`, sorted (numerically by their tail
// when it is a number, so thermal_zone10 follows thermal_zone9).
std::vector<std::string> list_dir(const std::string& dir, const std::string& prefix) {
    std::vector<std::string> out;
    if (DIR* d = opendir(dir.c_str())) {
        while (dirent* e = readdir(d)) {
            std::string n = e->d_name;
            if (n != "." && n != ".." && n.rfind(prefix, 0) == 0) out.push_back(n);
        }
        closedir(d);
    }
    auto key = [&](const std::string& n) {
        std::string tail = n.substr(prefix.size());
        bool num = !tail.empty() && std::all_of(tail.begin(), tail.end(), ::isdigit);
        return std::make_pair(num ? std::stol(tail) : -1L, n);
    };
    std::sort(out.begin(), out.end(), [&](const std::string& a, const std::string& b) { return key(a) < key(b); });
    return out;
}

size_t status_kb(const char* path, const char* key) {
    size_t kb = 0;
    if (FILE* f = std::fopen(path, "r")) {
        char line[256];
        size_t n = std::strlen(key);
        while (std::fgets(line, sizeof line, f))
            if (std::strncmp(line, key, n) == 0) {
                kb = std::strtoull(line + n, nullptr, 10);
                break;
            }
        std::fclose(f);
    }
    return kb;
}

// The CPU a thread last ran on: field 39 of /proc/self/task/TID/stat (fields after the
// command name, which may hold spaces, start at field 3).
int thread_cpu(pid_t tid) {
    auto s = read_line("/proc/self/task/" + std::to_string(tid) + "/stat");
    if (!s) return -1;
    size_t close = s->rfind(')');
    if (close == std::string::npos) return -1;
    std::istringstream in(s->substr(close + 1));
    std::string field;
    for (int i = 3; i <= 39 && (in >> field); i++)
        if (i == 39) return std::atoi(field.c_str());
    return -1;
}

std::string cluster_name(const std::vector<int>& cpus) {
    bool contiguous = cpus.back() - cpus.front() + 1 == (int)cpus.size();
    if (cpus.size() == 1) return "cpu" + std::to_string(cpus[0]);
    if (contiguous) return "cpu" + std::to_string(cpus.front()) + "-" + std::to_string(cpus.back());
    std::string s = "cpu";
    for (size_t i = 0; i < cpus.size(); i++) s += (i ? "," : "") + std::to_string(cpus[i]);
    return s;
}

}  // namespace

json opt_json(const opt_double& v) { return v ? json(*v) : json(nullptr); }

std::optional<std::string> read_line(const std::string& path) {
    std::ifstream f(path);
    std::string s;
    if (!f || !std::getline(f, s)) return std::nullopt;
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) s.pop_back();
    return s;
}

std::string sysfs_root(const std::string& flag) {
    if (!flag.empty()) return flag;
    const char* env = std::getenv("MFBENCH_SYSFS_ROOT");
    return env ? env : "";
}

Telemetry::Telemetry(std::string root, double t_start) : root_(std::move(root)), t_start_(t_start), last_t_(0) {
    // The battery: the first power_supply of type Battery that reports a capacity (phones
    // also list USB, wireless and charge-pump supplies, and sometimes a second "Battery"
    // node of the fuel gauge that only some drivers fill in).
    const std::string ps = root_ + "/sys/class/power_supply";
    for (const std::string& n : list_dir(ps, "")) {
        if (read_line(ps + "/" + n + "/type").value_or("") == "Battery" && read_number(ps + "/" + n + "/capacity")) {
            battery_ = ps + "/" + n;
            break;
        }
    }
    const std::string th = root_ + "/sys/class/thermal";
    for (const std::string& n : list_dir(th, "thermal_zone")) zones_.push_back(th + "/" + n);

    // Clusters: the CPUs this process may use, grouped by cpuinfo_max_freq (one cluster per
    // distinct maximum, slowest first); without cpufreq, one cluster of them all.
    cpu_set_t set;
    CPU_ZERO(&set);
    std::vector<int> usable;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        for (int c = 0; c < CPU_SETSIZE; c++)
            if (CPU_ISSET(c, &set)) usable.push_back(c);
    }
    if (usable.empty()) usable.push_back(0);
    std::map<double, std::vector<int>> by_freq;
    for (int c : usable)
        if (auto f = read_number(root_ + "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/cpufreq/cpuinfo_max_freq"))
            by_freq[*f].push_back(c);
    if (by_freq.empty()) by_freq[0] = usable;
    for (auto& kv : by_freq) clusters_.push_back({cluster_name(kv.second), kv.second});
    cluster_ = (int)clusters_.size() - 1;  // unpinned threads may run on the fastest cores
}

void Telemetry::set_workers(std::vector<pid_t> tids, int cluster) {
    std::lock_guard<std::mutex> lk(mu_);
    workers_ = std::move(tids);
    cluster_ = cluster;
}

Reading Telemetry::read() {
    Reading r;
    r.rss = (size_t)status_kb("/proc/self/status", "VmRSS:") * 1024;
    r.peak_rss = (size_t)status_kb("/proc/self/status", "VmHWM:") * 1024;
    {
        // PSS walks every page table of the process (~10 ms of CPU at 500 MB, more with the
        // training thread waiting on the same lock): read at most once a second, or 20 samples
        // a second would take a quarter of a core from training; samples between carry it.
        std::lock_guard<std::mutex> lk(pss_mu_);
        const double now = now_s();
        if (!pss_read_ || now - pss_t_ >= kPssEvery) {
            if (FILE* f = std::fopen("/proc/self/smaps_rollup", "r")) {  // Linux 4.14+
                std::fclose(f);
                pss_ = status_kb("/proc/self/smaps_rollup", "Pss:") * 1024;
            }
            pss_read_ = true, pss_t_ = now;
        }
        r.pss = pss_;
    }
    if (!battery_.empty()) {
        // Units of the kernel's power_supply class: capacity %, current_now µA, voltage_now
        // µV, temp tenths of °C. Some phones report voltage in mV: a battery is 2.5-5 V, so
        // a value under 100000 cannot be µV.
        r.battery_pct = read_number(battery_ + "/capacity");
        if (auto v = read_number(battery_ + "/voltage_now")) r.voltage_v = *v < 1e5 ? *v / 1e3 : *v / 1e6;
        if (auto t = read_number(battery_ + "/temp")) r.temperature_c = *t / 10;
        auto status = read_line(battery_ + "/status");
        if (status) r.charging = *status == "Charging" || *status == "Full";
        // Drivers disagree on the sign of current_now, so the status sets it: + discharging.
        if (auto i = read_number(battery_ + "/current_now"))
            r.current_a = (r.charging.value_or(false) ? -1 : 1) * std::fabs(*i) / 1e6;
    }
    for (const std::string& z : zones_) {
        auto t = read_number(z + "/temp");
        if (!t) continue;
        // millidegrees by the kernel's ABI; a few vendor zones report whole degrees
        double c = std::fabs(*t) >= 1000 ? *t / 1000 : *t;
        r.zones.push_back({read_line(z + "/type").value_or(""), c});
    }
    if (!r.temperature_c && !r.zones.empty()) {
        double hottest = r.zones[0].second;
        for (auto& z : r.zones) hottest = std::max(hottest, z.second);
        r.temperature_c = hottest;
    }
    for (const Cluster& c : clusters_) {
        auto f = read_number(root_ + "/sys/devices/system/cpu/cpu" + std::to_string(c.cpus[0]) + "/cpufreq/scaling_cur_freq");
        r.freq_mhz.push_back(f ? opt_double(*f / 1000) : std::nullopt);  // kHz
    }

    std::lock_guard<std::mutex> lk(mu_);
    r.t = now_s() - t_start_;
    for (pid_t tid : workers_) r.cpus.push_back(thread_cpu(tid));
    opt_double power;
    if (r.voltage_v && r.current_a) power = *r.voltage_v * *r.current_a;
    if (power && last_power_w_ && r.t > last_t_) {  // trapezoid between readings that both have power
        energy_ += 0.5 * (*power + *last_power_w_) * (r.t - last_t_);
        energy_seen_ = true;
    }
    if (power) r.energy_j = energy_;
    last_power_w_ = power;
    last_t_ = r.t;
    if (r.battery_pct) {
        if (!battery_start_) battery_start_ = r.battery_pct;
        battery_end_ = r.battery_pct;
    }
    if (r.temperature_c) max_temp_ = std::max(max_temp_.value_or(*r.temperature_c), *r.temperature_c);
    return r;
}

json Telemetry::sample(const Reading& r) const {
    json zones = nullptr, freqs = nullptr, cpus = nullptr;
    if (!zones_.empty()) {
        zones = json::array();
        for (auto& z : r.zones) zones.push_back({{"type", z.first}, {"c", z.second}});
    }
    bool any_freq = false;
    json f = json::object();
    for (size_t i = 0; i < clusters_.size(); i++) {
        f[clusters_[i].name] = opt_json(r.freq_mhz[i]);
        any_freq = any_freq || r.freq_mhz[i];
    }
    if (any_freq) freqs = f;
    if (!r.cpus.empty()) cpus = r.cpus;
    return {{"type", "sample"},
            {"t", r.t},
            {"rss", r.rss},
            {"battery", opt_json(r.battery_pct)},
            {"current", opt_json(r.current_a)},
            {"voltage", opt_json(r.voltage_v)},
            {"temperature", opt_json(r.temperature_c)},
            {"frequency", opt_json(r.freq_mhz[cluster_.load()])},
            {"peak_rss", r.peak_rss},
            {"pss", r.pss ? json(*r.pss) : json(nullptr)},
            {"charging", r.charging ? json(*r.charging) : json(nullptr)},
            {"zones", zones},
            {"frequencies", freqs},
            {"cpus", cpus}};
}

opt_double Telemetry::energy_j() const {
    std::lock_guard<std::mutex> lk(mu_);
    return energy_seen_ ? opt_double(energy_) : std::nullopt;
}
opt_double Telemetry::battery_start() const {
    std::lock_guard<std::mutex> lk(mu_);
    return battery_start_;
}
opt_double Telemetry::battery_end() const {
    std::lock_guard<std::mutex> lk(mu_);
    return battery_end_;
}
opt_double Telemetry::max_temperature() const {
    std::lock_guard<std::mutex> lk(mu_);
    return max_temp_;
}

void Sampler::start(Telemetry& tel, int ms, std::function<void(const json&)> sink) {
    tel_ = &tel, sink_ = std::move(sink);
    sink_(tel_->sample(tel_->read()));
    th_ = std::thread([this, ms] {
        std::unique_lock<std::mutex> lk(mu_);
        while (!cv_.wait_for(lk, std::chrono::milliseconds(ms), [this] { return stopping_.load(); }))
            sink_(tel_->sample(tel_->read()));
    });
}

void Sampler::stop() {
    if (!th_.joinable()) return;
    {
        std::lock_guard<std::mutex> lk(mu_);
        stopping_ = true;
    }
    cv_.notify_all();
    th_.join();
    sink_(tel_->sample(tel_->read()));
}

}  // namespace mfb

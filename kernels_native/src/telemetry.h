// Telemetry: memory, battery, thermal zones, CPU frequency and the CPU of each worker
// thread, read from sysfs and /proc. Sensors are read under a root prefix (--sysfs-root or
// MFBENCH_SYSFS_ROOT; "" is the real /) so tests can replay a recorded phone's tree; the
// process's own /proc/self is always the real one. A sensor that does not exist is absent
// (std::nullopt, null in JSON), never invented.
#pragma once
#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace mfb {

using opt_double = std::optional<double>;
nlohmann::json opt_json(const opt_double& v);  // null when absent (a sensor that does not exist)

struct Cluster {
    std::string name;       // "cpu0-3": its CPUs
    std::vector<int> cpus;  // usable by this process
};

struct Reading {
    double t = 0;  // seconds since the run started
    size_t rss = 0, peak_rss = 0;
    std::optional<size_t> pss;
    opt_double battery_pct, current_a, voltage_v;  // current: + discharging
    opt_double temperature_c;                      // the battery's, else the hottest thermal zone
    std::optional<bool> charging;                  // from the battery's status
    std::vector<std::pair<std::string, double>> zones;  // (type, °C) per thermal zone, in zone order
    std::vector<opt_double> freq_mhz;                    // per cluster
    std::vector<int> cpus;                               // CPU each worker thread last ran on
    opt_double energy_j;  // energy integrated up to this reading (needs voltage and current)
};

// The root prefix: the flag when given, else $MFBENCH_SYSFS_ROOT, else "".
std::string sysfs_root(const std::string& flag);

// The first line of a small sysfs file, trimmed; nullopt when it cannot be read.
std::optional<std::string> read_line(const std::string& path);

class Telemetry {
public:
    Telemetry(std::string root, double t_start);
    const std::vector<Cluster>& clusters() const { return clusters_; }
    // Reads every sensor now and integrates energy; safe from any thread.
    Reading read();
    // The trace's `sample` event of a reading (docs/contracts.md section 3).
    nlohmann::json sample(const Reading& r) const;
    // Worker thread ids (OpenMP team order) and the cluster in use, for samples.
    void set_workers(std::vector<pid_t> tids, int cluster);
    int cluster() const { return cluster_.load(); }
    bool has_battery() const { return !battery_.empty(); }

    // Summary values (std::nullopt when no sensor measured them).
    opt_double energy_j() const;
    opt_double battery_start() const, battery_end() const, max_temperature() const;

private:
    std::string root_;
    double t_start_;
    std::string battery_;  // the battery's power_supply folder, "" if none
    std::vector<std::string> zones_;  // thermal_zone folders
    std::vector<Cluster> clusters_;
    std::atomic<int> cluster_{0};
    static constexpr double kPssEvery = 1.0;  // seconds between reads of /proc/self/smaps_rollup
    std::mutex pss_mu_;
    std::optional<size_t> pss_;
    bool pss_read_ = false;
    double pss_t_ = 0;
    mutable std::mutex mu_;  // guards everything below
    std::vector<pid_t> workers_;
    opt_double last_power_w_;
    double last_t_ = 0, energy_ = 0;
    bool energy_seen_ = false;
    opt_double battery_start_, battery_end_, max_temp_;
};

// Telemetry samples (their `sample` events) handed to `sink` every `ms` milliseconds on a
// thread of its own until stop(); one at the start and one at the stop on the caller's
// thread, so even a short run has both. The sink is never called from two threads at once.
class Sampler {
public:
    void start(Telemetry& tel, int ms, std::function<void(const nlohmann::json&)> sink);
    void stop();
    ~Sampler() { stop(); }

private:
    Telemetry* tel_ = nullptr;
    std::function<void(const nlohmann::json&)> sink_;
    std::atomic<bool> stopping_{false};
    std::mutex mu_;
    std::condition_variable cv_;
    std::thread th_;
};

}  // namespace mfb

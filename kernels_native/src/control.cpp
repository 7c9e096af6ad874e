#include "control.h"

#include <omp.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <thread>

#include "common.h"
#include "gemm.h"

namespace mfb {

using json = nlohmann::json;

static const double kMaxPauseS = 3600;  // as the simulator: a longer pause ends the run

Scheduler::Scheduler(Telemetry& tel, SchedulerOptions o, std::function<void(const json&)> trace)
    : tel_(tel), o_(std::move(o)), trace_(std::move(trace)), threads_(o_.threads), cluster_(tel.cluster()) {
    // With a controller, threads start on the fastest cluster (what an observation says is in
    // use); without one they stay where the OS puts them.
    apply(cluster_, threads_, o_.control);
}

const std::string& Scheduler::cluster() const { return tel_.clusters()[cluster_].name; }

// Sets the OpenMP thread count and, when pinning, each team thread's CPU affinity to the
// cluster's CPUs (libgomp keeps its threads, so later regions run on these pinned threads;
// a larger team later is created by a pinned thread and inherits its mask, then pinned
// again here). Records the team's thread ids for the samples' `cpus`.
void Scheduler::apply(int cluster, int threads, bool pin) {
    set_threads(threads);
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int c : tel_.clusters()[cluster].cpus) CPU_SET(c, &set);
    std::vector<pid_t> tids(threads, 0);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : failed)
    {
        tids[omp_get_thread_num()] = (pid_t)syscall(SYS_gettid);
        if (pin && sched_setaffinity(0, sizeof set, &set) != 0) failed++;
    }
    if (failed) throw Error("", "cannot pin threads to cluster " + tel_.clusters()[cluster].name, "a cluster this process may run on");
    threads_ = threads, cluster_ = cluster;
    tel_.set_workers(tids, cluster);
}

json Scheduler::ask(int step, const Reading& r) {
    if (!o_.control) return json::object();
    json clusters = json::object();
    for (const Cluster& c : tel_.clusters()) clusters[c.name] = (int)c.cpus.size();
    json obs = {{"step", step},
                {"t", r.t},
                {"battery_pct", opt_json(r.battery_pct)},
                {"temperature_c", opt_json(r.temperature_c)},
                // mains powered (no battery) counts as charging, as in the simulator
                {"charging", tel_.has_battery() ? r.charging.value_or(false) : true},
                {"last_step_s", last_step_s_},
                {"power_w", power_w_},
                {"threads", threads_},
                {"cluster", cluster()},
                {"clusters", clusters}};
    std::cout << obs.dump() << "\n" << std::flush;
    const std::string where = "control: decision for step " + std::to_string(step);
    const char* protocol = "one JSON line per observation: {} or keys sleep_s, pause, threads, cluster (docs/contracts.md)";
    std::string line;
    if (!std::getline(std::cin, line)) throw Error("", where + ": the controller closed stdin", protocol);
    json d;
    try {
        d = json::parse(line);
    } catch (const json::exception&) {
        throw Error("", where + " is not JSON: " + line.substr(0, 200), protocol);
    }
    if (d.is_null()) d = json::object();
    if (!d.is_object()) throw Error("", where + " is " + d.dump(), protocol);
    for (auto it = d.begin(); it != d.end(); ++it) {
        const std::string& k = it.key();
        const json& v = it.value();
        auto bad = [&](const std::string& expected) { throw Error("", where + ": " + k + " = " + v.dump(), expected); };
        if (k == "sleep_s") {
            if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < 0) bad("seconds, a finite number >= 0");
        } else if (k == "pause") {
            if (!v.is_boolean()) bad("true or false");
        } else if (k == "threads") {
            if (!v.is_number_integer() || v.get<long long>() <= 0) bad("a positive integer");
            if (v.get<long long>() > o_.capacity)
                bad("at most the plan's " + std::to_string(o_.capacity) + " threads (per-thread scratch is sized for them; raise the run's threads)");
        } else if (k == "cluster") {
            if (!v.is_string() || !clusters.contains(v.get<std::string>())) {
                std::string names;
                for (auto c = clusters.begin(); c != clusters.end(); ++c) names += (names.empty() ? "" : ", ") + c.key();
                bad("a cluster of this device: " + names);
            }
        } else {
            throw Error("", where + ": unknown key '" + k + "'", protocol);
        }
    }
    return d;
}

bool Scheduler::before_step(int step) {
    if (!o_.control) return true;  // no controller: nothing to ask, no sensors to read
    double paused = 0;
    for (;;) {
        Reading r = tel_.read();
        json d = ask(step, r);
        if (d != last_decision_ && !d.empty())  // record changes, not every repeat (as the simulator)
            trace_({{"type", "decision"}, {"t", r.t}, {"policy", o_.policy}, {"choice", d}});
        last_decision_ = d;
        if (!d.value("pause", false)) {
            if (double s = d.value("sleep_s", 0.0); s > 0) {
                if (!wait(s)) return false;
                r = tel_.read();  // the step starts after the sleep
            }
            int cluster = cluster_;
            if (d.contains("cluster"))
                for (size_t i = 0; i < tel_.clusters().size(); i++)
                    if (tel_.clusters()[i].name == d["cluster"]) cluster = (int)i;
            int threads = d.value("threads", threads_);
            if (cluster != cluster_ || threads != threads_) apply(cluster, threads, o_.control);
            start_ = r;
            return true;
        }
        if (paused == 0 && on_pause) on_pause();
        if (paused >= kMaxPauseS) {
            stop_reason = "paused by the scheduler for " + std::to_string((int)std::lround(paused / 60)) + " min";
            return false;
        }
        if (!wait(o_.pause_poll_s)) return false;
        paused += o_.pause_poll_s;
    }
}

// Sleeps `seconds` in short slices; false as soon as should_stop() says so (a signal must
// not wait for a long pause to end).
bool Scheduler::wait(double seconds) {
    using clock = std::chrono::steady_clock;
    const clock::time_point end = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
    while (clock::now() < end) {
        if (should_stop && should_stop()) return false;
        std::this_thread::sleep_until(std::min(end, clock::time_point(clock::now() + std::chrono::milliseconds(50))));
    }
    return !(should_stop && should_stop());
}

void Scheduler::step_done(double duration) {
    if (!o_.control) return;
    Reading end = tel_.read();
    last_step_s_ = duration;
    power_w_ = nullptr;
    if (start_.energy_j && end.energy_j && end.t > start_.t) power_w_ = (*end.energy_j - *start_.energy_j) / (end.t - start_.t);
}

}  // namespace mfb

// Scheduling in the trainer: before every optimizer step, an observation built from
// telemetry (the keys of mfbench/contracts/policy.py) goes to the controller and its
// decision (sleep_s, pause, threads, cluster) is applied. With --control stdio the
// controller is the process at the other end of stdin/stdout (mfbench run drives any Python
// scheduling policy this way, the same object the simulator calls); without it every
// decision is {} and the run trains flat out.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "telemetry.h"

namespace mfb {

struct SchedulerOptions {
    bool control = false;         // --control stdio
    std::string policy = "none";  // the name decision events carry
    double pause_poll_s = 10;     // a paused run asks again after this long
    int capacity = 1;             // the plan's threads: per-thread scratch is sized for them
    int threads = 1;              // threads at the start
};

class Scheduler {
public:
    Scheduler(Telemetry& tel, SchedulerOptions o, std::function<void(const nlohmann::json&)> trace);
    // Observe, decide, pause or sleep, apply threads and cluster. False: the run ends
    // (stop_reason says why).
    bool before_step(int step);
    // After the compute of a step (for last_step_s and power_w of the next observation).
    void step_done(double duration);

    int threads() const { return threads_; }
    const std::string& cluster() const;
    std::string stop_reason;
    std::function<void()> on_pause;
    std::function<bool()> should_stop;  // true: stop now (a signal), even in a sleep or a pause  // once when a pause begins: the trainer checkpoints (a paused phone may be killed)

private:
    nlohmann::json ask(int step, const Reading& r);
    void apply(int cluster, int threads, bool pin);
    bool wait(double seconds);

    Telemetry& tel_;
    SchedulerOptions o_;
    std::function<void(const nlohmann::json&)> trace_;
    int threads_, cluster_;
    nlohmann::json last_decision_ = nlohmann::json::object();
    nlohmann::json last_step_s_ = nullptr, power_w_ = nullptr;
    Reading start_;
};

}  // namespace mfb

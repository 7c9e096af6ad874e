// Parameter sharding to flash and optimizer-state / gradient offload (docs/native.md,
// "Sharding and offload"). plan_shard_io inserts the io ops of a sharded step into the plan
// (the same rule as mfbench/plan/shards.py); Shards runs them: each sharded buffer (a
// shard's parameters, its gradients when offloaded) is its own page-aligned arena with its
// backing file mapped over it (map_file below), so the Model's pointers never move and a
// load copies nothing. `lru` runs each io op where the program has it;
// `prefetch` hands them to an I/O thread in program order, and an op waits only for the
// parts it needs.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "plan.h"

namespace mfb {

struct TrainSegment;
struct AdamW;

// scratch.moments holds 2 x this many values (compile.py MOMENT_CHUNK): the update's working
// set for offloaded moments, a chunk of m and of v (and of new parameters) at a time.
constexpr size_t kMomentChunk = (size_t)1 << 20;

// How a shard's part uses its file: the file mapped over [p, p + span), private (a load
// maps the page cache's pages, no copy; writing copies a page and never reaches the file);
// mapping it again drops the copies and every page from this process's RSS (an evict). A
// private mapping's pages are never write-protected when the kernel writes the file back,
// so that costs the compute threads nothing (a shared one's would: a TLB shootdown a page).
// A store is a pwrite (gradients from RAM; parameters and moments from the update's output).
void map_file(void* p, size_t span, int fd, const std::string& path);
// Maps the pages of [p, p + n) of a file mapping in one call (madvise POPULATE_READ): from the
// page cache, or read from flash when the kernel has dropped them. A shard's load.
void populate(const void* p, size_t n);
// Zero pages over [p, p + span) (page-aligned), resident: anonymous, mapped over the part's
// file mapping until its evict maps the file again, faulted in by `workers` threads. An
// offloaded gradient's zero.
void zero_pages(void* p, size_t span, int workers);

// Inserts the io ops of plan.opt's sharding and offload into plan.ops. Throws Error when the
// budget is below what one op needs resident.
void plan_shard_io(Plan& plan);

class Shards {
public:
    // parts: each sharded buffer's memory (name -> pointer); files go into `dir`, made and
    // preallocated here (Error when it cannot be written or has no room).
    Shards(const Plan& plan, const std::function<float*(const std::string&)>& buffer, const std::string& dir, bool prefetch);
    ~Shards();
    Shards(const Shards&) = delete;
    Shards& operator=(const Shards&) = delete;

    // Before the ops of `owner` ("embed", "block3", "head", "update.block3") in `phase`:
    // issues the io ops up to the first of them, then waits until what it needs is loaded.
    void enter(const std::string& owner, const std::string& phase);
    // The step's last io (every part stored and evicted); returns when all of it is done.
    void finish_step();
    // The initial parameters of a shard, as the Model wrote them: to its file, then evicted.
    void write_initial(const std::string& shard);
    // A shard's parameters resident alone (for saving after training); "" drops it.
    void hold(const std::string& shard);

    // The values of a parameter range [p, p + n) (a pointer into a params arena) in its file:
    // read into buf, or written from it.
    void params(const float* p, float* buf, size_t n, bool write);
    // Offloaded moments: [first, first + n) of shard's m (which 0) or v (1) in its file.
    void moments(const std::string& shard, int which, size_t first, float* buf, size_t n, bool write);
    // AdamW over shard `shard` (the same arithmetic as AdamW::update) when its parameters are
    // on flash or its moments offloaded: parameters and gradients are read through their
    // mappings, offloaded moments read (pread) into `scratch` (2 x kMomentChunk floats, the
    // plan's scratch.moments; null without offloaded moments), and the new values written to
    // the files (pwrite) from scratch or from over the gradient, each thread its own slice.
    void update(const AdamW& opt, std::vector<TrainSegment>& segs, const std::string& shard, int t_step, float lr,
                float gscale, float* scratch, size_t scratch_elements);

    // When gradients are offloaded: called with a shard as soon as its gradient is final
    // (before anything evicts it), for the clipping norm.
    std::function<void(const std::string&)> on_grads_final;
    // One trace event per io op ({"type": "io", ...}) while true.
    std::function<void(const nlohmann::json&)> on_io;
    bool trace_io = false;
    double t0 = 0;  // the trace's clock origin
    size_t read_bytes = 0, write_bytes = 0;
    const std::string dir;

private:
    struct Part {
        std::string name, shard;
        char* ptr = nullptr;
        size_t bytes = 0, span = 0;  // the arena image (with tensor padding), and its page-rounded length
        int fd = -1;
        bool ready = false;  // loaded (guarded by mu_)
    };
    struct Moments {
        std::string shard;
        size_t n = 0;
        int fd = -1;
    };
    int part_index(const std::string& name) const;
    // The part's file mapped over it again: its pages and any copies dropped (map_file).
    void remap(const Part& p) const;
    void transfer(int fd, const std::string& path, float* buf, size_t bytes, size_t off, bool write);
    void run(const PlanOp& op);  // one io op (the I/O thread's, or inline)
    void issue(const PlanOp& op);
    void wait_ready(const std::vector<int>& parts);
    void check_error();
    void io_thread();

    const Plan& plan_;
    const bool prefetch_;
    std::vector<Part> parts_;
    std::vector<Moments> moments_;
    std::vector<std::vector<int>> needs_;  // per op of the plan: the parts it needs
    std::vector<std::string> final_grads_;  // per op: the shard whose gradient is final after it ("")
    size_t cursor_ = 0;
    int held_ = -1;

    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<const PlanOp*> queue_;
    bool busy_ = false, stop_ = false;
    std::string error_;
    std::thread thread_;
};

// The state a checkpoint holds (the trainable values in order, then m, then v: 3 x ntrain
// floats), put in pieces (save) or taken from `values` (load): from RAM, or, for the
// parameters of a sharded Full-FT run (params_on_flash) and offloaded moments (m null), from
// and into `shards`' files, which hold them between steps.
void checkpoint_state(bool save, std::vector<TrainSegment>& segs, Shards* shards, bool params_on_flash, float* m, float* v,
                      size_t ntrain, const std::function<void(const void*, size_t)>& put, const float* values);

}  // namespace mfb

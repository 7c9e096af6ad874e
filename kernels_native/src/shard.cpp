#include "shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <omp.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <set>

#include "checkpoint.h"
#include "common.h"
#include "optimizer.h"

namespace mfb {

namespace {

const double kMB = 1048576.0;

std::string shard_of(const std::string& part) { return part.substr(part.find('.') + 1); }

// "block3" of "mb0.block3.ln_1"; an update op is its own owner ("update.block3")
std::string owner_of(const PlanOp& op) {
    if (op.micro_batch < 0) return op.name;
    size_t a = op.name.find('.'), b = op.name.find('.', a + 1);
    return op.name.substr(a + 1, b - a - 1);
}

// The parts an op needs resident (mfbench/plan/shards.py `needs`).
std::vector<std::string> needs(const PlanOp& op, bool grads) {
    if (op.shard.empty() || op.phase == "io") return {};
    std::vector<std::string> out = {"params." + op.shard};
    if (grads && (op.phase == "backward" || op.phase == "update" || owner_of(op) == "head")) out.push_back("grads." + op.shard);
    return out;
}

}  // namespace

// The same walk as mfbench/plan/shards.py plan_io; read that first.
void plan_shard_io(Plan& plan) {
    const PlanOptions& o = plan.opt;
    const bool grads = o.offload_gradients;
    std::map<std::string, size_t> size;
    for (const PlanBuffer& b : plan.buffers)
        if (b.lifetime == Lifetime::Sharded) size[b.name] = b.bytes();
    std::map<std::string, size_t> moments;  // AdamW's m and v of a shard, offloaded
    if (o.offload_optimizer)
        for (const PlanBuffer& b : plan.buffers)
            if (b.name.rfind("params.", 0) == 0) moments[b.shard] = 2 * 4 * b.elements;
    const std::vector<PlanOp> ops = plan.ops;
    std::vector<std::vector<std::string>> wants;
    size_t largest = 0;
    for (const PlanOp& op : ops) {
        wants.push_back(needs(op, grads));
        size_t n = 0;
        for (const auto& p : wants.back()) n += size[p];
        largest = std::max(largest, n);
    }
    const long long budget = o.budget_bytes;
    if (budget >= 0 && (long long)largest > budget) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "memory.sharding.budget_mb %g MB is below the largest shard", budget / kMB);
        char want[120];
        std::snprintf(want, sizeof want, largest >= kMB ? "at least %.1f MB (what one op needs resident)"
                                                        : "at least %.3g MB (what one op needs resident)", largest / kMB);
        throw Error(o.targets_file, msg, want);
    }
    std::vector<PlanOp> out;
    auto moment_op = [&](const PlanOp& op, const char* kind) {
        if (moments.empty() || op.phase != "update" || op.shard.empty()) return;
        PlanOp io;
        io.name = std::string("io.") + kind + ".optimizer." + op.shard;
        io.kind = kind, io.phase = "io", io.shard = op.shard, io.micro_batch = op.micro_batch;
        io.io_bytes = moments[op.shard];
        out.push_back(io);
    };
    if (budget < 0) {
        for (const PlanOp& op : ops) {
            moment_op(op, "load");
            out.push_back(op);
            moment_op(op, "store");
        }
        plan.ops = out;
        return;
    }
    std::vector<std::pair<std::string, bool>> resident;  // part, dirty; least recently used first
    std::set<std::string> stored;
    size_t held = 0;
    auto find = [&](const std::string& p) {
        return std::find_if(resident.begin(), resident.end(), [&](const auto& r) { return r.first == p; });
    };
    auto io = [&](const char* kind, const std::string& part, int m, size_t bytes) {
        PlanOp op;
        op.name = std::string("io.") + kind + "." + part;
        op.kind = kind, op.phase = "io", op.shard = shard_of(part), op.micro_batch = m, op.io_bytes = bytes;
        if (op.kind == "load" || op.kind == "zero") op.alloc = {part};
        if (op.kind == "evict") op.free = {part};
        out.push_back(op);
    };
    auto evict = [&](const std::string part, int m) {  // a copy: erasing it from `resident` must not change it
        auto it = find(part);
        if (it->second) {
            io("store", part, m, size[part]);
            stored.insert(part);
        }
        resident.erase(it);
        io("evict", part, m, 0);
        held -= size[part];
    };
    auto make_room = [&](const std::string& part, const std::set<std::string>& keep, int m) {
        std::vector<std::string> chosen;
        size_t room = held;
        while ((long long)(room + size[part]) > budget) {
            std::string victim;  // least recently used, not kept, not chosen
            for (const auto& r : resident)
                if (!keep.count(r.first) && std::find(chosen.begin(), chosen.end(), r.first) == chosen.end()) {
                    victim = r.first;
                    break;
                }
            if (victim.empty()) return false;
            chosen.push_back(victim);
            room -= size[victim];
        }
        for (const auto& v : chosen) evict(v, m);
        return true;
    };
    auto bring = [&](const std::string& part, int m) {
        const bool fresh = part.rfind("grads.", 0) == 0 && !stored.count(part);  // first use this step: zeros
        io(fresh ? "zero" : "load", part, m, fresh ? 0 : size[part]);
        resident.push_back({part, false});
        held += size[part];
    };
    // after op i, the next `ahead` parts later ops need that op i does not
    std::vector<std::vector<std::string>> upcoming(ops.size());
    for (size_t i = 0; i < ops.size(); i++) {
        auto& nxt = upcoming[i];
        for (size_t j = i + 1; j < ops.size() && (int)nxt.size() < o.ahead; j++)
            for (const auto& p : wants[j])
                if ((int)nxt.size() < o.ahead && std::find(wants[i].begin(), wants[i].end(), p) == wants[i].end() &&
                    std::find(nxt.begin(), nxt.end(), p) == nxt.end())
                    nxt.push_back(p);
    }
    for (size_t i = 0; i < ops.size(); i++) {
        const PlanOp& op = ops[i];
        const auto& want = wants[i];
        const std::set<std::string> keep(want.begin(), want.end());
        for (const auto& part : want) {
            auto it = find(part);
            if (it != resident.end()) {
                auto r = *it;
                resident.erase(it);
                resident.push_back(r);
            } else if (make_room(part, keep, op.micro_batch)) {
                bring(part, op.micro_batch);
            } else {
                throw std::logic_error("shard plan: nothing to evict for " + part);
            }
        }
        std::set<std::string> ahead = keep;
        for (const auto& part : upcoming[i]) {
            ahead.insert(part);
            if (find(part) != resident.end()) continue;
            if (!make_room(part, ahead, op.micro_batch)) break;
            bring(part, op.micro_batch);
        }
        moment_op(op, "load");
        out.push_back(op);
        moment_op(op, "store");
        for (const auto& part : want) {  // what the op wrote: updated parameters, accumulated gradients
            if (part.rfind("grads.", 0) == 0) {
                find(part)->second = op.phase != "update";  // the update consumes them
                if (op.phase == "update") stored.erase(part);
            } else if (op.phase == "update" && o.full) {
                find(part)->second = true;
            }
        }
    }
    while (!resident.empty()) evict(resident.front().first, -1);
    plan.ops = out;
}

// ---------------------------------------------------------------------------------------

namespace {

void make_dir_tree(const std::string& dir) {
    for (size_t i = 1; i <= dir.size(); i++)
        if (i == dir.size() || dir[i] == '/') mkdir(dir.substr(0, i).c_str(), 0777);
}

// The whole of [p, p + n) read from, or written to, offset `off`; "" or why not.
std::string file_io(int fd, void* p, size_t n, size_t off, bool write) {
    char* c = static_cast<char*>(p);
    while (n) {
        ssize_t r = write ? ::pwrite(fd, c, n, (off_t)off) : ::pread(fd, c, n, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return r < 0 ? std::strerror(errno) : write ? "short write" : "short read";
        c += r, n -= (size_t)r, off += (size_t)r;
    }
    return "";
}

#ifndef MADV_POPULATE_READ  // Linux 5.14; older headers (the NDK's) lack it
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif

size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

// The pages covering [p, p + n): page-aligned start, page-rounded length.
std::pair<char*, size_t> pages_of(const void* p, size_t n) {
    const size_t page = page_size();
    const uintptr_t a = reinterpret_cast<uintptr_t>(p) / page * page;
    const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + n + page - 1) / page * page;
    return {reinterpret_cast<char*>(a), (size_t)(b - a)};
}

const char* kDirExpected = "a writable backing folder with room for every shard (memory.sharding.dir)";

}  // namespace

void map_file(void* p, size_t span, int fd, const std::string& path) {
    if (span && mmap(p, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED)
        throw Error(path, std::string("cannot map a shard file: ") + std::strerror(errno), "a file system that supports mmap");
}

void zero_pages(void* p, size_t span, int workers) {
    // fresh anonymous pages in place of the file's, written in one call (POPULATE_WRITE): a
    // memset over the file mapping would copy every page from the page cache first
    if (span && mmap(p, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
        throw std::logic_error(std::string("mmap(anonymous): ") + std::strerror(errno));
    // a fresh page costs the kernel ~1.5 us (allocate, clear, map) and pages fault in in
    // parallel: `workers` threads each take a slice (28 MB here: 11.5 ms on one, 7.3 on two),
    // of 1 MB at least (a thread's start, ~50 us, is then a tenth of its work)
    const size_t page = page_size(), pages = span / page;
    const size_t n = std::max<size_t>(1, std::min<size_t>((size_t)workers, span >> 20));
    std::vector<int> err(n, 0);
    auto slice = [&](size_t i) {
        char* a = static_cast<char*>(p) + pages * i / n * page;
        char* b = static_cast<char*>(p) + pages * (i + 1) / n * page;
        if (madvise(a, (size_t)(b - a), MADV_POPULATE_WRITE) != 0) err[i] = errno;
    };
    std::vector<std::thread> helpers;
    for (size_t i = 1; i < n; i++) helpers.emplace_back(slice, i);
    slice(0);
    for (auto& t : helpers) t.join();
    for (int e : err) {
        if (e == EINVAL) {
            std::memset(p, 0, span);  // a kernel before 5.14
            return;
        }
        if (e) throw std::logic_error(std::string("madvise(POPULATE_WRITE): ") + std::strerror(e));
    }
}

void populate(const void* p, size_t n) {
    auto [a, span] = pages_of(p, n);
    if (!span || madvise(a, span, MADV_POPULATE_READ) == 0) return;
    if (errno != EINVAL) throw std::logic_error(std::string("madvise(POPULATE): ") + std::strerror(errno));
    volatile char* c = a;  // a kernel before 5.14: read a byte of each page
    for (size_t i = 0; i < span; i += page_size()) (void)c[i];
}

Shards::Shards(const Plan& plan, const std::function<float*(const std::string&)>& buffer, const std::string& dir_, bool prefetch)
    : dir(dir_), plan_(plan), prefetch_(prefetch) {
    make_dir_tree(dir);
    const size_t page = page_size();
    auto open_file = [&](const std::string& name, size_t bytes) {
        const std::string path = dir + "/" + name + ".bin";
        int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) throw Error(path, std::string("cannot create a shard file: ") + std::strerror(errno), kDirExpected);
        int err = bytes ? posix_fallocate(fd, 0, (off_t)pages_of(nullptr, bytes).second) : 0;  // a full folder shows now, not mid-run
        if (err) {
            ::close(fd);
            std::remove(path.c_str());
            char need[64];
            std::snprintf(need, sizeof need, "%.1f MB", bytes / kMB);
            throw Error(path, std::string("cannot reserve ") + need + " for a shard file: " + std::strerror(err), kDirExpected);
        }
        return fd;
    };
    for (const PlanBuffer& b : plan.buffers) {
        if (b.lifetime != Lifetime::Sharded) continue;
        Part p;
        p.name = b.name, p.shard = b.shard;
        p.ptr = reinterpret_cast<char*>(buffer(b.name));
        p.bytes = b.reserved * 4;
        p.span = (p.bytes + page - 1) / page * page;
        p.fd = open_file(b.name, p.bytes);
        remap(p);  // before the Model writes the initial values
        parts_.push_back(p);
    }
    if (plan.opt.offload_optimizer)
        for (const PlanBuffer& b : plan.buffers)
            if (b.name.rfind("params.", 0) == 0) moments_.push_back({b.shard, b.elements, open_file("optimizer." + b.shard, 8 * b.elements)});
    // what each op needs, and where a shard's gradient becomes final (its last use before its update)
    std::map<std::string, size_t> last;
    for (size_t i = 0; i < plan.ops.size(); i++) {
        const PlanOp& op = plan.ops[i];
        std::vector<int> idx;
        if (plan.opt.budget_bytes >= 0)
            for (const auto& n : needs(op, plan.opt.offload_gradients)) idx.push_back(part_index(n));
        needs_.push_back(idx);
        if (plan.opt.offload_gradients && op.phase != "update" && idx.size() == 2) last[op.shard] = i;
    }
    final_grads_.assign(plan.ops.size(), "");
    for (const auto& [shard, i] : last) final_grads_[i] = shard;
    if (prefetch_) thread_ = std::thread([this] { io_thread(); });
}

Shards::~Shards() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    // the files are scratch (a checkpoint holds the state): removed, so that the kernel does not
    // write their dirty pages back and the flash keeps nothing of them
    for (Part& p : parts_) ::close(p.fd), ::unlink((dir + "/" + p.name + ".bin").c_str());
    for (Moments& m : moments_) ::close(m.fd), ::unlink((dir + "/optimizer." + m.shard + ".bin").c_str());
    ::rmdir(dir.c_str());  // when it holds nothing else
}

void Shards::remap(const Part& p) const { map_file(p.ptr, p.span, p.fd, dir + "/" + p.name + ".bin"); }

int Shards::part_index(const std::string& name) const {
    for (size_t i = 0; i < parts_.size(); i++)
        if (parts_[i].name == name) return (int)i;
    return -1;
}

void Shards::run(const PlanOp& op) {
    const int i = part_index(op.name.substr(op.name.find('.', 3) + 1));
    if (i < 0) {  // io.*.optimizer.<shard>: the update moves the moments itself
        std::lock_guard<std::mutex> lk(mu_);
        (op.kind == "load" ? read_bytes : write_bytes) += op.io_bytes;
        return;
    }
    Part& p = parts_[i];
    const double start = now_s();
    std::string why;
    // a load maps the file's pages; a store writes gradients (parameters the update wrote
    // to the file itself); an evict drops the part's pages, copies and all
    if (op.kind == "load") populate(p.ptr, p.bytes);
    else if (op.kind == "zero") zero_pages(p.ptr, p.span, plan_.opt.threads);
    else if (op.kind == "store" && p.name.rfind("grads.", 0) == 0) why = file_io(p.fd, p.ptr, p.bytes, 0, true);
    else if (op.kind == "evict") remap(p);
    if (!why.empty()) throw Error(dir + "/" + p.name + ".bin", "cannot " + op.kind + " a shard: " + why, kDirExpected);
    const double end = now_s();
    std::lock_guard<std::mutex> lk(mu_);
    if (op.kind == "load" || op.kind == "zero") p.ready = true;
    if (op.kind == "load") read_bytes += p.bytes;
    if (op.kind == "store") write_bytes += p.bytes;
    if (trace_io && on_io && (op.kind == "load" || op.kind == "store"))
        on_io({{"type", "io"}, {"kind", op.kind}, {"shard", p.shard}, {"start", start - t0}, {"duration", end - start},
               {"bytes", p.bytes}});
}

void Shards::issue(const PlanOp& op) {
    const int i = part_index(op.name.substr(op.name.find('.', 3) + 1));
    if (i >= 0 && op.kind != "store") {
        std::lock_guard<std::mutex> lk(mu_);
        parts_[i].ready = false;  // until the I/O thread has run this op (and a load after it)
    }
    if (!prefetch_) return run(op);
    {
        std::lock_guard<std::mutex> lk(mu_);
        queue_.push_back(&op);
    }
    cv_.notify_all();
}

void Shards::io_thread() {
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        const PlanOp* op = queue_.front();
        queue_.pop_front();
        busy_ = true;
        lk.unlock();
        std::string err;
        if (error_.empty()) try {  // after an error, nothing more is written
                run(*op);
            } catch (const Error& e) {
                err = e.line();
            } catch (const std::exception& e) {
                err = e.what();
            }
        lk.lock();
        if (!err.empty() && error_.empty()) error_ = err;
        busy_ = false;
        cv_.notify_all();
    }
}

void Shards::check_error() {
    std::lock_guard<std::mutex> lk(mu_);
    if (error_.empty()) return;
    const std::string prefix = "mfbench-train: error: ";  // the I/O thread kept the Error's line
    throw Error("", error_.substr(error_.rfind(prefix, 0) == 0 ? prefix.size() : 0));
}

void Shards::wait_ready(const std::vector<int>& parts) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] {
        if (!error_.empty()) return true;
        for (int i : parts)
            if (!parts_[i].ready) return false;
        return true;
    });
    lk.unlock();
    check_error();
}

void Shards::enter(const std::string& owner, const std::string& phase) {
    for (; cursor_ < plan_.ops.size(); cursor_++) {
        const PlanOp& op = plan_.ops[cursor_];
        if (op.phase == "io") {
            issue(op);
        } else if (op.phase == phase && owner_of(op) == owner) {
            return wait_ready(needs_[cursor_]);
        } else if (!final_grads_[cursor_].empty() && on_grads_final) {
            on_grads_final(final_grads_[cursor_]);  // before the io after it can evict that gradient
        }
    }
    throw std::logic_error("shard program: no op of " + owner + " (" + phase + ") left");
}

void Shards::finish_step() {
    for (; cursor_ < plan_.ops.size(); cursor_++) {
        const PlanOp& op = plan_.ops[cursor_];
        if (op.phase == "io") issue(op);
        else if (!final_grads_[cursor_].empty() && on_grads_final) on_grads_final(final_grads_[cursor_]);
    }
    cursor_ = 0;
    {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return (queue_.empty() && !busy_) || !error_.empty(); });
    }
    check_error();
}

void Shards::write_initial(const std::string& shard) {
    const Part& p = parts_[part_index("params." + shard)];
    std::string why = file_io(p.fd, p.ptr, p.bytes, 0, true);
    if (!why.empty()) throw Error(dir + "/" + p.name + ".bin", "cannot write a shard: " + why, kDirExpected);
    remap(p);  // the copies the Model wrote dropped
}

void Shards::hold(const std::string& shard) {
    const int i = shard.empty() ? -1 : part_index("params." + shard);
    if (i == held_) return;
    if (held_ >= 0) remap(parts_[held_]);
    held_ = i;
    if (i >= 0) populate(parts_[i].ptr, parts_[i].bytes);
}

void Shards::params(const float* p, float* buf, size_t n, bool write) {
    const char* c = reinterpret_cast<const char*>(p);
    for (const Part& part : parts_)
        if (part.name.rfind("params.", 0) == 0 && c >= part.ptr && c < part.ptr + part.bytes)
            return transfer(part.fd, dir + "/" + part.name + ".bin", buf, n * 4, (size_t)(c - part.ptr), write);
    throw std::logic_error("no params shard holds this tensor");
}

void Shards::moments(const std::string& shard, int which, size_t first, float* buf, size_t n, bool write) {
    for (const Moments& m : moments_)
        if (m.shard == shard) return transfer(m.fd, dir + "/optimizer." + shard + ".bin", buf, n * 4, (which * m.n + first) * 4, write);
    throw std::logic_error("no offloaded moments of " + shard);
}

void Shards::transfer(int fd, const std::string& path, float* buf, size_t bytes, size_t off, bool write) {
    std::string why = file_io(fd, buf, bytes, off, write);
    if (!why.empty()) throw Error(path, std::string("cannot ") + (write ? "write" : "read") + ": " + why, kDirExpected);
}

void Shards::update(const AdamW& opt, std::vector<TrainSegment>& segs, const std::string& shard, int t_step, float lr,
                    float gscale, float* scratch, size_t scratch_elements) {
    const bool offloaded = std::any_of(moments_.begin(), moments_.end(), [&](const Moments& x) { return x.shard == shard; });
    const bool sharded = plan_.opt.budget_bytes >= 0 && plan_.opt.full;  // the parameters' file is theirs
    // where new values go: moments offloaded (read into scratch, updated there) and parameters
    // whose gradient is itself on flash (writing over it would copy its pages) to scratch, a
    // chunk of each at a time; other parameters over their gradient
    const int slots = offloaded ? 2 + (sharded && plan_.opt.offload_gradients) : 0;
    const size_t chunk = slots ? scratch_elements / slots : SIZE_MAX;
    size_t off = 0, in_shard = 0;  // the segment's first moment among all, and within the shard's
    for (TrainSegment& s : segs) {
        if (s.shard != shard) {
            off += s.n;
            continue;
        }
        for (size_t first = 0; first < s.n; first += chunk) {
            const size_t n = std::min(chunk, s.n - first);
            float* m = offloaded ? scratch : opt.m + off + first;
            float* v = offloaded ? scratch + chunk : opt.v + off + first;
            float* p_out = !sharded ? s.p + first : slots == 3 ? scratch + 2 * chunk : s.g + first;
            // each thread its slice end to end (read, AdamW, write): the file copies run on every
            // core, not on one while the others wait
            std::vector<std::exception_ptr> failed(omp_get_max_threads());
#pragma omp parallel
            {
                const size_t T = omp_get_num_threads(), t = omp_get_thread_num(), a = n * t / T, k = n * (t + 1) / T - a;
                try {
                    const size_t at = in_shard + first + a;
                    if (offloaded) moments(shard, 0, at, m + a, k, false), moments(shard, 1, at, v + a, k, false);
                    opt.apply(s, first + a, k, m + a, v + a, m + a, v + a, p_out + a, t_step, lr, gscale);
                    if (sharded) params(s.p + first + a, p_out + a, k, true);  // the page cache's pages: the mapping sees them
                    if (offloaded) moments(shard, 0, at, m + a, k, true), moments(shard, 1, at, v + a, k, true);
                } catch (...) {
                    failed[t] = std::current_exception();
                }
            }
            for (const std::exception_ptr& e : failed)
                if (e) std::rethrow_exception(e);
        }
        off += s.n, in_shard += s.n;
    }
}

void checkpoint_state(bool save, std::vector<TrainSegment>& segs, Shards* shards, bool params_on_flash, float* m, float* v,
                      size_t ntrain, const PutFn& put, const float* values) {
    std::vector<float> buf;
    // [0, n) of one array: in RAM, or through `read` / `write` of its file a chunk at a time
    auto move = [&](float* ram, size_t n, const std::function<void(size_t, float*, size_t, bool)>& file) {
        if (ram) {
            if (save) put(ram, n * 4);
            else std::memcpy(ram, values, n * 4);
        } else {
            buf.resize(std::min(n, kMomentChunk));
            for (size_t first = 0; first < n; first += buf.size()) {
                const size_t k = std::min(buf.size(), n - first);
                if (!save) std::memcpy(buf.data(), values + first, k * 4);
                file(first, buf.data(), k, !save);
                if (save) put(buf.data(), k * 4);
            }
        }
        if (!save) values += n;
    };
    for (TrainSegment& g : segs)
        move(params_on_flash ? nullptr : g.p, g.n, [&](size_t f, float* b, size_t k, bool w) { shards->params(g.p + f, b, k, w); });
    for (int which = 0; which < 2; which++) {
        if (m) {
            move(which ? v : m, ntrain, nullptr);
            continue;
        }
        std::map<std::string, size_t> at;  // the segment's first moment within its shard's
        for (TrainSegment& g : segs) {
            const size_t off = at[g.shard];
            at[g.shard] += g.n;
            move(nullptr, g.n, [&](size_t f, float* b, size_t k, bool w) { shards->moments(g.shard, which, off + f, b, k, w); });
        }
    }
}

}  // namespace mfb

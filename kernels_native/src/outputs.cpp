#include "outputs.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace mfb {

namespace {

std::vector<std::string> entries(const std::string& dir) {
    std::vector<std::string> out;
    if (DIR* d = opendir(dir.c_str())) {
        while (dirent* e = readdir(d))
            if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) out.push_back(e->d_name);
        closedir(d);
    }
    return out;
}

// The pid at the end of `name` after `marker` (".tmp." or ".staging."), or 0.
long pid_after(const std::string& name, const char* marker) {
    size_t at = name.rfind(marker);
    if (at == std::string::npos) return 0;
    const std::string digits = name.substr(at + std::strlen(marker));
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9) return 0;
    return std::atol(digits.c_str());
}

bool running(long pid) { return pid == getpid() || kill((pid_t)pid, 0) == 0 || errno == EPERM; }

void remove_tree(const std::string& dir) {  // a staging folder is flat
    for (const std::string& n : entries(dir)) std::remove((dir + "/" + n).c_str());
    rmdir(dir.c_str());
}

void sync_dir(const std::string& dir) {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    // some file systems refuse fsync on a folder (EINVAL): the files themselves are synced
    if (fd < 0 || (fsync(fd) != 0 && errno != EINVAL)) {
        int err = errno;
        if (fd >= 0) ::close(fd);
        throw Error(dir, std::string("cannot sync the folder: ") + std::strerror(err), "a writable output folder");
    }
    ::close(fd);
}

void move(const std::string& from, const std::string& to) {
    if (std::rename(from.c_str(), to.c_str()) != 0)
        throw Error(to, std::string("cannot commit the run's outputs: ") + std::strerror(errno), "a writable output folder");
}

bool has_checkpoint(const std::string& dir) {
    for (const std::string& n : entries(dir))
        if (n.rfind("ckpt-", 0) == 0 && n.size() > 4 && n.compare(n.size() - 4, 4, ".bin") == 0) return true;
    return false;
}

}  // namespace

OutputSet::OutputSet(std::string dir) : dir_(std::move(dir)) {
    for (const std::string& n : entries(dir_)) {
        long tmp = pid_after(n, ".tmp."), staged = n.rfind(".staging.", 0) == 0 ? pid_after(n, ".staging.") : 0;
        long probe = n.rfind(".mfbench-write-test.", 0) == 0 ? pid_after(n, ".mfbench-write-test.") : 0;  // make_dirs'
        if ((tmp && !running(tmp)) || (probe && !running(probe))) std::remove((dir_ + "/" + n).c_str());
        if (staged && !running(staged)) remove_tree(dir_ + "/" + n);
    }
}

OutputSet::~OutputSet() {
    if (committed_) return;
    if (!staging_.empty()) remove_tree(staging_);
    if (!partial_trace_.empty() && !has_checkpoint(dir_ + "/checkpoints")) std::remove(partial_trace_.c_str());
}

const std::string& OutputSet::staging() {
    if (staging_.empty()) {
        const std::string d = dir_ + "/.staging." + std::to_string(getpid());
        if (mkdir(d.c_str(), 0777) != 0 && errno != EEXIST)
            throw Error(d, std::string("cannot create: ") + std::strerror(errno), "a writable output folder");
        staging_ = d;
    }
    return staging_;
}

void OutputSet::rename_at_commit(const std::string& from, const std::string& to) { renames_.push_back({from, to}); }

void OutputSet::require_space(uint64_t bytes, const std::string& what) const {
    struct statvfs st;
    if (statvfs(dir_.c_str(), &st) != 0) return;  // no answer: the writes themselves will tell
    const uint64_t free_bytes = (uint64_t)st.f_bavail * st.f_frsize;
    if (free_bytes < bytes)
        throw Error(dir_, "only " + std::to_string(free_bytes) + " bytes free; " + what + " need " + std::to_string(bytes),
                    "a folder with room for the run's outputs");
}

void OutputSet::commit() {
    const std::string summary = "summary.json";
    if (std::remove((dir_ + "/" + summary).c_str()) != 0 && errno != ENOENT)
        throw Error(dir_ + "/" + summary, std::string("cannot replace: ") + std::strerror(errno), "a writable output folder");
    sync_dir(dir_);  // the old set is marked incomplete before any of its files is replaced
    bool has_summary = false;
    if (!staging_.empty())
        for (const std::string& n : entries(staging_)) {
            if (n == summary) has_summary = true;
            else move(staging_ + "/" + n, dir_ + "/" + n);
        }
    for (const auto& r : renames_) move(r.first, r.second);
    if (has_summary) {
        sync_dir(dir_);
        move(staging_ + "/" + summary, dir_ + "/" + summary);
    }
    sync_dir(dir_);
    if (!staging_.empty()) rmdir(staging_.c_str());
    committed_ = true;
}

}  // namespace mfb

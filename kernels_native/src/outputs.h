// A run's output files as one set (docs/native.md, Outputs): written into a staging folder
// inside the output folder, then committed together, so a failure or a kill midway never
// leaves a new model next to an old summary.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mfb {

class OutputSet {
public:
    // Removes what a killed run left in dir: `*.tmp.<pid>` files, `.staging.<pid>` folders and
    // write probes of processes no longer running.
    explicit OutputSet(std::string dir);
    // Not committed (an error, a divergence): the staged files go; so does the partial trace
    // unless a checkpoint in dir/checkpoints needs it to resume.
    ~OutputSet();
    OutputSet(const OutputSet&) = delete;
    OutputSet& operator=(const OutputSet&) = delete;

    // The folder to write the set's files into (made on first use), under their final names.
    const std::string& staging();
    // A file already written durably in dir (the trace's .partial), renamed to `to` at commit.
    void rename_at_commit(const std::string& from, const std::string& to);
    void set_partial_trace(const std::string& path) { partial_trace_ = path; }
    // Free space for `bytes` more in dir (statvfs), checked before training: an Error naming
    // the folder when short.
    void require_space(uint64_t bytes, const std::string& what) const;
    // The old summary.json goes first, the new one comes last: summary.json is present only
    // next to the files of its own run. Every rename is followed by one fsync of dir.
    void commit();

private:
    std::string dir_, staging_, partial_trace_;
    std::vector<std::pair<std::string, std::string>> renames_;
    bool committed_ = false;
};

}  // namespace mfb

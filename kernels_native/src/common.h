// Shared small utilities: the one error type every bad input becomes, and timing.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace mfb {

// A user-facing error: printed as "mfbench-train: error: <file>: <what> (expected <expected>)".
struct Error : std::runtime_error {
    std::string file, expected;
    Error(std::string file_, const std::string& what, std::string expected_ = "")
        : std::runtime_error(what), file(std::move(file_)), expected(std::move(expected_)) {}
    std::string line() const {
        std::string s = "mfbench-train: error: ";
        if (!file.empty()) s += file + ": ";
        s += what();
        if (!expected.empty()) s += " (expected " + expected + ")";
        return s;
    }
};

inline double now_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

// Write `data` to path atomically and durably: a temporary file in the same folder, fsync,
// rename, fsync of the folder.
void write_file_atomic(const std::string& path, const std::string& data);

// The folder of a file path ("." for a bare name).
std::string parent_dir(const std::string& path);

// The end of an atomic write of `path` through the temporary `tmp` open as f: flush, fsync
// and close f, rename tmp to path, fsync the folder (so the rename itself survives a crash).
// Removes tmp and throws Error on failure; f is closed either way.
void finish_atomic(std::FILE* f, const std::string& tmp, const std::string& path);

}  // namespace mfb

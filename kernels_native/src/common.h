// Shared small utilities: the one error type every bad input becomes, and timing.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
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

// Write `data` to path atomically: a temporary file in the same folder, then rename.
void write_file_atomic(const std::string& path, const std::string& data);

}  // namespace mfb

// Checkpoints of a run (format in docs/native.md, "Checkpoints"): everything the step loop
// needs to continue bit-identically, one file per checkpoint <out>/checkpoints/ckpt-<step>.bin,
// the newest two kept. Also the stop request: a signal or a caller (a battery floor) asks the
// loop to checkpoint after the current step and stop.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model.h"

namespace mfb {

constexpr uint32_t kCheckpointVersion = 1;

// The loop's state besides the trainable values and AdamW's moments.
struct CheckpointState {
    uint64_t step = 0;         // optimizer steps completed (the next step's 0-based index)
    uint64_t data_pos = 0;     // the batch loader's position in the token stream
    uint64_t trace_bytes = 0;  // length of trace.jsonl.partial at the checkpoint (resume truncates to it)
    double trace_t = 0;        // the trace's clock at the checkpoint (a resumed trace continues from it)
    double wall_s = 0;         // wall time of the steps so far, for the summary
    double last_loss = 0;
    std::vector<double> durations;  // of every completed step, for the summary
    nlohmann::json identity;        // the options that decide the numerics; resume requires the same
};

using PutFn = std::function<void(const void*, size_t)>;

// Writes <dir>/ckpt-<step>.bin through a temporary file (fsync, rename, fsync of the folder),
// then removes every checkpoint but this one and the newest older one. The state is 3 x
// ntrain floats (the trainable values in order, then m, then v) that write_state puts, in
// pieces (from RAM, or a sharded run's files). Throws Error naming the file (the temporary removed).
void save_checkpoint(const std::string& dir, const CheckpointState& st, size_t ntrain,
                     const std::function<void(const PutFn&)>& write_state);

// Loads the newest checkpoint in dir that verifies (magic, version, size, checksum, the same
// identity) into st, and hands its 3 x ntrain floats to read_state; a bad newer one is skipped
// with a one-line warning on stderr. Returns false when dir holds no checkpoint; throws Error
// when none verifies. Removes temporaries a killed writer left.
bool load_checkpoint(const std::string& dir, CheckpointState& st, size_t ntrain,
                     const std::function<void(const float*)>& read_state);

// True once SIGTERM or SIGINT asked for a stop, with its reason ("signal SIGTERM").
bool stop_requested(std::string& reason);
// SIGTERM and SIGINT request a stop (the handler only records the signal number).
void install_stop_signals();

}  // namespace mfb

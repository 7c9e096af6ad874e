// The pre-tokenized data file (format in docs/native.md) and the batch loader over it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mfb {

struct TokenFile {
    uint32_t vocab_size = 0;
    std::vector<uint32_t> ids;
    std::vector<uint8_t> mask;  // empty: every token is a loss target
};

// Reads and validates the file; every id must be < model_vocab.
TokenFile read_token_file(const std::string& path, uint32_t model_vocab);

// Sequential windows of T+1 tokens with stride T (wrapping at the end of the file):
// inputs are the first T tokens, targets the last T; a target with mask 0 is ignored (-1).
class BatchLoader {
public:
    BatchLoader(const TokenFile& f, int T) : f_(f), T_(T) {}
    void next(int B, int* inputs, int* targets);  // inputs/targets: [B, T]
    size_t pos() const { return pos_; }  // the next window's start (checkpoints save it)
    void seek(size_t pos) { pos_ = pos; }

private:
    const TokenFile& f_;
    int T_;
    size_t pos_ = 0;
};

}  // namespace mfb

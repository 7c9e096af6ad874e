#include "data.h"

#include <cstdio>
#include <cstring>

#include "common.h"

namespace mfb {

static const char kMagic[8] = {'M', 'F', 'B', 'T', 'O', 'K', 'S', '\0'};

TokenFile read_token_file(const std::string& path, uint32_t model_vocab) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw Error(path, std::string("cannot open: ") + std::strerror(errno), "a token file written by `mfbench tokenize`");
    struct Closer { FILE* f; ~Closer() { std::fclose(f); } } closer{f};
    unsigned char h[32];
    if (std::fread(h, 1, 32, f) != 32) throw Error(path, "file shorter than its 32-byte header", "a token file written by `mfbench tokenize`");
    if (std::memcmp(h, kMagic, 8) != 0) throw Error(path, "bad magic", "a token file starting with MFBTOKS");
    auto u32 = [&](int o) { return (uint32_t)h[o] | (uint32_t)h[o + 1] << 8 | (uint32_t)h[o + 2] << 16 | (uint32_t)h[o + 3] << 24; };
    uint32_t version = u32(8), flags = u32(12);
    uint64_t count = (uint64_t)u32(24) | (uint64_t)u32(28) << 32;
    if (version != 1) throw Error(path, "format version " + std::to_string(version), "version 1");
    if (flags & ~1u) throw Error(path, "unknown flags " + std::to_string(flags), "flags 0 or 1");
    TokenFile tf;
    tf.vocab_size = u32(16);
    bool has_mask = flags & 1;
    std::fseek(f, 0, SEEK_END);
    uint64_t size = (uint64_t)std::ftell(f);
    // count comes from the file: bounded by its size before any product (no wrap)
    uint64_t want = count <= size / 4 ? 32 + count * 4 + (has_mask ? count : 0) : UINT64_MAX;
    if (size != want)
        throw Error(path, (size < want ? "truncated: " : "trailing bytes: ") + std::to_string(size) + " bytes for " + std::to_string(count) + " tokens",
                    want == UINT64_MAX ? "a complete file" : std::to_string(want) + " bytes");
    if (count == 0) throw Error(path, "no tokens", "at least one sequence of tokens");
    std::fseek(f, 32, SEEK_SET);
    tf.ids.resize(count);
    if (std::fread(tf.ids.data(), 4, count, f) != count) throw Error(path, "short read", "a readable file");
    // Stored little-endian; every target we build for (x86-64, arm64) is little-endian.
    if (has_mask) {
        tf.mask.resize(count);
        if (std::fread(tf.mask.data(), 1, count, f) != count) throw Error(path, "short read", "a readable file");
        // the first token is never a target (nothing precedes it)
        bool any = false;
        for (uint64_t i = 0; i < count; i++) {
            if (tf.mask[i] > 1)
                throw Error(path, "loss mask value " + std::to_string(tf.mask[i]) + " at position " + std::to_string(i), "0 or 1");
            any = any || (i > 0 && tf.mask[i]);
        }
        if (!any) throw Error(path, "the loss mask marks no target token", "at least one token after the first with mask 1");
    }
    for (uint64_t i = 0; i < count; i++)
        if (tf.ids[i] >= model_vocab)
            throw Error(path, "token id " + std::to_string(tf.ids[i]) + " at position " + std::to_string(i) + " is out of the vocabulary",
                        "ids < the model's vocab_size " + std::to_string(model_vocab));
    return tf;
}

void BatchLoader::next(int B, int* inputs, int* targets) {
    const size_t n = f_.ids.size(), T = (size_t)T_;
    for (int b = 0; b < B; b++) {
        if (pos_ + T + 1 > n) pos_ = 0;
        for (size_t t = 0; t < T; t++) {
            inputs[b * T + t] = (int)f_.ids[pos_ + t];
            size_t j = pos_ + t + 1;
            targets[b * T + t] = (f_.mask.empty() || f_.mask[j]) ? (int)f_.ids[j] : -1;
        }
        pos_ += T;
    }
}

}  // namespace mfb

// Reading and writing the safetensors format (8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and byte range, then the raw data).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace mfb {

struct TensorInfo {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

class SafetensorsReader {
public:
    explicit SafetensorsReader(const std::string& path);  // opens and validates the header
    ~SafetensorsReader();
    SafetensorsReader(const SafetensorsReader&) = delete;
    SafetensorsReader& operator=(const SafetensorsReader&) = delete;
    bool has(const std::string& name) const { return tensors_.count(name) != 0; }
    std::vector<std::string> names() const;
    // Read tensor `name` (F32, F16 or BF16 on disk) into dst as fp32, checking its shape;
    // only elements [first, first + count) when given (dst[0] is element `first`).
    void read_f32(const std::string& name, const std::vector<int64_t>& shape, float* dst, uint64_t first = 0,
                  uint64_t count = UINT64_MAX) const;

private:
    std::string path_;
    int fd_ = -1;
    uint64_t data_start_ = 0, file_size_ = 0;
    std::map<std::string, TensorInfo> tensors_;
};

// Collects fp32 tensors (by pointer; they must outlive write()) and writes one file atomically.
class SafetensorsWriter {
public:
    void add(const std::string& name, std::vector<int64_t> shape, const float* data);
    // ... or from `source`, called right before its bytes are written (a sharded model's
    // tensor is brought in then)
    void add(const std::string& name, std::vector<int64_t> shape, std::function<const float*()> source);
    void write(const std::string& path, const std::map<std::string, std::string>& metadata) const;

private:
    struct Item { std::string name; std::vector<int64_t> shape; const float* data; std::function<const float*()> source; };
    std::vector<Item> items_;
};

}  // namespace mfb

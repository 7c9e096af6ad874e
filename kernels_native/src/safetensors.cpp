#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <set>
#include <nlohmann/json.hpp>

#include "common.h"
#include "half.h"

namespace mfb {

using json = nlohmann::json;

static std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

static size_t dtype_size(const std::string& dt) {
    if (dt == "F32") return 4;
    if (dt == "F16" || dt == "BF16") return 2;
    return 0;
}

// Bits per element of every dtype the reference library (safetensors) knows; 0: unknown.
static unsigned dtype_bits(const std::string& dt) {
    static const std::map<std::string, unsigned> bits = {
        {"BOOL", 8},     {"F4", 4},           {"F6_E2M3", 6},      {"F6_E3M2", 6}, {"U8", 8},    {"I8", 8},
        {"F8_E5M2", 8},  {"F8_E4M3", 8},      {"F8_E8M0", 8},      {"F8_E4M3FNUZ", 8},         {"F8_E5M2FNUZ", 8},
        {"I16", 16},     {"U16", 16},         {"F16", 16},         {"BF16", 16},   {"I32", 32},  {"U32", 32},
        {"F32", 32},     {"C64", 64},         {"F64", 64},         {"I64", 64},    {"U64", 64}};
    auto it = bits.find(dt);
    return it == bits.end() ? 0 : it->second;
}

// What the reference library refuses is refused here (tests/test_fuzz_native.py compares),
// plus duplicate tensor names (it keeps the last silently; which one was meant is unknown):
// a header of at most 100,000,000 bytes holding one JSON object; `__metadata__` an object of
// strings; every tensor a known dtype, a shape of non-negative integers and two integer
// offsets whose range holds exactly its bytes; the ranges, in offset order, tile the data
// section with no gap, overlap or trailing byte.
SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) throw Error(path, std::string("cannot open: ") + std::strerror(errno), "a safetensors file");
    struct stat st;
    if (fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) throw Error(path, "not a regular file", "a safetensors file");
    file_size_ = (uint64_t)st.st_size;
    unsigned char lenbuf[8];
    if (file_size_ < 8 || pread(fd_, lenbuf, 8, 0) != 8)
        throw Error(path, "file too short (" + std::to_string(file_size_) + " bytes)", "an 8-byte header length");
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i];
    if (hlen < 2 || hlen > file_size_ - 8 || hlen > 100000000)
        throw Error(path, "bad header length " + std::to_string(hlen) + " in a file of " + std::to_string(file_size_) + " bytes",
                    "a JSON header of at most 100000000 bytes that fits in the file");
    std::string hdr(hlen, '\0');
    if (pread(fd_, hdr.data(), hlen, 8) != (ssize_t)hlen) throw Error(path, "short read of header", "a readable file");
    data_start_ = 8 + hlen;
    json j;
    std::string duplicate;
    std::set<std::string> names;
    try {
        j = json::parse(hdr, [&](int depth, json::parse_event_t event, json& parsed) {
            if (depth == 1 && event == json::parse_event_t::key && !names.insert(parsed.get<std::string>()).second)
                duplicate = parsed.get<std::string>();
            return true;
        });
    } catch (const json::exception&) {
        throw Error(path, "header is not valid JSON (or its length " + std::to_string(hlen) + " is off)", "a safetensors JSON header");
    }
    if (!j.is_object()) throw Error(path, "header is not a JSON object", "a safetensors JSON header");
    if (!duplicate.empty()) throw Error(path, "tensor '" + duplicate + "' appears twice in the header", "each name once");
    const uint64_t data_size = file_size_ - data_start_;
    std::vector<std::pair<uint64_t, std::string>> order;  // begin, name
    for (auto it = j.begin(); it != j.end(); ++it) {
        const json& t = it.value();
        if (it.key() == "__metadata__") {
            if (!t.is_object()) throw Error(path, "__metadata__ is " + t.dump(), "an object of strings");
            for (auto m = t.begin(); m != t.end(); ++m)
                if (!m.value().is_string()) throw Error(path, "__metadata__." + m.key() + " is " + m.value().dump(), "a string");
            continue;
        }
        const std::string where = "tensor '" + it.key() + "'";
        auto bad = [&](const std::string& what, const std::string& expected) { throw Error(path, where + " " + what, expected); };
        if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets"))
            bad("has a malformed header entry", "dtype, shape and data_offsets");
        TensorInfo info;
        const json &dt = t["dtype"], &shape = t["shape"], &off = t["data_offsets"];
        if (!dt.is_string() || !dtype_bits(dt.get<std::string>())) bad("has dtype " + dt.dump(), "a safetensors dtype such as F32");
        info.dtype = dt.get<std::string>();
        if (!shape.is_array()) bad("has shape " + shape.dump(), "a list of non-negative integers");
        uint64_t bits = dtype_bits(info.dtype);
        bool over = false;
        for (const json& d : shape) {
            if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t)INT64_MAX) bad("has shape " + shape.dump(), "a list of non-negative integers");
            info.shape.push_back(d.get<int64_t>());
            over = over || __builtin_mul_overflow(bits, d.get<uint64_t>(), &bits);
        }
        if (over) bad("has shape " + shape.dump() + " whose size overflows", "a shape of at most 2^64 bits");
        if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
            bad("has data_offsets " + off.dump(), "two non-negative integers [begin, end]");
        info.begin = off[0].get<uint64_t>();
        info.end = off[1].get<uint64_t>();
        if (info.begin > info.end || info.end > data_size)
            bad("data range [" + std::to_string(info.begin) + ", " + std::to_string(info.end) + ") lies outside the file's " +
                    std::to_string(data_size) + " data bytes",
                "a complete file");
        if (bits % 8 || info.end - info.begin != bits / 8)
            bad("holds " + std::to_string(info.end - info.begin) + " bytes for " + info.dtype + " of shape " + shape_str(info.shape),
                bits % 8 ? "a whole number of bytes" : std::to_string(bits / 8) + " bytes");
        tensors_[it.key()] = info;
        order.push_back({info.begin, it.key()});
    }
    // in offset order the ranges tile the data: each begins where the last ended, the last ends the file
    std::sort(order.begin(), order.end(), [&](const auto& a, const auto& b) {
        return a.first != b.first ? a.first < b.first : tensors_[a.second].end < tensors_[b.second].end;
    });
    uint64_t at = 0;
    for (const auto& o : order) {
        const TensorInfo& t = tensors_[o.second];
        if (t.begin != at)
            throw Error(path, "tensor '" + o.second + "' data range [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ") " +
                                  (t.begin < at ? "overlaps another tensor" : "leaves a gap after byte " + std::to_string(at)),
                        "tensors packed back to back");
        at = t.end;
    }
    if (at != data_size)
        throw Error(path, std::to_string(data_size - at) + " trailing bytes after the last tensor", "a data section the tensors cover exactly");
}

std::vector<std::string> SafetensorsReader::names() const {
    std::vector<std::string> out;
    for (const auto& t : tensors_) out.push_back(t.first);
    return out;
}

SafetensorsReader::~SafetensorsReader() {
    if (fd_ >= 0) ::close(fd_);
}

void SafetensorsReader::read_f32(const std::string& name, const std::vector<int64_t>& shape, float* dst, uint64_t first,
                                 uint64_t count) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) throw Error(path_, "missing tensor '" + name + "'", "a tensor of shape " + shape_str(shape));
    const TensorInfo& t = it->second;
    if (t.shape != shape)
        throw Error(path_, "tensor '" + name + "' has shape " + shape_str(t.shape) + " which disagrees with config.json",
                    shape_str(shape));
    size_t es = dtype_size(t.dtype);
    if (!es) throw Error(path_, "tensor '" + name + "' has dtype " + t.dtype, "F32, F16 or BF16");
    const uint64_t end = std::min((t.end - t.begin) / es, first > UINT64_MAX - count ? UINT64_MAX : first + count);
    const size_t chunk = 1 << 20;  // elements per read, so fp16/bf16 need only a small staging buffer
    std::vector<uint16_t> stage(es == 2 ? chunk : 0);
    for (uint64_t done = first; done < end;) {
        uint64_t n = std::min<uint64_t>(chunk, end - done);
        float* out = dst + (done - first);
        void* buf = es == 4 ? (void*)out : (void*)stage.data();
        uint64_t bytes = n * es, got = 0;
        while (got < bytes) {
            ssize_t r = pread(fd_, (char*)buf + got, bytes - got, data_start_ + t.begin + done * es + got);
            if (r <= 0) throw Error(path_, "short read of tensor '" + name + "'", "a complete file");
            got += (uint64_t)r;
        }
        if (t.dtype == "F16")
            for (uint64_t i = 0; i < n; i++) out[i] = f16_to_f32(stage[i]);
        else if (t.dtype == "BF16")
            for (uint64_t i = 0; i < n; i++) out[i] = bf16_to_f32(stage[i]);
        done += n;
    }
}

void SafetensorsWriter::add(const std::string& name, std::vector<int64_t> shape, const float* data) {
    items_.push_back({name, std::move(shape), data, nullptr});
}

void SafetensorsWriter::add(const std::string& name, std::vector<int64_t> shape, std::function<const float*()> source) {
    items_.push_back({name, std::move(shape), nullptr, std::move(source)});
}

static void write_all(FILE* f, const void* p, size_t n, const std::string& path) {
    if (n && fwrite(p, 1, n, f) != n) throw Error(path, std::string("write failed: ") + std::strerror(errno), "a writable folder with free space");
}

void SafetensorsWriter::write(const std::string& path, const std::map<std::string, std::string>& metadata) const {
    json h = json::object();
    h["__metadata__"] = metadata;
    uint64_t off = 0;
    for (const Item& it : items_) {
        uint64_t n = 1;
        for (auto d : it.shape) n *= (uint64_t)d;
        h[it.name] = {{"dtype", "F32"}, {"shape", it.shape}, {"data_offsets", {off, off + n * 4}}};
        off += n * 4;
    }
    std::string hs = h.dump();
    while (hs.size() % 8) hs += ' ';
    std::string tmp = path + ".tmp." + std::to_string(getpid());
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw Error(path, std::string("cannot write: ") + std::strerror(errno), "a writable folder");
    try {
        unsigned char lenbuf[8];
        uint64_t hl = hs.size();
        for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)(hl >> (8 * i));
        write_all(f, lenbuf, 8, path);
        write_all(f, hs.data(), hs.size(), path);
        for (const Item& it : items_) {
            uint64_t n = 1;
            for (auto d : it.shape) n *= (uint64_t)d;
            write_all(f, it.source ? it.source() : it.data, n * 4, path);
        }
        FILE* done = f;
        f = nullptr;
        finish_atomic(done, tmp, path);
    } catch (...) {
        if (f) std::fclose(f);
        std::remove(tmp.c_str());
        throw;
    }
}

}  // namespace mfb

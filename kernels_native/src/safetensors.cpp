#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
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
    if (hlen < 2 || hlen > file_size_ - 8 || hlen > (uint64_t)1 << 30)
        throw Error(path, "bad header length " + std::to_string(hlen) + " in a file of " + std::to_string(file_size_) + " bytes",
                    "a JSON header that fits in the file");
    std::string hdr(hlen, '\0');
    if (pread(fd_, hdr.data(), hlen, 8) != (ssize_t)hlen) throw Error(path, "short read of header", "a readable file");
    data_start_ = 8 + hlen;
    json j;
    try {
        j = json::parse(hdr);
    } catch (const json::exception&) {
        throw Error(path, "header is not valid JSON", "a safetensors JSON header");
    }
    if (!j.is_object()) throw Error(path, "header is not a JSON object", "a safetensors JSON header");
    const uint64_t data_size = file_size_ - data_start_;
    for (auto it = j.begin(); it != j.end(); ++it) {
        if (it.key() == "__metadata__") continue;
        const json& t = it.value();
        TensorInfo info;
        try {
            info.dtype = t.at("dtype").get<std::string>();
            info.shape = t.at("shape").get<std::vector<int64_t>>();
            auto off = t.at("data_offsets").get<std::vector<uint64_t>>();
            if (off.size() != 2) throw std::runtime_error("offsets");
            info.begin = off[0];
            info.end = off[1];
        } catch (const std::exception&) {
            throw Error(path, "tensor '" + it.key() + "' has a malformed header entry", "dtype, shape and data_offsets");
        }
        uint64_t numel = 1;
        for (int64_t d : info.shape) {
            if (d < 0) throw Error(path, "tensor '" + it.key() + "' has a negative dimension", "a valid shape");
            numel *= (uint64_t)d;
        }
        size_t es = dtype_size(info.dtype);
        if (info.begin > info.end || info.end > data_size)
            throw Error(path, "tensor '" + it.key() + "' data range [" + std::to_string(info.begin) + ", " +
                                  std::to_string(info.end) + ") lies outside the file's " + std::to_string(data_size) + " data bytes",
                        "a complete file");
        if (es && info.end - info.begin != numel * es)
            throw Error(path, "tensor '" + it.key() + "' holds " + std::to_string(info.end - info.begin) +
                                  " bytes for shape " + shape_str(info.shape),
                        std::to_string(numel * es) + " bytes");
        tensors_[it.key()] = info;
    }
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

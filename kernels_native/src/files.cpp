#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common.h"

namespace mfb {

std::string parent_dir(const std::string& path) {
    size_t slash = path.rfind('/');
    if (slash == std::string::npos) return ".";
    return slash == 0 ? "/" : path.substr(0, slash);
}

void finish_atomic(std::FILE* f, const std::string& tmp, const std::string& path) {
    bool ok = std::fflush(f) == 0 && fsync(fileno(f)) == 0;
    int err = errno;
    ok = std::fclose(f) == 0 && ok;
    if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) ok = false, err = errno;
    if (!ok) {
        std::remove(tmp.c_str());
        throw Error(path, std::string("cannot write: ") + std::strerror(err), "a writable folder with free space");
    }
    int dir = ::open(parent_dir(path).c_str(), O_RDONLY | O_DIRECTORY);
    // some file systems refuse fsync on a folder (EINVAL): the data itself is already synced
    if (dir < 0 || (fsync(dir) != 0 && errno != EINVAL)) {
        err = errno;
        if (dir >= 0) ::close(dir);
        throw Error(path, std::string("cannot sync its folder: ") + std::strerror(err), "a writable folder");
    }
    ::close(dir);
}

void write_file_atomic(const std::string& path, const std::string& data) {
    std::string tmp = path + ".tmp." + std::to_string(getpid());
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw Error(path, std::string("cannot write: ") + std::strerror(errno), "a writable folder");
    if (std::fwrite(data.data(), 1, data.size(), f) != data.size()) {
        int err = errno;
        std::fclose(f);
        std::remove(tmp.c_str());
        throw Error(path, std::string("cannot write: ") + std::strerror(err), "a writable folder with free space");
    }
    finish_atomic(f, tmp, path);
}

}  // namespace mfb

// tests/test_native_frozen_dtype.py: kernels_native/src/half.h's conversions on a file of
// floats. argv: in.bin (n fp32), out.bin (bf16 [n], f16 [n], bf16 widened [n], f16 widened [n]).
#include <cstdio>
#include <vector>

#include "half.h"

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* f = std::fopen(argv[1], "rb");
    std::vector<float> x;
    float v;
    while (std::fread(&v, 4, 1, f) == 1) x.push_back(v);
    std::fclose(f);
    const size_t n = x.size();
    std::vector<uint16_t> bf(n), h(n);
    std::vector<float> wbf(n), wh(n);
    mfb::narrow(mfb::Half::BF16, x.data(), bf.data(), n);
    mfb::narrow(mfb::Half::F16, x.data(), h.data(), n);
    mfb::widen(mfb::Half::BF16, bf.data(), wbf.data(), n);
    mfb::widen(mfb::Half::F16, h.data(), wh.data(), n);
    f = std::fopen(argv[2], "wb");
    std::fwrite(bf.data(), 2, n, f), std::fwrite(h.data(), 2, n, f), std::fwrite(wbf.data(), 4, n, f), std::fwrite(wh.data(), 4, n, f);
    return std::fclose(f) != 0;
}

// 16-bit floats: bfloat16 and IEEE half, to and from fp32. Used to read F16/BF16
// checkpoints and to hold frozen weights at 2 bytes each (memory.frozen_dtype), widened to
// fp32 right before use. Narrowing rounds to nearest, ties to even, as torch's .to() does.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace mfb {

enum class Half { None, BF16, F16 };  // None: fp32, nothing is narrowed

inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffff;
    if (a > 0x7f800000) return sign | 0x7e00;  // NaN
    if (a >= 0x477ff000) return sign | 0x7c00;  // rounds to >= 65520: infinity
    if (a < 0x38800000) {                       // below 2^-14: a subnormal half (or zero)
        if (a < 0x33000000) return sign;        // below half the smallest subnormal: zero
        const uint32_t man = (a & 0x7fffff) | 0x800000, shift = 126 - (a >> 23);  // 14 .. 24
        uint32_t r = man >> shift, rest = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (r & 1))) r++;
        return sign | (uint16_t)r;
    }
    uint32_t r = a - 0x38000000;  // rebias the exponent (127 -> 15), mantissa still 23 bits
    r = (r + 0xfff + ((r >> 13) & 1)) >> 13;
    return sign | (uint16_t)r;
}

inline float half_to_f32(Half k, uint16_t h) { return k == Half::BF16 ? bf16_to_f32(h) : f16_to_f32(h); }
inline uint16_t f32_to_half(Half k, float f) { return k == Half::BF16 ? f32_to_bf16(f) : f32_to_f16(f); }

// dst[i] = the fp32 value of src[i], over n values (threads when it is worth it).
inline void widen(Half k, const uint16_t* src, float* dst, size_t n) {
    if (k == Half::BF16) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
    }
}

// dst[i] = src[i] rounded to 16 bits.
inline void narrow(Half k, const float* src, uint16_t* dst, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) dst[i] = f32_to_half(k, src[i]);
}

}  // namespace mfb

// Counter-based Philox4x32-10 and the float transforms shared by every CPU kernel.
// The integer stream is bit-for-bit the one kernels/philox.py draws; the float transforms
// use fastmath.h, which agrees with Triton's libdevice log/sin/cos to a few float32 ulps.
#pragma once

#include <cstdint>

#include "fastmath.h"

namespace fastbml {

// One Philox4x32-10 block: counter (c0, c1, c2, c3), key = 64-bit seed (lo, hi words).
struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

inline Philox4 philox4x32(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p2 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// Uniform in the open interval (0, 1): the top 24 bits, centred in their bucket.
// Exact in float32 and never 0 or 1, so the log in box_muller is always finite.
inline float uniform_open(uint32_t x) {
  return static_cast<float>(x >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}

// Box-Muller: two open uniforms to two standard normals.
inline void box_muller(float u1, float u2, float& n1, float& n2) {
  const float r = __builtin_sqrtf(-2.0f * log_positive(u1));
  float s, c;
  sincos_turns(u2, s, c);
  n1 = r * c;
  n2 = r * s;
}

}  // namespace fastbml

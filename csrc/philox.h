// Counter-based Philox4x32-10 and the float transforms shared by every CPU kernel.
// The integer stream is bit-for-bit the one kernels/philox.py draws; the float transforms
// are polynomial (so the compiler vectorises them) and agree with Triton's libdevice
// log/sin/cos to a few float32 ulps.
#pragma once

#include <cstdint>
#include <cstring>

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

// Natural log of a positive normal float (Cephes-style: exponent split + odd-degree fit).
inline float log_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e with m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const int32_t small = m < 0.70710678f;  // keep m in [sqrt(1/2), sqrt(2))
  m += m * static_cast<float>(small);
  e -= small;
  const float z = m - 1.0f;
  const float z2 = z * z;
  float p = 7.0376836292e-2f;
  p = p * z - 1.1514610310e-1f;
  p = p * z + 1.1676998740e-1f;
  p = p * z - 1.2420140846e-1f;
  p = p * z + 1.4249322787e-1f;
  p = p * z - 1.6668057665e-1f;
  p = p * z + 2.0000714765e-1f;
  p = p * z - 2.4999993993e-1f;
  p = p * z + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * z * z2 + fe * -2.12194440e-4f - 0.5f * z2;
  return z + y + fe * 0.693359375f;
}

// sin and cos of 2*pi*u for u in [0, 1), reduced exactly to a quarter turn.
inline void sincos_turns(float u, float& s, float& c) {
  const float x = 4.0f * u;                      // exact
  const float q = static_cast<float>(static_cast<int32_t>(x + 0.5f));  // nearest quadrant
  const float t = (x - q) * 1.57079632679489662f;  // |t| <= pi/4
  const float t2 = t * t;
  float sp = -1.9515295891e-4f;
  sp = sp * t2 + 8.3321608736e-3f;
  sp = sp * t2 - 1.6666654611e-1f;
  const float st = t + t * t2 * sp;
  float cp = 2.443315711809948e-5f;
  cp = cp * t2 - 1.388731625493765e-3f;
  cp = cp * t2 + 4.166664568298827e-2f;
  const float ct = 1.0f - 0.5f * t2 + t2 * t2 * cp;
  // Rotate by the quadrant: odd quadrants swap sin and cos; signs follow the turn.
  const int32_t quadrant = static_cast<int32_t>(q);
  const float odd = static_cast<float>(quadrant & 1);
  const float s_sign = 1.0f - static_cast<float>(quadrant & 2);
  const float c_sign = 1.0f - static_cast<float>((quadrant + 1) & 2);
  s = s_sign * (st + odd * (ct - st));
  c = c_sign * (ct + odd * (st - ct));
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

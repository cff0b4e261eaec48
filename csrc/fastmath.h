// Branch-free float32 log, exp and sin/cos (Cephes-style polynomials, accurate to a few
// ulps) that the compiler can vectorise inside `#pragma omp simd` loops, unlike libm calls.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastbml {

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

// e^x for x <= 0 (a softmax term x - max); inputs below -87.3, -inf included, give ~1e-38
// rather than 0 (negligible in a softmax sum; keeps the result a normal float). Branch-free
// (integer selects), so loops over it vectorise. NaN in, garbage out: callers check NaN.
inline float exp_nonpositive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t low = -static_cast<int32_t>(x < -87.3f);  // all ones below the floor
  bits = (bits & ~low) | (static_cast<int32_t>(0xc2ae999a) & low);  // -87.3f
  std::memcpy(&x, &bits, sizeof x);
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t scale_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return y * scale;
}

// out[m] = sum_i rows[m * batch + i] in double, in a fixed order: deterministic for any thread
// count (the per-row values come from a parallel loop, the sums never do).
inline void sum_rows(const float* rows, int64_t n_groups, int64_t batch, float* out) {
  for (int64_t m = 0; m < n_groups; ++m) {
    double sum = 0.0;
    for (int64_t i = 0; i < batch; ++i) sum += rows[m * batch + i];
    out[m] = static_cast<float>(sum);
  }
}

// How many of the batch's labels lie outside [0, n_classes): the kernels that index by label
// check them first and report the count instead of reading out of bounds.
inline int64_t labels_out_of_range(const int64_t* labels, int64_t batch, int64_t n_classes) {
  int64_t out_of_range = 0;
#pragma omp simd reduction(+ : out_of_range)
  for (int64_t i = 0; i < batch; ++i) out_of_range += (labels[i] < 0) | (labels[i] >= n_classes);
  return out_of_range;
}

}  // namespace fastbml

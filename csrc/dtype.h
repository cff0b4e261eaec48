// Element storage types of the CPU kernels: float32, bfloat16 and float16, all computed in float32.
// Conversions are branch-free bit arithmetic so that loops over them vectorise.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastbml {

// Matches the codes fastbml/ops/_multi_tensor.py (CPP_DTYPE_CODES) passes for torch.float32 / bfloat16 / float16.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline DType dtype_from_code(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("unsupported dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct BFloat16 {
  uint16_t bits;
};

struct Float16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

inline float to_float(Float16 x) {
  // Rebias the exponent; subnormal halves go through a float subtraction, inf/nan keep all-ones.
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t magnitude = (h & 0x7fffu) << 13;
  const float scaled = bits_float(magnitude) * 5.192296858534828e+33f;  // 2^112: rebias 15 -> 127
  const uint32_t is_special = (h & 0x7c00u) == 0x7c00u;
  const uint32_t finite_bits = float_bits(scaled);
  const uint32_t special_bits = magnitude | 0x7f800000u;
  return bits_float(sign | (is_special ? special_bits : finite_bits));
}

template <typename T>
inline T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline BFloat16 from_float<BFloat16>(float f) {
  // Round to nearest even; NaN stays a quiet NaN.
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return {static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded)};
}

template <>
inline Float16 from_float<Float16>(float f) {
  // Round to nearest even through float arithmetic (the classic magic-number method).
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs_bits = u & 0x7fffffffu;
  const float abs_f = bits_float(abs_bits);
  // Normal range: add rounding bias at bit 13, then rebias the exponent 127 -> 15.
  const uint32_t mant_odd = (abs_bits >> 13) & 1u;
  const uint32_t normal = (abs_bits + 0xc8000fffu + mant_odd) >> 13;  // -(112 << 23) + 0xfff
  // Subnormal range: let the FPU align the mantissa by adding 0.5 (2^-1 has exponent 126).
  const uint32_t subnormal = float_bits(abs_f + 0.5f) - 0x3f000000u;
  const uint32_t overflow = abs_bits >= 0x477ff000u;  // rounds to >= 65520 -> inf
  const uint32_t is_nan = abs_bits > 0x7f800000u;
  uint32_t h = abs_bits < 0x38800000u ? subnormal : normal;
  h = overflow ? 0x7c00u : h;
  h = is_nan ? 0x7e00u : h;
  return {static_cast<uint16_t>(sign | h)};
}

// Calls f with `ptr` cast to the element type of `dtype` (float*, BFloat16* or Float16*).
template <typename F>
auto dispatch(DType dtype, void* ptr, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      return f(static_cast<BFloat16*>(ptr));
    case DType::kFloat16:
      return f(static_cast<Float16*>(ptr));
    default:
      return f(static_cast<float*>(ptr));
  }
}

}  // namespace fastbml

// Multi-tensor "x <- scale[g(t)] * x + (std(x) + eps) * N(0, 1)" over many tensors in one call.
// Phase 1 reduces each tensor's moments from fixed-size chunks (Chan's combine, in a fixed
// order, so the result does not depend on the thread count), unless the caller supplies the
// stds; phase 2 rewrites every chunk in place with the Philox normals of its flattened indices.
// multi_tensor_moments is phase 1 alone: each tensor's (count, sum, sum of squares).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "chunks.h"
#include "dtype.h"
#include "philox.h"
#include "scale_noise.h"
#include "simd.h"

namespace fastbml {
namespace {

constexpr int64_t kTile = 256;  // Philox blocks drawn per inner tile (1024 normals)
// Drawing a normal costs far more than moving a value: the noisy rewrite goes parallel sooner.
constexpr int64_t kParallelNoisy = 1 << 14;

struct Moments {
  double count, mean, m2;
};

template <typename T>
Moments chunk_moments(const T* x, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += to_float(x[i]);
  const double mean = sum / static_cast<double>(n);
  double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = to_float(x[i]) - mean;
    m2 += d * d;
  }
  return {static_cast<double>(n), mean, m2};
}

Moments combine(const Moments& a, const Moments& b) {
  if (a.count == 0.0) return b;
  const double count = a.count + b.count;
  const double delta = b.mean - a.mean;
  return {count, a.mean + delta * b.count / count, a.m2 + b.m2 + delta * delta * a.count * b.count / count};
}

// Normals for the 4 * blocks (blocks <= kTile + 1) flattened indices starting at `first`
// (first % 4 == 0), in index order: normals[i] belongs to index first + i (the interleaved
// stores of the four words vectorise as register permutes, and the consumer then reads them
// contiguously).
void normal_tile(uint64_t seed, uint32_t stream, int64_t first, int64_t blocks, float* normals) {
  const int64_t first_block = first / 4;
#pragma omp simd
  for (int64_t j = 0; j < blocks; ++j) {
    const uint64_t block = static_cast<uint64_t>(first_block + j);
    const Philox4 r = philox4x32(seed, static_cast<uint32_t>(block),
                                 static_cast<uint32_t>(block >> 32), stream, 0u);
    float n0, n1, n2, n3;
    box_muller(uniform_open(r.w0), uniform_open(r.w1), n0, n1);
    box_muller(uniform_open(r.w2), uniform_open(r.w3), n2, n3);
    normals[4 * j] = n0;
    normals[4 * j + 1] = n1;
    normals[4 * j + 2] = n2;
    normals[4 * j + 3] = n3;
  }
}

template <typename T>
void scale_chunk(T* x, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = from_float<T>(scale * to_float(x[i]));
}

// Element i of x draws the normal of flattened index first + i; `first` need not be a multiple
// of 4 (a shard of a tensor starts wherever its rows start): the tiles then begin at the block
// boundary below it and skip its first `skip` draws.
template <typename T>
void scale_noise_chunk(T* x, int64_t n, float scale, float sigma, uint64_t seed, uint32_t stream,
                       int64_t first) {
  alignas(64) float normals[4 * (kTile + 1)];
  const int64_t skip = first % 4;
  for (int64_t t0 = 0; t0 < n; t0 += 4 * kTile) {
    const int64_t len = std::min<int64_t>(4 * kTile, n - t0);
    // only the draws used
    normal_tile(seed, stream, first - skip + t0, (skip + len + 3) / 4, normals);
    const float* z_of = normals + skip;
    T* xt = x + t0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float z = z_of[i];
      xt[i] = from_float<T>(scale * to_float(xt[i]) + sigma * z);
    }
  }
}

FASTBML_SIMD_CLONES
Moments moments_of(DType dtype, void* ptr, int64_t begin, int64_t end) {
  return dispatch(dtype, ptr, [&](auto* x) { return chunk_moments(x + begin, end - begin); });
}

FASTBML_SIMD_CLONES
void rewrite(DType dtype, void* ptr, int64_t begin, int64_t end, float scale, bool noise,
             float sigma, uint64_t seed, uint32_t stream, int64_t first) {
  dispatch(dtype, ptr, [&](auto* x) {
    if (noise)
      scale_noise_chunk(x + begin, end - begin, scale, sigma, seed, stream, first);
    else
      scale_chunk(x + begin, end - begin, scale);
  });
}

// Each tensor's (count, mean, M2), combined from its chunks in a fixed order.
std::vector<Moments> tensor_moments(const std::vector<uintptr_t>& ptrs,
                                    const std::vector<DType>& dtype,
                                    const std::vector<int64_t>& numels) {
  const std::vector<Chunk> chunks = chunk_table(numels, [](int64_t) { return true; });
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<Moments> partial(n_chunks);
#pragma omp parallel for schedule(static) if (chunk_elements(chunks) >= kParallelElements)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    partial[c] = moments_of(dtype[ch.tensor], reinterpret_cast<void*>(ptrs[ch.tensor]), ch.begin, ch.end);
  }
  std::vector<Moments> total(numels.size(), Moments{0.0, 0.0, 0.0});
  for (int64_t c = 0; c < n_chunks; ++c) total[chunks[c].tensor] = combine(total[chunks[c].tensor], partial[c]);
  return total;
}

std::vector<DType> dtypes_of(const std::vector<int>& codes) {
  std::vector<DType> dtype(codes.size());
  for (size_t t = 0; t < codes.size(); ++t) dtype[t] = dtype_from_code(codes[t]);
  return dtype;
}

}  // namespace

void multi_tensor_moments(const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes,
                          const std::vector<int64_t>& numels, uintptr_t out_ptr) {
  double* out = reinterpret_cast<double*>(out_ptr);
  const std::vector<Moments> total = tensor_moments(ptrs, dtypes_of(dtypes), numels);
  for (size_t t = 0; t < total.size(); ++t) {
    out[3 * t] = total[t].count;
    out[3 * t + 1] = total[t].count * total[t].mean;
    out[3 * t + 2] = total[t].m2 + total[t].count * total[t].mean * total[t].mean;
  }
}

void multi_tensor_scale_noise(const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes,
                              const std::vector<int64_t>& numels,
                              const std::vector<int64_t>& offsets,
                              const std::vector<int64_t>& scale_index, uintptr_t scales_ptr,
                              bool noise, uint64_t seed, uint32_t stream, double eps,
                              uintptr_t std_ptr) {
  const int64_t n_tensors = static_cast<int64_t>(ptrs.size());
  const float* scales = reinterpret_cast<const float*>(scales_ptr);
  const std::vector<DType> dtype = dtypes_of(dtypes);
  const std::vector<Chunk> chunks = chunk_table(numels, [](int64_t) { return true; });
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t elements = chunk_elements(chunks);

  std::vector<float> sigma(n_tensors, 0.0f);
  if (noise && std_ptr != 0) {
    const double* std_of = reinterpret_cast<const double*>(std_ptr);
    for (int64_t t = 0; t < n_tensors; ++t) sigma[t] = static_cast<float>(std_of[t] + eps);
  } else if (noise) {
    const std::vector<Moments> total = tensor_moments(ptrs, dtype, numels);
    for (int64_t t = 0; t < n_tensors; ++t) {
      const double var = total[t].count > 1.0 ? total[t].m2 / (total[t].count - 1.0) : 0.0;
      sigma[t] = static_cast<float>(std::sqrt(var) + eps);
    }
  }

#pragma omp parallel for schedule(static) \
    if (elements >= (noise ? kParallelNoisy : kParallelElements))
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    rewrite(dtype[ch.tensor], reinterpret_cast<void*>(ptrs[ch.tensor]), ch.begin, ch.end,
            scales[scale_index[ch.tensor]], noise, sigma[ch.tensor], seed, stream,
            offsets[ch.tensor] + ch.begin);
  }
}

}  // namespace fastbml

#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// In place over tensor t (element storage dtypes[t], numels[t] elements at ptrs[t]):
//   x <- scales[scale_index[t]] * x + (noise ? (std_t + eps) * N(0, 1) : 0)
// where the normal of element i is the Philox draw of flattened index offsets[t] + i (any
// offsets[t] >= 0) and std_t is the unbiased std of x, or std_ptr[t] when std_ptr is not 0
// (float64 values: the std of a whole tensor of which x is a shard). scales_ptr points at
// float32 values.
void multi_tensor_scale_noise(const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes,
                              const std::vector<int64_t>& numels,
                              const std::vector<int64_t>& offsets,
                              const std::vector<int64_t>& scale_index, uintptr_t scales_ptr,
                              bool noise, uint64_t seed, uint32_t stream, double eps,
                              uintptr_t std_ptr);

// Each tensor's (count, sum, sum of squares) in float64, written to out_ptr[3 t .. 3 t + 2]
// (from Chan's combine of fixed-size chunks: the result does not depend on the thread count).
void multi_tensor_moments(const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes,
                          const std::vector<int64_t>& numels, uintptr_t out_ptr);

}  // namespace fastbml

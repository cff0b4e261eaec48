#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// In place over tensor t (element storage dtypes[t], numels[t] elements at ptrs[t]):
//   x <- scales[scale_index[t]] * x + (noise ? (unbiased_std(x) + eps) * N(0, 1) : 0)
// where the normal of element i is the Philox draw of flattened index offsets[t] + i
// (offsets[t] % 4 == 0). scales_ptr points at float32 values.
void multi_tensor_scale_noise(const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes,
                              const std::vector<int64_t>& numels,
                              const std::vector<int64_t>& offsets,
                              const std::vector<int64_t>& scale_index, uintptr_t scales_ptr,
                              bool noise, uint64_t seed, uint32_t stream, double eps);

}  // namespace fastbml

#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// In place over tensor t (element storage dtypes[t], numels[t] elements at ptrs[t]; its target
// has the same dtype and length at target_ptrs[t]), with w = weights[weight_index[t]] (float32):
//   x <- w < 0.5 ? x + w * (y - x) : y - (y - x) * (1 - w)      (computed in float32)
// A tensor whose weight is exactly 0 is not touched (bit-identical, -0.0 and NaN included);
// weight 1 gives the target exactly.
void multi_tensor_lerp(const std::vector<uintptr_t>& ptrs,
                       const std::vector<uintptr_t>& target_ptrs, const std::vector<int>& dtypes,
                       const std::vector<int64_t>& numels, const std::vector<int64_t>& weight_index,
                       uintptr_t weights_ptr);

}  // namespace fastbml

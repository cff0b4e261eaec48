#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// For each pair t of equal-length tensors, a sum s (at sum_ptrs[t]) and one of its parts b (at
// part_ptrs[t]), both of element storage dtypes[t] with numels[t] elements: the Gram entries of
// the split s = (s - b) + b, computed in float64 and written as four doubles at out_ptr + 4 t:
//   ||s - b||^2, <s - b, b>, ||b||^2, ||s||^2
// Each tensor is reduced in fixed-size chunks combined in a fixed order, so the result does not
// depend on the thread count. An empty tensor gives zeros.
void multi_tensor_split_gram(const std::vector<uintptr_t>& sum_ptrs,
                             const std::vector<uintptr_t>& part_ptrs,
                             const std::vector<int>& dtypes, const std::vector<int64_t>& numels,
                             uintptr_t out_ptr);

}  // namespace fastbml

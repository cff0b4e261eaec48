#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// In place over tensor t (element storage dtypes[t], numels[t] elements at x_ptrs[t]; y_ptrs[t]
// holds as many elements of the same dtype), with float32 coefficients a = coeffs[2 t] and
// b = coeffs[2 t + 1] at coeffs_ptr:
//   x <- a * x + b * y      (computed in float32)
void multi_tensor_axpby(const std::vector<uintptr_t>& x_ptrs, const std::vector<uintptr_t>& y_ptrs,
                        const std::vector<int>& dtypes, const std::vector<int64_t>& numels,
                        uintptr_t coeffs_ptr);

}  // namespace fastbml

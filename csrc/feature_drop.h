#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// OPM drop + rescale over M modality buffers in one call (SPEC §2.3, issue 3).
// Modality m holds `batch` rows of dims[m] float elements (storage dtype `dtype`) at in_ptrs[m],
// row r starting at element r * row_strides[m] (columns contiguous); the result goes to the
// contiguous [batch, dims[m]] buffer out_ptrs[m] (which may alias the input when it is
// contiguous). q_ptr points at M float32 drop probabilities.
//   coin      = uniform(seed, stream 1, element 0) >= threshold            (threshold = 1 - p_exe)
//   keep[m,i] = uniform(mask_seed, stream 2, element m * batch + i) >= q[m]
//   theta     = sum_m dims[m] q[m] / sum_m dims[m];  inv = theta < 1 ? 1 / (1 - theta) : 0
//   out[m,i,:] = x[m,i,:] * (coin ? keep[m,i] * inv : 1)
// When weights_ptr is not 0 it receives the float32 per-sample loss weights [batch]:
// kappa_i = coin ? any_m keep[m,i] : 1, weight_i = kappa_i / sum_i kappa_i (0 when that sum is 0).
void opm_drop_scale(const std::vector<uintptr_t>& in_ptrs, const std::vector<uintptr_t>& out_ptrs,
                    int dtype, int64_t batch, const std::vector<int64_t>& dims,
                    const std::vector<int64_t>& row_strides, uintptr_t q_ptr, float threshold,
                    uint64_t seed, uint64_t mask_seed, uintptr_t weights_ptr);

}  // namespace fastbml

#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// Per-row drop + rescale over M row buffers in one call, keyed by counter-based random streams.
// Buffer m holds `batch` rows of dims[m] float elements (storage dtype `dtype`) at in_ptrs[m],
// row r starting at element r * row_strides[m] (columns contiguous); the result goes to the
// contiguous [batch, dims[m]] buffer out_ptrs[m] (which may alias the input when it is
// contiguous). q_ptr points at M float32 drop probabilities.
//   coin      = uniform(seed, coin_stream, element 0) >= threshold
//   keep[m,i] = uniform(mask_seed, mask_stream, element m * batch + i) >= q[m]
//   theta     = sum_m dims[m] q[m] / sum_m dims[m];  inv = theta < 1 ? 1 / (1 - theta) : 0
//   out[m,i,:] = x[m,i,:] * (coin ? keep[m,i] * inv : 1)
// When weights_ptr is not 0 it receives the float32 per-row weights [batch]:
// kappa_i = coin ? any_m keep[m,i] : 1, weight_i = kappa_i / sum_i kappa_i (0 when that sum is 0).
// When executed_ptr is not 0 it receives the coin as one byte (a torch.bool scalar).
void row_drop_scale(const std::vector<uintptr_t>& in_ptrs, const std::vector<uintptr_t>& out_ptrs,
                    int dtype, int64_t batch, const std::vector<int64_t>& dims,
                    const std::vector<int64_t>& row_strides, uintptr_t q_ptr, float threshold,
                    uint64_t seed, uint64_t mask_seed, uint32_t coin_stream,
                    uint32_t mask_stream, uintptr_t weights_ptr, uintptr_t executed_ptr);

}  // namespace fastbml

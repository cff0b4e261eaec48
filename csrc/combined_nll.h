#pragma once

#include <cstdint>

namespace fastbml {

// out[m] = sum_i min(-log_softmax(phi_mi)[labels[i]], max_nll), phi_mi = sum_s weights[m, s] *
// logits[s, i, :], for contiguous logits [S, B, C] of storage dtype `dtype`, float32 weights
// [M, S], int64 labels [B]; float32 out [M], summed in a fixed order. NaN propagates.
// Returns the number of labels outside [0, C); if any, nothing is computed.
int64_t combined_nll_sums(uintptr_t logits_ptr, int dtype, int64_t n_sets, int64_t batch,
                          int64_t n_classes, uintptr_t weights_ptr, int64_t n_groups,
                          uintptr_t labels_ptr, double max_nll, uintptr_t out_ptr);

}  // namespace fastbml

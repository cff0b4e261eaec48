#pragma once

#include <cstdint>
#include <vector>

namespace fastbml {

// out[m] = sum_i softmax(logits_m[i, :])[labels[i]] for M contiguous logits [B, C] (one pointer
// each) of storage dtype `dtype` and int64 labels [B]; float32 out [M], summed in a fixed order.
// Returns the number of labels outside [0, C); if any, nothing is computed.
int64_t true_class_prob_sums(const std::vector<uintptr_t>& logits_ptrs, int dtype, int64_t batch,
                             int64_t n_classes, uintptr_t labels_ptr, uintptr_t out_ptr);

}  // namespace fastbml

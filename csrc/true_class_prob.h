#pragma once

#include <cstdint>

namespace fastbml {

// out[m] = sum_i softmax(logits[m, i, :])[labels[i]] for contiguous logits [M, B, C] of
// storage dtype `dtype` and int64 labels [B]; float32 out [M]. Summed in a fixed order.
void true_class_prob_sums(uintptr_t logits_ptr, int dtype, int64_t n_groups, int64_t batch,
                          int64_t n_classes, uintptr_t labels_ptr, uintptr_t out_ptr);

}  // namespace fastbml

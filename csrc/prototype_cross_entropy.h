#pragma once

#include <cstdint>

namespace fastbml {

// Cross-entropy of a softmax over negative Euclidean distances to class prototypes, per row.
// Features: `batch` rows of `dim` elements of storage dtype `dtype`, row r at element
// r * row_stride (columns contiguous). Prototypes: contiguous float32 [n_classes, dim]. Mask:
// n_classes bytes (1: the class takes part in the softmax). Labels: int64 [batch].
//   d[i,c] = ||f_i - P_c||,  lse_i = log sum_{c in mask} exp(-d[i,c]),
//   loss_i = mask[y_i] ? lse_i + d[i,y_i] : 0   (-inf lse when the mask is empty)
// A row with a non-finite distance to a class in the mask gets NaN. Writes float32 loss [batch]
// and lse [batch]; returns the number of labels outside [0, n_classes) (nothing is computed then).
int64_t prototype_cross_entropy_forward(uintptr_t features_ptr, int dtype, int64_t batch,
                                        int64_t dim, int64_t row_stride, uintptr_t prototypes_ptr,
                                        int64_t n_classes, uintptr_t mask_ptr,
                                        uintptr_t labels_ptr, uintptr_t loss_ptr,
                                        uintptr_t lse_ptr);

// The gradient of sum_i grad[i] * loss_i with respect to the features, into the contiguous
// [batch, dim] buffer out_ptr (dtype `dtype`), from the forward's lse [batch]:
//   a[i,c] = grad_i (p[i,c] - [c = y_i]) / d[i,c]   (0 when d[i,c] = 0; p = 0 outside the mask)
//   out_i  = sum_c a[i,c] P_c - f_i sum_c a[i,c]    (0 for a row whose label is outside the mask)
// with p[i,c] = exp(-d[i,c] - lse_i). grad is float32 [batch]; labels are trusted.
void prototype_cross_entropy_backward(uintptr_t grad_ptr, uintptr_t features_ptr, int dtype,
                                      int64_t batch, int64_t dim, int64_t row_stride,
                                      uintptr_t prototypes_ptr, int64_t n_classes,
                                      uintptr_t mask_ptr, uintptr_t labels_ptr,
                                      uintptr_t lse_ptr, uintptr_t out_ptr);

}  // namespace fastbml

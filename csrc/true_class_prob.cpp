// Per-group sums of the softmax probability each row gives its label (all groups in one call).
#include <cmath>
#include <cstdint>
#include <vector>

#include "dtype.h"
#include "fastmath.h"
#include "simd.h"
#include "true_class_prob.h"

namespace fastbml {
namespace {

template <typename T>
float row_true_prob(const T* row, int64_t n_classes, int64_t label) {
  float peak = -INFINITY;
  float sum = 0.0f;  // only to detect NaN, which the max skips
#pragma omp simd reduction(max : peak) reduction(+ : sum)
  for (int64_t c = 0; c < n_classes; ++c) {
    const float x = to_float(row[c]);
    peak = x > peak ? x : peak;
    sum += x;
  }
  if (sum != sum || peak == INFINITY) return NAN;  // as the softmax of such a row
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < n_classes; ++c) total += exp_nonpositive(to_float(row[c]) - peak);
  return exp_nonpositive(to_float(row[label]) - peak) / total;
}

FASTBML_SIMD_CLONES
float true_prob(DType dtype, uintptr_t logits, int64_t row, int64_t n_classes, int64_t label) {
  const int64_t offset = row * n_classes;
  switch (dtype) {
    case DType::kBFloat16:
      return row_true_prob(reinterpret_cast<const BFloat16*>(logits) + offset, n_classes, label);
    case DType::kFloat16:
      return row_true_prob(reinterpret_cast<const Float16*>(logits) + offset, n_classes, label);
    default:
      return row_true_prob(reinterpret_cast<const float*>(logits) + offset, n_classes, label);
  }
}

}  // namespace

void true_class_prob_sums(uintptr_t logits_ptr, int dtype, int64_t n_groups, int64_t batch,
                          int64_t n_classes, uintptr_t labels_ptr, uintptr_t out_ptr) {
  const DType dt = dtype_from_code(dtype);
  const int64_t* labels = reinterpret_cast<const int64_t*>(labels_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  const int64_t rows = n_groups * batch;
  std::vector<float> prob(rows);
#pragma omp parallel for schedule(static) if (rows * n_classes > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) prob[r] = true_prob(dt, logits_ptr, r, n_classes, labels[r % batch]);
  for (int64_t m = 0; m < n_groups; ++m) {  // fixed order: deterministic for any thread count
    double sum = 0.0;
    for (int64_t i = 0; i < batch; ++i) sum += prob[m * batch + i];
    out[m] = static_cast<float>(sum);
  }
}

}  // namespace fastbml

// Per-group sums of the softmax probability each row gives its label (all groups in one call).
#include <cmath>
#include <cstdint>
#include <vector>

#include "dtype.h"
#include "true_class_prob.h"

namespace fastbml {
namespace {

template <typename T>
double row_true_prob(const T* row, int64_t n_classes, int64_t label) {
  float peak = -INFINITY;
  for (int64_t c = 0; c < n_classes; ++c) peak = std::fmax(peak, to_float(row[c]));
  double total = 0.0;
  for (int64_t c = 0; c < n_classes; ++c) total += std::exp(static_cast<double>(to_float(row[c]) - peak));
  return std::exp(static_cast<double>(to_float(row[label]) - peak)) / total;
}

}  // namespace

void true_class_prob_sums(uintptr_t logits_ptr, int dtype, int64_t n_groups, int64_t batch,
                          int64_t n_classes, uintptr_t labels_ptr, uintptr_t out_ptr) {
  const DType dt = dtype_from_code(dtype);
  const int64_t* labels = reinterpret_cast<const int64_t*>(labels_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  const int64_t rows = n_groups * batch;
  std::vector<double> prob(rows);
#pragma omp parallel for schedule(static) if (rows * n_classes > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t label = labels[r % batch];
    const int64_t offset = r * n_classes;
    switch (dt) {
      case DType::kBFloat16:
        prob[r] = row_true_prob(reinterpret_cast<const BFloat16*>(logits_ptr) + offset, n_classes, label);
        break;
      case DType::kFloat16:
        prob[r] = row_true_prob(reinterpret_cast<const Float16*>(logits_ptr) + offset, n_classes, label);
        break;
      default:
        prob[r] = row_true_prob(reinterpret_cast<const float*>(logits_ptr) + offset, n_classes, label);
    }
  }
  for (int64_t m = 0; m < n_groups; ++m) {
    double sum = 0.0;
    for (int64_t i = 0; i < batch; ++i) sum += prob[m * batch + i];
    out[m] = static_cast<float>(sum);
  }
}

}  // namespace fastbml

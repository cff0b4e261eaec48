// Per-group sums of the softmax probability each row gives its label (all groups in one call).
// Rows are short (C is the class count), so exp() runs over a whole tile of rows at once: one
// long loop the compiler vectorises, instead of one short loop per row.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dtype.h"
#include "fastmath.h"
#include "simd.h"
#include "true_class_prob.h"

namespace fastbml {
namespace {

constexpr int64_t kTileElements = 8192;  // shifted logits of a tile of rows, kept in L1/L2

// prob[r] for rows [first, last) of the groups' rows laid end to end (row r is row r % batch of
// group r / batch); NaN for a row holding NaN or +inf.
template <typename T>
void tile_true_probs(const uintptr_t* groups, const int64_t* labels, int64_t batch,
                     int64_t n_classes, int64_t first, int64_t last, float* shifted, float* prob) {
  for (int64_t r = first; r < last; ++r) {
    const T* row = reinterpret_cast<const T*>(groups[r / batch]) + (r % batch) * n_classes;
    float* out = shifted + (r - first) * n_classes;
    float peak = -INFINITY;  // a NaN entry is skipped here and caught through the sum below
#pragma omp simd reduction(max : peak)
    for (int64_t c = 0; c < n_classes; ++c) peak = std::max(peak, to_float(row[c]));
    for (int64_t c = 0; c < n_classes; ++c) out[c] = to_float(row[c]) - peak;
  }
  const int64_t n = (last - first) * n_classes;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) shifted[i] = exp_nonpositive(shifted[i]);
  for (int64_t r = first; r < last; ++r) {
    const float* e = shifted + (r - first) * n_classes;
    float total = 0.0f;  // NaN if the row holds NaN or +inf (x - peak is then NaN)
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < n_classes; ++c) total += e[c];
    prob[r] = e[labels[r % batch]] / total;
  }
}

FASTBML_SIMD_CLONES
void true_probs(DType dtype, const uintptr_t* groups, const int64_t* labels, int64_t batch,
                int64_t n_classes, int64_t first, int64_t last, float* shifted, float* prob) {
  // the pointer only selects the element type; the groups' own pointers are read inside
  dispatch(dtype, nullptr, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    tile_true_probs<T>(groups, labels, batch, n_classes, first, last, shifted, prob);
  });
}

}  // namespace

int64_t true_class_prob_sums(const std::vector<uintptr_t>& logits_ptrs, int dtype, int64_t batch,
                             int64_t n_classes, uintptr_t labels_ptr, uintptr_t out_ptr) {
  const DType dt = dtype_from_code(dtype);
  const int64_t* labels = reinterpret_cast<const int64_t*>(labels_ptr);
  if (const int64_t bad = labels_out_of_range(labels, batch, n_classes)) return bad;
  float* out = reinterpret_cast<float*>(out_ptr);
  const int64_t n_groups = static_cast<int64_t>(logits_ptrs.size());
  const int64_t rows = n_groups * batch;
  const int64_t tile_rows = std::max<int64_t>(1, kTileElements / n_classes);
  const int64_t n_tiles = (rows + tile_rows - 1) / tile_rows;
  std::vector<float> prob(rows);
#pragma omp parallel if (rows * n_classes > (1 << 16))
  {
    std::vector<float> shifted(tile_rows * n_classes);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t)
      true_probs(dt, logits_ptrs.data(), labels, batch, n_classes, t * tile_rows,
                 std::min(rows, (t + 1) * tile_rows), shifted.data(), prob.data());
  }
  sum_rows(prob.data(), n_groups, batch, out);
  return 0;
}

}  // namespace fastbml

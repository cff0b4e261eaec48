// Cross-entropy of linear combinations of logit sets: for each group m and row i the combined
// row phi = sum_s w[m, s] x[s, i, :] is formed once in a row buffer (float32), then its
// log-sum-exp and the label's entry give the row's NLL, clamped from above.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "combined_nll.h"
#include "dtype.h"
#include "fastmath.h"
#include "simd.h"

namespace fastbml {
namespace {

template <typename T>
void rows_nll(const T* x, int64_t n_sets, int64_t batch, int64_t n_classes, const float* w,
              int64_t n_groups, const int64_t* labels, float max_nll, int64_t first,
              int64_t last, float* phi, float* nll) {
  const int64_t set_stride = batch * n_classes;
  for (int64_t i = first; i < last; ++i) {
    const T* row = x + i * n_classes;
    for (int64_t m = 0; m < n_groups; ++m) {
      const float* wm = w + m * n_sets;
      for (int64_t c = 0; c < n_classes; ++c) phi[c] = 0.0f;
      for (int64_t s = 0; s < n_sets; ++s) {
        const float ws = wm[s];
        if (ws == 0.0f) continue;  // a set outside this combination
        const T* src = row + s * set_stride;
#pragma omp simd
        for (int64_t c = 0; c < n_classes; ++c) phi[c] += ws * to_float(src[c]);
      }
      float peak = -INFINITY;  // a NaN entry is skipped here and caught through the sum below
#pragma omp simd reduction(max : peak)
      for (int64_t c = 0; c < n_classes; ++c) peak = std::max(peak, phi[c]);
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t c = 0; c < n_classes; ++c) total += exp_nonpositive(phi[c] - peak);
      const float value = peak + std::log(total) - phi[labels[i]];
      nll[m * batch + i] = value > max_nll ? max_nll : value;  // NaN stays NaN
    }
  }
}

FASTBML_SIMD_CLONES
void nll_tile(DType dtype, const void* x, int64_t n_sets, int64_t batch, int64_t n_classes,
              const float* w, int64_t n_groups, const int64_t* labels, float max_nll,
              int64_t first, int64_t last, float* phi, float* nll) {
  dispatch(dtype, const_cast<void*>(x), [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    rows_nll<T>(typed, n_sets, batch, n_classes, w, n_groups, labels, max_nll, first, last, phi,
                nll);
  });
}

}  // namespace

int64_t combined_nll_sums(uintptr_t logits_ptr, int dtype, int64_t n_sets, int64_t batch,
                          int64_t n_classes, uintptr_t weights_ptr, int64_t n_groups,
                          uintptr_t labels_ptr, double max_nll, uintptr_t out_ptr) {
  const DType dt = dtype_from_code(dtype);
  const int64_t* labels = reinterpret_cast<const int64_t*>(labels_ptr);
  if (const int64_t bad = labels_out_of_range(labels, batch, n_classes)) return bad;
  const void* x = reinterpret_cast<const void*>(logits_ptr);
  const float* w = reinterpret_cast<const float*>(weights_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  std::vector<float> nll(n_groups * batch);
  const int64_t tile = 64;
  const int64_t n_tiles = (batch + tile - 1) / tile;
  const float cap = static_cast<float>(max_nll);
#pragma omp parallel if (batch * n_classes * n_sets > (1 << 16))
  {
    std::vector<float> phi(n_classes);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t)
      nll_tile(dt, x, n_sets, batch, n_classes, w, n_groups, labels, cap, t * tile,
               std::min(batch, (t + 1) * tile), phi.data(), nll.data());
  }
  sum_rows(nll.data(), n_groups, batch, out);
  return 0;
}

}  // namespace fastbml

// Prototype cross-entropy, forward and backward, one row at a time: the row is converted to
// float32 once, its C distances are computed by direct differences (no ||f||^2 + ||P||^2 - 2 f.P
// cancellation, so a zero distance is exactly zero), and the softmax terms run over the row's
// C distances in one vectorised loop. Rows are independent: OpenMP splits them.
#include "prototype_cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dtype.h"
#include "fastmath.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastbml {
namespace {

// Below this many multiply-adds (batch * classes * dim) the rows run on the calling thread.
constexpr int64_t kParallelWork = 1 << 18;

struct Problem {
  const void* features;
  DType dtype;
  int64_t batch, dim, row_stride, n_classes;
  const float* prototypes;
  const uint8_t* mask;
  const int64_t* labels;
};

// f (float32 [dim]) <- row r of the features; dist[c] <- ||f - P_c||.
template <typename T>
void row_distances(const Problem& pb, int64_t r, float* f, float* dist) {
  const T* row = static_cast<const T*>(pb.features) + r * pb.row_stride;
  const int64_t dim = pb.dim;
#pragma omp simd
  for (int64_t k = 0; k < dim; ++k) f[k] = to_float(row[k]);
  for (int64_t c = 0; c < pb.n_classes; ++c) {
    const float* p = pb.prototypes + c * dim;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < dim; ++k) {
      const float diff = f[k] - p[k];
      acc += diff * diff;
    }
    dist[c] = std::sqrt(acc);
  }
}

// log sum_{c in mask} exp(-dist[c]): -inf for an empty mask, NaN if a masked-in distance is
// not finite. `e` receives exp(-dist[c] - nearest) (0 outside the mask).
float row_logsumexp(const Problem& pb, const float* dist, float* e) {
  float nearest = INFINITY;
  int bad = 0;
  for (int64_t c = 0; c < pb.n_classes; ++c) {
    if (!pb.mask[c]) continue;
    bad |= !std::isfinite(dist[c]);
    nearest = std::min(nearest, dist[c]);
  }
  if (bad) return NAN;
  if (nearest == INFINITY) return -INFINITY;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < pb.n_classes; ++c) {
    e[c] = pb.mask[c] ? exp_nonpositive(nearest - dist[c]) : 0.0f;
    total += e[c];
  }
  return std::log(total) - nearest;
}

template <typename T>
void forward_rows(const Problem& pb, int64_t first, int64_t last, float* loss, float* lse) {
  std::vector<float> f(pb.dim), dist(pb.n_classes), e(pb.n_classes);
  for (int64_t r = first; r < last; ++r) {
    row_distances<T>(pb, r, f.data(), dist.data());
    const float l = row_logsumexp(pb, dist.data(), e.data());
    const int64_t y = pb.labels[r];
    lse[r] = l;
    loss[r] = pb.mask[y] ? l + dist[y] : 0.0f;
  }
}

template <typename T>
void backward_rows(const Problem& pb, const float* grad, const float* lse, T* out, int64_t first,
                   int64_t last) {
  const int64_t dim = pb.dim, n_classes = pb.n_classes;
  std::vector<float> f(dim), dist(n_classes), a(n_classes), acc(dim);
  for (int64_t r = first; r < last; ++r) {
    T* o = out + r * dim;
    const int64_t y = pb.labels[r];
    if (!pb.mask[y]) {  // an ignored row
      for (int64_t k = 0; k < dim; ++k) o[k] = from_float<T>(0.0f);
      continue;
    }
    row_distances<T>(pb, r, f.data(), dist.data());
    const float g = grad[r], l = lse[r];
    float rowsum = 0.0f;
#pragma omp simd reduction(+ : rowsum)
    for (int64_t c = 0; c < n_classes; ++c) {
      const float d = dist[c];
      const float p = pb.mask[c] ? exp_nonpositive(-d - l) : 0.0f;
      const float target = c == y ? 1.0f : 0.0f;
      // the norm's subgradient 0 at d = 0; a NaN distance stays NaN
      a[c] = d != 0.0f ? g * (p - target) / d : 0.0f;
      rowsum += a[c];
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t c = 0; c < n_classes; ++c) {
      const float ac = a[c];
      const float* p = pb.prototypes + c * dim;
#pragma omp simd
      for (int64_t k = 0; k < dim; ++k) acc[k] += ac * p[k];
    }
#pragma omp simd
    for (int64_t k = 0; k < dim; ++k) o[k] = from_float<T>(acc[k] - f[k] * rowsum);
  }
}

// body(first, last) over contiguous shares of the rows, one per thread when the work is large
// enough (each share allocates its row buffers once).
template <typename Body>
void split_rows(const Problem& pb, Body&& body) {
  const int64_t n = pb.batch;
#pragma omp parallel if (n * pb.n_classes * pb.dim > kParallelWork)
  {
    int64_t threads = 1, id = 0;
#ifdef _OPENMP
    threads = omp_get_num_threads();
    id = omp_get_thread_num();
#endif
    body(n * id / threads, n * (id + 1) / threads);
  }
}

FASTBML_SIMD_CLONES
void forward_all(const Problem& pb, float* loss, float* lse) {
  dispatch(pb.dtype, nullptr, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    split_rows(pb, [&](int64_t first, int64_t last) { forward_rows<T>(pb, first, last, loss, lse); });
  });
}

FASTBML_SIMD_CLONES
void backward_all(const Problem& pb, const float* grad, const float* lse, void* out) {
  dispatch(pb.dtype, out, [&](auto* typed_out) {
    using T = std::remove_pointer_t<decltype(typed_out)>;
    split_rows(pb, [&](int64_t first, int64_t last) {
      backward_rows<T>(pb, grad, lse, typed_out, first, last);
    });
  });
}

Problem problem(uintptr_t features_ptr, int dtype, int64_t batch, int64_t dim, int64_t row_stride,
                uintptr_t prototypes_ptr, int64_t n_classes, uintptr_t mask_ptr,
                uintptr_t labels_ptr) {
  return {reinterpret_cast<const void*>(features_ptr), dtype_from_code(dtype), batch, dim,
          row_stride, n_classes, reinterpret_cast<const float*>(prototypes_ptr),
          reinterpret_cast<const uint8_t*>(mask_ptr), reinterpret_cast<const int64_t*>(labels_ptr)};
}

}  // namespace

int64_t prototype_cross_entropy_forward(uintptr_t features_ptr, int dtype, int64_t batch,
                                        int64_t dim, int64_t row_stride, uintptr_t prototypes_ptr,
                                        int64_t n_classes, uintptr_t mask_ptr,
                                        uintptr_t labels_ptr, uintptr_t loss_ptr,
                                        uintptr_t lse_ptr) {
  const Problem pb = problem(features_ptr, dtype, batch, dim, row_stride, prototypes_ptr,
                             n_classes, mask_ptr, labels_ptr);
  int64_t out_of_range = 0;
#pragma omp simd reduction(+ : out_of_range)
  for (int64_t i = 0; i < batch; ++i)
    out_of_range += (pb.labels[i] < 0) | (pb.labels[i] >= n_classes);
  if (out_of_range) return out_of_range;
  forward_all(pb, reinterpret_cast<float*>(loss_ptr), reinterpret_cast<float*>(lse_ptr));
  return 0;
}

void prototype_cross_entropy_backward(uintptr_t grad_ptr, uintptr_t features_ptr, int dtype,
                                      int64_t batch, int64_t dim, int64_t row_stride,
                                      uintptr_t prototypes_ptr, int64_t n_classes,
                                      uintptr_t mask_ptr, uintptr_t labels_ptr,
                                      uintptr_t lse_ptr, uintptr_t out_ptr) {
  const Problem pb = problem(features_ptr, dtype, batch, dim, row_stride, prototypes_ptr,
                             n_classes, mask_ptr, labels_ptr);
  backward_all(pb, reinterpret_cast<const float*>(grad_ptr),
               reinterpret_cast<const float*>(lse_ptr), reinterpret_cast<void*>(out_ptr));
}

}  // namespace fastbml

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

// Below this many multiply-adds (batch * classes * dim; 2^24 is about 2 ms on one core) the rows
// run on the calling thread: waking the OpenMP team costs more, and on a busy machine a
// descheduled thread stalls the whole call.
constexpr int64_t kParallelWork = 1 << 24;
constexpr int64_t kRowTile = 8;  // rows sharing each prototype read (8 x 512 floats: 16 KiB)

struct Problem {
  const void* features;
  DType dtype;
  int64_t batch, dim, row_stride, n_classes;
  const float* prototypes;
  const uint8_t* mask;
  const int64_t* labels;
};

// f (float32 [rows, dim]) <- rows r0 .. r0 + rows - 1 of the features; dist[r * C + c] <-
// ||f_r - P_c||. Each prototype is read once per tile of rows (it stays in L1 while the tile's
// rows use it), not once per row.
template <typename T>
void tile_distances(const Problem& pb, int64_t r0, int64_t rows, float* f, float* dist) {
  const int64_t dim = pb.dim, n_classes = pb.n_classes;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = static_cast<const T*>(pb.features) + (r0 + r) * pb.row_stride;
    float* fr = f + r * dim;
#pragma omp simd
    for (int64_t k = 0; k < dim; ++k) fr[k] = to_float(row[k]);
  }
  for (int64_t c = 0; c < n_classes; ++c) {
    const float* p = pb.prototypes + c * dim;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {  // four independent sums: not bound by the add latency
      const float* f0 = f + r * dim;
      const float *f1 = f0 + dim, *f2 = f1 + dim, *f3 = f2 + dim;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < dim; ++k) {
        const float pk = p[k];
        const float d0 = f0[k] - pk, d1 = f1[k] - pk, d2 = f2[k] - pk, d3 = f3[k] - pk;
        a0 += d0 * d0;
        a1 += d1 * d1;
        a2 += d2 * d2;
        a3 += d3 * d3;
      }
      dist[r * n_classes + c] = std::sqrt(a0);
      dist[(r + 1) * n_classes + c] = std::sqrt(a1);
      dist[(r + 2) * n_classes + c] = std::sqrt(a2);
      dist[(r + 3) * n_classes + c] = std::sqrt(a3);
    }
    for (; r < rows; ++r) {
      const float* fr = f + r * dim;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < dim; ++k) {
        const float diff = fr[k] - p[k];
        acc += diff * diff;
      }
      dist[r * n_classes + c] = std::sqrt(acc);
    }
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
  const int64_t n_classes = pb.n_classes;
  std::vector<float> f(kRowTile * pb.dim), dist(kRowTile * n_classes), e(n_classes);
  for (int64_t r0 = first; r0 < last; r0 += kRowTile) {
    const int64_t rows = std::min(kRowTile, last - r0);
    tile_distances<T>(pb, r0, rows, f.data(), dist.data());
    for (int64_t r = 0; r < rows; ++r) {
      const float* d = dist.data() + r * n_classes;
      const float l = row_logsumexp(pb, d, e.data());
      const int64_t y = pb.labels[r0 + r];
      lse[r0 + r] = l;
      loss[r0 + r] = pb.mask[y] ? l + d[y] : 0.0f;
    }
  }
}

// acc[r] = sum_c a[r * C + c] P_c for the tile's rows: two rows and kSpan columns at a time,
// held in registers across the classes (each prototype chunk is loaded once for both rows, and
// the accumulators are never reloaded).
constexpr int64_t kSpan = 32;

void accumulate_prototypes(const Problem& pb, const float* a, int64_t rows, float* acc) {
  const int64_t dim = pb.dim, n_classes = pb.n_classes;
  for (int64_t r = 0; r < rows; r += 2) {
    const bool pair = r + 1 < rows;
    const float* a0 = a + r * n_classes;
    const float* a1 = pair ? a0 + n_classes : a0;
    for (int64_t k0 = 0; k0 < dim; k0 += kSpan) {
      const int64_t span = std::min(kSpan, dim - k0);
      float s0[kSpan] = {}, s1[kSpan] = {};
      if (span == kSpan) {
        for (int64_t c = 0; c < n_classes; ++c) {
          const float* p = pb.prototypes + c * dim + k0;
          const float w0 = a0[c], w1 = a1[c];
#pragma omp simd
          for (int64_t k = 0; k < kSpan; ++k) {
            s0[k] += w0 * p[k];
            s1[k] += w1 * p[k];
          }
        }
      } else {
        for (int64_t c = 0; c < n_classes; ++c) {
          const float* p = pb.prototypes + c * dim + k0;
          for (int64_t k = 0; k < span; ++k) {
            s0[k] += a0[c] * p[k];
            s1[k] += a1[c] * p[k];
          }
        }
      }
      std::copy(s0, s0 + span, acc + r * dim + k0);
      if (pair) std::copy(s1, s1 + span, acc + (r + 1) * dim + k0);
    }
  }
}

template <typename T>
void backward_rows(const Problem& pb, const float* grad, const float* lse, T* out, int64_t first,
                   int64_t last) {
  const int64_t dim = pb.dim, n_classes = pb.n_classes;
  std::vector<float> f(kRowTile * dim), dist(kRowTile * n_classes), a(kRowTile * n_classes),
      acc(kRowTile * dim);
  float rowsum[kRowTile];
  for (int64_t r0 = first; r0 < last; r0 += kRowTile) {
    const int64_t rows = std::min(kRowTile, last - r0);
    tile_distances<T>(pb, r0, rows, f.data(), dist.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = pb.labels[r0 + r];
      const float g = pb.mask[y] ? grad[r0 + r] : 0.0f, l = lse[r0 + r];
      const float* d = dist.data() + r * n_classes;
      float* ar = a.data() + r * n_classes;
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t c = 0; c < n_classes; ++c) {
        const float p = pb.mask[c] ? exp_nonpositive(-d[c] - l) : 0.0f;
        const float target = c == y ? 1.0f : 0.0f;
        // the norm's subgradient 0 at d = 0; a NaN distance stays NaN
        ar[c] = d[c] != 0.0f ? g * (p - target) / d[c] : 0.0f;
        total += ar[c];
      }
      rowsum[r] = total;
    }
    accumulate_prototypes(pb, a.data(), rows, acc.data());
    for (int64_t r = 0; r < rows; ++r) {
      T* o = out + (r0 + r) * dim;
      const float* accr = acc.data() + r * dim;
      const float* fr = f.data() + r * dim;
      const float sum = rowsum[r];
      if (!pb.mask[pb.labels[r0 + r]]) {  // an ignored row
        for (int64_t k = 0; k < dim; ++k) o[k] = from_float<T>(0.0f);
        continue;
      }
#pragma omp simd
      for (int64_t k = 0; k < dim; ++k) o[k] = from_float<T>(accr[k] - fr[k] * sum);
    }
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

// The row loops for the storage dtype, cloned per instruction set (called from inside the
// parallel region, whose outlined body the clones of a caller would not cover).
FASTBML_SIMD_CLONES
void forward_share(const Problem& pb, int64_t first, int64_t last, float* loss, float* lse) {
  dispatch(pb.dtype, nullptr, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    forward_rows<T>(pb, first, last, loss, lse);
  });
}

FASTBML_SIMD_CLONES
void backward_share(const Problem& pb, const float* grad, const float* lse, void* out,
                    int64_t first, int64_t last) {
  dispatch(pb.dtype, out, [&](auto* typed_out) {
    using T = std::remove_pointer_t<decltype(typed_out)>;
    backward_rows<T>(pb, grad, lse, typed_out, first, last);
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
  if (const int64_t bad = labels_out_of_range(pb.labels, batch, n_classes)) return bad;
  float* loss = reinterpret_cast<float*>(loss_ptr);
  float* lse = reinterpret_cast<float*>(lse_ptr);
  split_rows(pb, [&](int64_t first, int64_t last) { forward_share(pb, first, last, loss, lse); });
  return 0;
}

void prototype_cross_entropy_backward(uintptr_t grad_ptr, uintptr_t features_ptr, int dtype,
                                      int64_t batch, int64_t dim, int64_t row_stride,
                                      uintptr_t prototypes_ptr, int64_t n_classes,
                                      uintptr_t mask_ptr, uintptr_t labels_ptr,
                                      uintptr_t lse_ptr, uintptr_t out_ptr) {
  const Problem pb = problem(features_ptr, dtype, batch, dim, row_stride, prototypes_ptr,
                             n_classes, mask_ptr, labels_ptr);
  const float* grad = reinterpret_cast<const float*>(grad_ptr);
  const float* lse = reinterpret_cast<const float*>(lse_ptr);
  void* out = reinterpret_cast<void*>(out_ptr);
  split_rows(pb, [&](int64_t first, int64_t last) {
    backward_share(pb, grad, lse, out, first, last);
  });
}

}  // namespace fastbml

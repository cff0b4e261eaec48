// Fused per-row drop + rescale. The per-row factors (coin, Bernoulli keep mask, 1/(1-theta)) are
// M * B numbers, drawn here from the Philox streams each call (forward and backward alike), so
// nothing but the seeds has to be kept between the two; the elementwise pass then scales every
// row of every buffer by its factor.
#include "row_drop.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "dtype.h"
#include "philox.h"
#include "simd.h"

namespace fastbml {
namespace {

constexpr int64_t kWorkElements = 1 << 15;  // elements per parallel work item (whole rows)
// Below these sizes a parallel region costs more than it saves (and on a busy machine a
// barrier can wait for a descheduled thread), so the loops run on the calling thread.
constexpr int64_t kParallelBlocks = 1 << 12;  // Philox blocks (4 draws each)
constexpr int64_t kDrawChunk = 1 << 10;       // Philox blocks per parallel work item

Philox4 block_words(uint64_t seed, uint32_t stream, int64_t block) {
  const uint64_t b = static_cast<uint64_t>(block);
  return philox4x32(seed, static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), stream, 0u);
}

// keep[k] = (mask uniform of element k) >= q[k / batch] for the 4 * n_blocks elements of blocks
// first .. first + n_blocks - 1; elements past n_rows (the last block's padding) compare with
// the last buffer's q and are never read.
FASTBML_SIMD_CLONES
void draw_keep(uint64_t seed, uint32_t stream, const float* q, int64_t batch, int64_t n_rows, int64_t first,
               int64_t n_blocks, uint8_t* keep) {
#pragma omp simd
  for (int64_t b = first; b < first + n_blocks; ++b) {
    const Philox4 r = block_words(seed, stream, b);
    const int64_t k = 4 * b;
    keep[k] = uniform_open(r.w0) >= q[std::min(k, n_rows - 1) / batch];
    keep[k + 1] = uniform_open(r.w1) >= q[std::min(k + 1, n_rows - 1) / batch];
    keep[k + 2] = uniform_open(r.w2) >= q[std::min(k + 2, n_rows - 1) / batch];
    keep[k + 3] = uniform_open(r.w3) >= q[std::min(k + 3, n_rows - 1) / batch];
  }
}

template <typename T>
void scale_rows(const T* x, T* out, int64_t rows, int64_t dim, int64_t row_stride,
                const float* factor) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * row_stride;
    T* yr = out + r * dim;
    const float s = factor[r];
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) yr[j] = from_float<T>(s * to_float(xr[j]));
  }
}

FASTBML_SIMD_CLONES
void scale_rows_any(DType dtype, uintptr_t in, uintptr_t out, int64_t first_row, int64_t rows,
                    int64_t dim, int64_t row_stride, const float* factor) {
  dispatch(dtype, reinterpret_cast<void*>(out), [&](auto* y) {
    using T = std::remove_pointer_t<decltype(y)>;
    scale_rows(reinterpret_cast<const T*>(in) + first_row * row_stride, y + first_row * dim, rows,
               dim, row_stride, factor);
  });
}

struct Work {
  int64_t buffer, first_row, rows;
};

}  // namespace

void row_drop_scale(const std::vector<uintptr_t>& in_ptrs, const std::vector<uintptr_t>& out_ptrs,
                    int dtype_code, int64_t batch, const std::vector<int64_t>& dims,
                    const std::vector<int64_t>& row_strides, uintptr_t q_ptr, float threshold,
                    uint64_t seed, uint64_t mask_seed, uint32_t coin_stream,
                    uint32_t mask_stream, uintptr_t weights_ptr, uintptr_t executed_ptr) {
  const DType dtype = dtype_from_code(dtype_code);
  const int64_t n_mod = static_cast<int64_t>(dims.size());
  const float* q = reinterpret_cast<const float*>(q_ptr);

  float weighted = 0.0f;
  int64_t total_dim = 0;
  for (int64_t m = 0; m < n_mod; ++m) {
    weighted += static_cast<float>(dims[m]) * q[m];
    total_dim += dims[m];
  }
  const float theta = total_dim > 0 ? weighted / static_cast<float>(total_dim) : 0.0f;
  const float inv = theta < 1.0f ? 1.0f / (1.0f - theta) : 0.0f;
  const bool executed = uniform_open(block_words(seed, coin_stream, 0).w0) >= threshold;
  if (executed_ptr != 0) *reinterpret_cast<uint8_t*>(executed_ptr) = executed ? 1 : 0;

  // keep[m * batch + i]: whether row i of buffer m survives (all rows when the coin says no);
  // factor: what that row is multiplied by.
  const int64_t n_rows = n_mod * batch;
  const int64_t n_blocks = (n_rows + 3) / 4;
  std::vector<uint8_t> keep(static_cast<size_t>(4 * n_blocks), 1);
  std::vector<float> factor(static_cast<size_t>(n_rows), 1.0f);
  if (executed) {
#pragma omp parallel for schedule(static) if (n_blocks >= kParallelBlocks)
    for (int64_t first = 0; first < n_blocks; first += kDrawChunk)
      draw_keep(mask_seed, mask_stream, q, batch, n_rows, first, std::min(kDrawChunk, n_blocks - first),
                keep.data());
    for (int64_t k = 0; k < n_rows; ++k) factor[k] = keep[k] ? inv : 0.0f;
  }

  if (weights_ptr != 0) {
    float* weights = reinterpret_cast<float*>(weights_ptr);
    float kept = 0.0f;  // an exact count (< 2^24 rows)
    for (int64_t i = 0; i < batch; ++i) {
      uint8_t any = 0;
      for (int64_t m = 0; m < n_mod; ++m) any |= keep[m * batch + i];
      weights[i] = any ? 1.0f : 0.0f;
      kept += weights[i];
    }
    const float norm = kept > 0.0f ? 1.0f / kept : 0.0f;
    for (int64_t i = 0; i < batch; ++i) weights[i] *= norm;
  }

  std::vector<Work> work;
  int64_t elements = 0;
  for (int64_t m = 0; m < n_mod; ++m) {
    const int64_t rows_per_item = std::max<int64_t>(1, kWorkElements / std::max<int64_t>(dims[m], 1));
    for (int64_t r = 0; r < batch && dims[m] > 0; r += rows_per_item)
      work.push_back({m, r, std::min(rows_per_item, batch - r)});
    elements += batch * dims[m];
  }
  const int64_t n_work = static_cast<int64_t>(work.size());
#pragma omp parallel for schedule(static) if (elements >= kParallelElements)
  for (int64_t w = 0; w < n_work; ++w) {
    const Work& item = work[w];
    const int64_t m = item.buffer;
    scale_rows_any(dtype, in_ptrs[m], out_ptrs[m], item.first_row, item.rows, dims[m],
                   row_strides[m], factor.data() + m * batch + item.first_row);
  }
}

}  // namespace fastbml

// Multi-tensor Gram entries of sums split into (sum - part, part): one parallel pass over
// fixed-size chunks of every tensor (float64 partial sums), then each tensor's chunks are
// added in order.
#include "split_gram.h"

#include <cstdint>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "dtype.h"
#include "simd.h"

namespace fastbml {
namespace {

struct Gram {
  double dd, db, bb, ss;
};

template <typename T>
Gram chunk_gram(const T* s, const T* b, int64_t n) {
  double dd = 0.0, db = 0.0, bb = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : dd, db, bb, ss)
  for (int64_t i = 0; i < n; ++i) {
    const double si = to_float(s[i]);
    const double bi = to_float(b[i]);
    const double di = si - bi;  // exact: both are floats
    dd += di * di;
    db += di * bi;
    bb += bi * bi;
    ss += si * si;
  }
  return {dd, db, bb, ss};
}

FASTBML_SIMD_CLONES
Gram gram_any(DType dtype, uintptr_t s, uintptr_t b, int64_t begin, int64_t end) {
  return dispatch(dtype, reinterpret_cast<void*>(s), [&](auto* ps) {
    using T = std::remove_pointer_t<decltype(ps)>;
    return chunk_gram(ps + begin, reinterpret_cast<const T*>(b) + begin, end - begin);
  });
}

}  // namespace

void multi_tensor_split_gram(const std::vector<uintptr_t>& sum_ptrs,
                             const std::vector<uintptr_t>& part_ptrs,
                             const std::vector<int>& dtypes, const std::vector<int64_t>& numels,
                             uintptr_t out_ptr) {
  const int64_t n_tensors = static_cast<int64_t>(sum_ptrs.size());
  std::vector<DType> dtype(n_tensors);
  for (int64_t t = 0; t < n_tensors; ++t) dtype[t] = dtype_from_code(dtypes[t]);
  const std::vector<Chunk> chunks = chunk_table(numels, [](int64_t) { return true; });
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<Gram> partial(n_chunks);
#pragma omp parallel for schedule(static) if (chunk_elements(chunks) >= kParallelElements)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    partial[c] = gram_any(dtype[ch.tensor], sum_ptrs[ch.tensor], part_ptrs[ch.tensor], ch.begin,
                          ch.end);
  }
  double* out = reinterpret_cast<double*>(out_ptr);
  for (int64_t i = 0; i < 4 * n_tensors; ++i) out[i] = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    double* row = out + 4 * chunks[c].tensor;
    row[0] += partial[c].dd;
    row[1] += partial[c].db;
    row[2] += partial[c].bb;
    row[3] += partial[c].ss;
  }
}

}  // namespace fastbml

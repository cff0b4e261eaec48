// Multi-tensor "x <- a_t x + b_t y" over many tensor pairs in one call, each tensor with its own
// pair of coefficients. All tensors are cut into fixed-size chunks that one parallel loop
// rewrites in place.
#include "axpby.h"

#include <cstdint>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "dtype.h"
#include "simd.h"

namespace fastbml {
namespace {

template <typename T>
void axpby_chunk(T* x, const T* y, int64_t n, float a, float b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = from_float<T>(a * to_float(x[i]) + b * to_float(y[i]));
}

FASTBML_SIMD_CLONES
void axpby_any(DType dtype, uintptr_t x, uintptr_t y, int64_t begin, int64_t end, float a,
               float b) {
  dispatch(dtype, reinterpret_cast<void*>(x), [&](auto* px) {
    using T = std::remove_pointer_t<decltype(px)>;
    axpby_chunk(px + begin, reinterpret_cast<const T*>(y) + begin, end - begin, a, b);
  });
}

}  // namespace

void multi_tensor_axpby(const std::vector<uintptr_t>& x_ptrs, const std::vector<uintptr_t>& y_ptrs,
                        const std::vector<int>& dtypes, const std::vector<int64_t>& numels,
                        uintptr_t coeffs_ptr) {
  const float* coeffs = reinterpret_cast<const float*>(coeffs_ptr);
  const int64_t n_tensors = static_cast<int64_t>(x_ptrs.size());
  std::vector<DType> dtype(n_tensors);
  for (int64_t t = 0; t < n_tensors; ++t) dtype[t] = dtype_from_code(dtypes[t]);
  const std::vector<Chunk> chunks = chunk_table(numels, [](int64_t) { return true; });
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (chunk_elements(chunks) >= kParallelElements)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    axpby_any(dtype[ch.tensor], x_ptrs[ch.tensor], y_ptrs[ch.tensor], ch.begin, ch.end,
              coeffs[2 * ch.tensor], coeffs[2 * ch.tensor + 1]);
  }
}

}  // namespace fastbml

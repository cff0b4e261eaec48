// Multi-tensor lerp "x <- x + w[g(t)] * (y - x)" over many tensors in one call: D&R's soft
// re-initialisation of every encoder parameter toward its initial value. All tensors are cut
// into fixed-size chunks that one parallel loop rewrites in place.
#include "lerp.h"

#include <cstdint>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "dtype.h"
#include "simd.h"

namespace fastbml {
namespace {

template <typename T>
void lerp_chunk(T* x, const T* y, int64_t n, float w) {
  // The two-sided form (as torch.lerp): exact at w = 1, and at most half a step from either end.
  const bool small = w < 0.5f;
  const float coeff = small ? w : w - 1.0f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = to_float(x[i]);
    const float b = to_float(y[i]);
    x[i] = from_float<T>((small ? a : b) + coeff * (b - a));
  }
}

FASTBML_SIMD_CLONES
void lerp_any(DType dtype, uintptr_t x, uintptr_t y, int64_t begin, int64_t end, float w) {
  dispatch(dtype, reinterpret_cast<void*>(x), [&](auto* px) {
    using T = std::remove_pointer_t<decltype(px)>;
    lerp_chunk(px + begin, reinterpret_cast<const T*>(y) + begin, end - begin, w);
  });
}

}  // namespace

void multi_tensor_lerp(const std::vector<uintptr_t>& ptrs,
                       const std::vector<uintptr_t>& target_ptrs, const std::vector<int>& dtypes,
                       const std::vector<int64_t>& numels, const std::vector<int64_t>& weight_index,
                       uintptr_t weights_ptr) {
  const float* weights = reinterpret_cast<const float*>(weights_ptr);
  const int64_t n_tensors = static_cast<int64_t>(ptrs.size());
  std::vector<DType> dtype(n_tensors);
  for (int64_t t = 0; t < n_tensors; ++t) dtype[t] = dtype_from_code(dtypes[t]);
  // weight 0 is the identity: such tensors get no chunk, so no memory traffic at all
  const std::vector<Chunk> chunks =
      chunk_table(numels, [&](int64_t t) { return weights[weight_index[t]] != 0.0f; });
  const int64_t elements = chunk_elements(chunks);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (elements >= kParallelElements)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    lerp_any(dtype[ch.tensor], ptrs[ch.tensor], target_ptrs[ch.tensor], ch.begin, ch.end,
             weights[weight_index[ch.tensor]]);
  }
}

}  // namespace fastbml

// Fixed-size chunks over many tensors: the parallel work items of the multi-tensor CPU kernels
// (one `#pragma omp parallel for` over all chunks of all tensors).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastbml {

// Elements per chunk; a multiple of 4, so every chunk starts on a fresh Philox block.
constexpr int64_t kChunk = 1 << 15;

// Below this many elements a memory-bound pass runs on one thread: waking the OpenMP team
// costs more than it saves (and a descheduled thread stalls the barrier on a busy machine).
constexpr int64_t kParallelElements = 1 << 18;


struct Chunk {
  int64_t tensor, begin, end;
};

// Total elements of the chunks, for the kernels' OpenMP `if` clauses.
inline int64_t chunk_elements(const std::vector<Chunk>& chunks) {
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin;
  return total;
}

// The chunks of every tensor t with take(t) true, in tensor order.
template <typename Take>
std::vector<Chunk> chunk_table(const std::vector<int64_t>& numels, Take take) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    if (!take(t)) continue;
    for (int64_t b = 0; b < numels[t]; b += kChunk)
      chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
  }
  return chunks;
}

}  // namespace fastbml

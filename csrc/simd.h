// Function multi-versioning for the hot loops: one binary, built portably, still runs the
// AVX-512 or AVX2 version of a loop on machines that have it (chosen once, at load time).
// `flatten` inlines the helpers into each clone, so they are compiled for its target too.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTBML_SIMD_CLONES \
  __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTBML_SIMD_CLONES
#endif

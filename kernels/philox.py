"""Philox draws inside Triton kernels, laid out as fastbml.rng defines them.

An element with flattened index i uses word i % 4 of Philox block i // 4 (counter words:
block lo, block hi, stream, 0; key: the 64-bit seed), so a kernel that owns BLOCK consecutive
elements (BLOCK % 4 == 0, start % 4 == 0) draws BLOCK // 4 Philox blocks and interleaves them;
`normal_at` draws for any indices (one block per element: four times the Philox work).
"""

import triton
import triton.language as tl


@triton.jit
def uniform_open(word):
    """Top 24 bits of a uint32 word, centred in their bucket: a float32 in (0, 1)."""
    return (word >> 8).to(tl.float32) * 5.9604644775390625e-08 + 2.98023223876953125e-08


@triton.jit
def _interleave4(a, b, c, d):
    """[a0, b0, c0, d0, a1, b1, ...] from four [N] blocks."""
    # join stacks on a new last axis, so the outer join must pair (a, c) with (b, d).
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (4 * a.shape[0],))


@triton.jit
def philox_words(seed, stream, first_element, BLOCK: tl.constexpr):
    """The four Philox words of the BLOCK // 4 blocks starting at element `first_element`."""
    block = first_element // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(c0) + stream).to(tl.uint32)
    c3 = tl.zeros_like(c0)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def uniform_block(seed, stream, first_element, BLOCK: tl.constexpr):
    """BLOCK uniforms in (0, 1) for elements first_element .. first_element + BLOCK - 1."""
    w0, w1, w2, w3 = philox_words(seed, stream, first_element, BLOCK)
    return _interleave4(uniform_open(w0), uniform_open(w1), uniform_open(w2),
                        uniform_open(w3))


@triton.jit
def normal_block(seed, stream, first_element, BLOCK: tl.constexpr):
    """BLOCK standard normals (Box-Muller on word pairs) for elements from first_element."""
    w0, w1, w2, w3 = philox_words(seed, stream, first_element, BLOCK)
    r01 = tl.sqrt(-2.0 * tl.log(uniform_open(w0)))
    r23 = tl.sqrt(-2.0 * tl.log(uniform_open(w2)))
    a01 = 6.283185307179586 * uniform_open(w1)
    a23 = 6.283185307179586 * uniform_open(w3)
    return _interleave4(r01 * tl.cos(a01), r01 * tl.sin(a01), r23 * tl.cos(a23),
                        r23 * tl.sin(a23))


@triton.jit
def normal_at(seed, stream, index):
    """The standard normals of the int64 flattened indices `index` (any values, any shape)."""
    block = index // 4
    word = index % 4
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(c0) + stream).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
    first = word < 2  # words (0, 1) pair for indices 4b, 4b + 1; (2, 3) for 4b + 2, 4b + 3
    radius = tl.sqrt(-2.0 * tl.log(uniform_open(tl.where(first, w0, w2))))
    angle = 6.283185307179586 * uniform_open(tl.where(first, w1, w3))
    return tl.where(word % 2 == 0, radius * tl.cos(angle), radius * tl.sin(angle))

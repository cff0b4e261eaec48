"""The RNG contract: counter-based Philox4x32-10 streams keyed by a 64-bit seed.

Element `i` of an op's flattened input draws word `i % 4` of the Philox block with counter
(i // 4 as two 32-bit words, stream, 0) under key `seed`; uniforms take the top 24 bits of a word
centred in their bucket, normals pair words (0, 1) and (2, 3) through Box-Muller. Every backend
draws the same numbers for the same (seed, stream, index), whatever the block size or threading.
`philox_uniform` / `philox_normal` below are the plain-torch definition that the cpp and triton
kernels are tested against; they take the seed as an int or as an int64 0-dim tensor (how the
ops receive it, so that a seed that changes every step never reaches the host).
"""

from __future__ import annotations

import torch

Seed = int | torch.Tensor  # a Python int, or an int64 0-dim tensor on the device of the op

SEED_BITS = 63  # seeds are non-negative int64 values, so every backend can take them as-is
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1

# Stream numbers (the third counter word) keep an op's independent draws apart.
STREAM_NOISE = 0
STREAM_COIN = 1
STREAM_MASK = 2


def check_seed(seed: object, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed < (1 << SEED_BITS):
        raise ValueError(f"{name} must be in [0, 2**{SEED_BITS}), got {seed}")
    return seed


def _draw_seed() -> torch.Tensor:
    """A seed drawn from torch's default CPU generator (honours torch.manual_seed), as a CPU
    int64 tensor."""
    return torch.randint(0, (1 << SEED_BITS) - 1, (), dtype=torch.int64)


def fresh_seed() -> int:
    """A seed drawn from torch's default CPU generator (honours torch.manual_seed; no device sync)."""
    return int(_draw_seed())


def step_seed(base_seed: int, step: int) -> int:
    """The seed of training step `step` in the stream of `base_seed` (SplitMix64 finaliser).

    Every DDP rank derives the same value without communicating, and a resumed run continues
    the same sequence.
    """
    z = (check_seed(base_seed, "base_seed") + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> (64 - SEED_BITS)


def _as_int64(value: int) -> int:
    """The int64 with the bit pattern of the uint64 `value`."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values holding uint64 bit patterns."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in
                         (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def step_seed_tensor(base_seed: Seed, step: Seed) -> torch.Tensor:
    """`step_seed` computed by tensor ops (int64 arithmetic wraps like uint64), so that a step
    counter kept in a device tensor gives the step's seed on the device: no host sync, and a
    compiled training step is not specialised on the step number. Equal to
    `step_seed(base_seed, step)` for every value."""
    like = base_seed if isinstance(base_seed, torch.Tensor) else step
    if not isinstance(like, torch.Tensor):
        raise TypeError("step_seed_tensor needs base_seed or step as an int64 tensor")
    if like.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.tensor(step_seed(int(base_seed), int(step)))  # eager CPU: host math is cheaper
    base = torch.as_tensor(base_seed, dtype=torch.int64, device=like.device)
    z = base + (torch.as_tensor(step, dtype=torch.int64, device=like.device) + 1) * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return _shr(z ^ _shr(z, 31), 64 - SEED_BITS)


def seed_tensor(seed: Seed | None, device: torch.device, name: str = "seed") -> torch.Tensor:
    """The seed as the int64 0-dim tensor on `device` that the ops take: an int is checked, None
    draws a fresh seed from torch's default CPU generator, a tensor is checked for dtype, shape
    and device (its value is not read: no host sync)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"{name} as a tensor must hold one int64 value, got {seed.dtype} of "
                            f"shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"{name} is on {seed.device} but the op's tensors on {device}")
        return seed if seed.dim() == 0 else seed.reshape(())
    if seed is None:
        return _draw_seed().to(device)
    return torch.tensor(check_seed(seed, name), dtype=torch.int64, device=device)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    product = b * a  # < 2**64: wraps in int64, but the bit pattern is the unsigned product
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               k0: Seed, k1: Seed) -> torch.Tensor:
    """Philox4x32-10 of counters (c0..c3, int64 tensors holding uint32 values) under key
    (k0, k1), ints or int64 0-dim tensors holding uint32 values: the four output words,
    int64 [n, 4]."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi2, lo2 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=1)


def philox_words(seed: Seed, stream: int, n_blocks: int, *, first_block: int = 0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Philox words of blocks first_block .. first_block + n_blocks - 1 of (seed, stream): [n, 4]."""
    if (isinstance(seed, torch.Tensor) and seed.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        seed = int(seed)  # eager CPU: the key schedule in host ints, not 20 tensor ops
    block = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    return philox4x32(block & _MASK32, (block >> 32) & _MASK32,
                      torch.full_like(block, stream & _MASK32), torch.zeros_like(block),
                      seed & _MASK32, (seed >> 32) & _MASK32)


def _to_uniform(words: torch.Tensor) -> torch.Tensor:
    return (words >> 8).to(torch.float32) * 2.0**-24 + 2.0**-25


def philox_uniform(seed: Seed, stream: int, n: int, *, offset: int = 0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms in (0, 1) for flattened indices offset .. offset + n - 1."""
    skip = offset % 4
    words = philox_words(seed, stream, -(-(n + skip) // 4), first_block=offset // 4,
                         device=device)
    return _to_uniform(words).reshape(-1)[skip:skip + n]


def philox_normal(seed: Seed, stream: int, n: int, *, offset: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals for flattened indices offset .. offset + n - 1 (any offset >= 0: the
    draws of an index do not depend on where a range starts)."""
    skip = offset % 4
    u = _to_uniform(philox_words(seed, stream, -(-(n + skip) // 4), first_block=offset // 4,
                                 device=device))
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
    angle = (2.0 * torch.pi) * u[:, 1::2]
    normals = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=2)
    return normals.reshape(-1)[skip:skip + n]

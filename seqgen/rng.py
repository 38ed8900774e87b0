"""Counter-based random numbers for the sequence kernels (SplitMix64).

Sequence `i` of a shard set is a pure function of `(seed, seq_type, i)`: its stream starts at state
`sequence_state(base_key(seed, tag), i)` and every draw is `state += GAMMA; x = mix64(state)` (Steele,
Lea & Flood 2014, "Fast splittable pseudorandom number generators"; the SplitMix64 finaliser). No global
or per-thread state, so the output is the same with any number of numba threads, in any order, and with
`NUMBA_DISABLE_JIT=1`.

Derived quantities, computed identically in the kernels and in the pure-Python reference
(`tests/naive.py`):

- `uniform_int(x, n)`  = `((x >> 32) * n) >> 32`, in `[0, n)` for `1 <= n < 2**31` (multiply-shift,
  bias below `n / 2**32`);
- `uniform_float(x)`   = `(x >> 11) * 2**-53`, in `[0, 1)`, exact in float64;
- `weighted_index`     = first `k` with `cdf[k] > uniform_float(x) * cdf[-1]` (binary search).

The functions here are numba `@njit` helpers that are also plain Python functions under
`NUMBA_DISABLE_JIT=1`; callers that run them as Python must wrap them in `np.errstate(over="ignore")`
because uint64 arithmetic wraps around on purpose.
"""

from __future__ import annotations

import numpy as np
from numba import njit

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_S11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53
NOISE_TAG = np.uint64(0x6E6F697365736565)  # "noiseeee": noise seed = mix64(state0 ^ NOISE_TAG) >> 32


@njit(cache=True, inline="always")
def mix64(z):
    """SplitMix64 finaliser: a bijective avalanche hash of a uint64."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def sequence_state(base, i):
    """Initial stream state of sequence `i` (int >= 0) under the per-set key `base` (uint64)."""
    return mix64(base + np.uint64(i) * GAMMA)


@njit(cache=True, inline="always")
def next_u64(state):
    """Advance the stream: returns (new_state, 64 random bits)."""
    state = state + GAMMA
    return state, mix64(state)


@njit(cache=True, inline="always")
def uniform_int(x, n):
    """Map 64 random bits to an int in [0, n) (1 <= n < 2**31)."""
    return np.int64(((x >> _S32) * np.uint64(n)) >> _S32)


@njit(cache=True, inline="always")
def uniform_float(x):
    """Map 64 random bits to a float64 in [0, 1)."""
    return np.float64(x >> _S11) * _INV53


@njit(cache=True, inline="always")
def search_cdf(cdf, lo, hi, t):
    """Smallest k in [lo, hi) with cdf[k] > t, or hi - 1 when there is none (float rounding)."""
    a, b = lo, hi
    while a < b:
        m = (a + b) >> 1
        if cdf[m] > t:
            b = m
        else:
            a = m + 1
    if a >= hi:
        return hi - 1
    return a


@njit(cache=True, inline="always")
def noise_seed(state0):
    """The uint32 noise seed of a sequence whose stream starts at `state0`."""
    return np.uint32(mix64(state0 ^ NOISE_TAG) >> _S32)


def base_key(seed: int, tag: int) -> np.uint64:
    """Per-set key from the build seed and a fixed per-sequence-type tag (plain Python, exact)."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return np.uint64(mix(mix(seed & mask) ^ (tag & mask)))

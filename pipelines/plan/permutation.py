"""Keyed pseudo-random bijections of [0, n), evaluated per element: the epoch plan's shuffles
(pipelines/plan/epoch_plan.py) and the mixture's fractional windows (pipelines/plan/mixing.py).

A permutation is a function evaluated at the positions a batch needs, never a listed epoch: a keyed
Feistel network of `ROUNDS` rounds over two digits of radix ≈ √n, as format-preserving encryption
does (NIST FF1's modular rounds), with splitmix64-style round functions keyed by integers, and
cycle walking: a value that lands outside [0, n) is encrypted again until it lands inside, which
keeps it a bijection of [0, n); the domain exceeds n by less than √n + 1, so walks are rare.
"""
from __future__ import annotations

import numpy as np

ROUNDS = 6  # Feistel rounds: 4 make a pseudo-random permutation of a good round function; 2 spare
_M0, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S29, _S27, _S31, _S32 = np.uint64(29), np.uint64(27), np.uint64(31), np.uint64(32)
_ONE = np.uint64(1)


def mix(*values: int) -> int:
    """A stable 63-bit hash of integers (splitmix64 steps): per-sample choices that do not depend
    on which worker or backend makes them."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


def _u64(value) -> np.ndarray:
    if isinstance(value, (int, np.integer)):
        return np.uint64(int(value) & 0xFFFFFFFFFFFFFFFF)
    return np.asarray(value).astype(np.uint64)  # int64 → two's complement, as `mix` masks


def mix_array(*values) -> np.ndarray:
    """`mix` element-wise over integers and integer arrays (broadcast together): uint64, equal
    to `mix` of each element."""
    # Leading plain integers (seed, epoch, tags) are folded in Python once, not per element; then
    # in-place rounds over the arrays. The per-sample draws of every batch go through here.
    prefix, k = 0x9E3779B97F4A7C15, 0
    while k < len(values) and isinstance(values[k], (int, np.integer)):
        prefix = (prefix ^ (int(values[k]) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        prefix = (prefix ^ (prefix >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        prefix ^= prefix >> 31
        k += 1
    rest = [_u64(v) for v in values[k:]]
    with np.errstate(over="ignore"):
        h = np.full(np.broadcast_shapes(*(np.shape(v) for v in rest)), np.uint64(prefix), dtype=np.uint64)
        for v in rest:
            h ^= v
            h *= _M1
            h ^= h >> _S27
            h *= _M2
            h ^= h >> _S31
        return h >> _ONE


def round_keys(*key: int) -> np.ndarray:
    """uint64 [ROUNDS]: the round keys of the permutation named by the integers `key`."""
    return mix_array(*key, np.arange(ROUNDS))


def domain(n) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), uint64 of n's shape: the Feistel domain [0, a·b) for [0, n), two digits of radix
    a = ceil(√n) (high) and b = ceil(n / a) (low), so a·b - n < a: cycle walking is rare."""
    n = np.maximum(np.asarray(n, dtype=np.uint64), _ONE)
    a = np.ceil(np.sqrt(n.astype(np.float64))).astype(np.uint64)
    a -= ((a - _ONE) * (a - _ONE) >= n).astype(np.uint64)  # the float root may be one off
    a += (a * a < n).astype(np.uint64)
    return a, (n + a - _ONE) // a


def _encrypt(x: np.ndarray, a, b, keys) -> np.ndarray:
    """One pass of the Feistel network over x (uint64 < a·b): digits (high < a, low < b), each
    round adding a keyed hash of one digit to the other modulo its radix (the radices swap every
    round, so after an even number of rounds they are back in place)."""
    hi, lo = np.divmod(x, b)
    for i, k in enumerate(keys):
        f = lo ^ k  # the round function: two multiply-xorshift steps (splitmix64's), top 32 bits
        f *= _M1
        f ^= f >> _S29
        f *= _M2
        f >>= _S32
        f += hi
        hi, lo = lo, f % (a if i % 2 == 0 else b)
    return hi * b + lo


def permute(x, n, keys) -> np.ndarray:
    """A keyed pseudo-random bijection of [0, n) evaluated at x: int [m] in [0, n) → int64 [m].

    `n` and `keys` are one permutation's (an int, uint64 [ROUNDS] from `round_keys`) or one per
    element (int [m], uint64 [ROUNDS, m]). Cycle walking: values the network maps outside [0, n)
    are encrypted again, only those, until every one lands inside (rare: the domain exceeds n by
    less than √n + 1)."""
    n = np.asarray(n, dtype=np.uint64)
    return walk(np.asarray(x).astype(np.uint64), n, *domain(n), np.asarray(keys, dtype=np.uint64))


def walk(x: np.ndarray, n: np.ndarray, a, b, keys) -> np.ndarray:
    """`permute` with its domain (`domain(n)`) given: uint64 in, int64 out."""
    with np.errstate(over="ignore"):
        y = _encrypt(x, a, b, keys)
        todo = np.flatnonzero(y >= n)
        while todo.size:
            if n.ndim:  # one permutation per element: walk with each element's own
                z = _encrypt(y[todo], a[todo], b[todo], keys[:, todo])
                y[todo] = z
                todo = todo[z >= n[todo]]
            else:
                z = _encrypt(y[todo], a, b, keys)
                y[todo] = z
                todo = todo[z >= n]
    return y.astype(np.int64)

"""Numba kernels that fill sequence rows (private; `seqgen.sampling` validates, allocates and calls them).

One kernel per family, `prange` over sequences, each sequence from its own counter-based stream
(`seqgen.rng`): `_bursty_kernel`, `_fewshot_kernel` (fewshot_* and mixed), `_no_support_kernel`,
`_strategy_kernel` (flip, copy_available), `_noise_seed_kernel`. Kernels take only arrays, scalars and keys, write into preallocated output rows and
allocate nothing per sequence.

Class pools (rare, common, holdout, zipfian = rare + common) are passed concatenated: `pool_classes`
(dataset class ids), `pool_cdf` (cumulative weights), and per pool `pool_off`, `pool_n`, `pool_uniform`.
A labeling is a row `(mode, K, X)` of an int64 table: ORIGINAL (the class id), ORDERED (index in the pool
+ K), POLYSEMY (index * X + K + uniform draw in [0, X)), UNFIXED (the way, 0..ways-1; few-shot only),
ZIPF_POLYSEMY (the zipfian pool = rare then common under polysemy X: rare index i < K = n_rare gets
i * X + a uniform draw in [0, X), common index i >= K gets its common label K * X + (i - K); one draw
either way).

The order of random draws below is the contract that `tests/naive.py` re-implements in plain Python:
change one, change both.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from seqgen.rng import next_u64, noise_seed, search_cdf, sequence_state, uniform_float, uniform_int

RARE, COMMON, HOLDOUT, ZIPFIAN = 0, 1, 2, 3
ORIGINAL, ORDERED, POLYSEMY, UNFIXED, ZIPF_POLYSEMY = 0, 1, 2, 3, 4
# rows of the bursty labeling table
NB, FS_RARE, REM_COMMON, FS_COMMON, REM_RARE, FS_ZIPF, REM_ZIPF = 0, 1, 2, 3, 4, 5, 6
# non-bursty kinds
NB_ZIPFIAN, NB_COMMON_UNIFORM, NB_COMMON_NO_SUPPORT = 0, 1, 2


@njit(cache=True, inline="always")
def _draw_idx(state, p, pool_cdf, pool_off, pool_n, pool_uniform):
    """Index into pool p, by its weights (one draw)."""
    state, x = next_u64(state)
    n = pool_n[p]
    if pool_uniform[p]:
        return state, uniform_int(x, n)
    o = pool_off[p]
    t = uniform_float(x) * pool_cdf[o + n - 1]
    return state, search_cdf(pool_cdf, o, o + n, t) - o


@njit(cache=True, inline="always")
def _draw_idx_excluding(state, p, q, pool_cdf, pool_off, pool_n, pool_uniform):
    """Index into pool p other than q, by the renormalised remaining weights (one draw)."""
    state, x = next_u64(state)
    n = pool_n[p]
    if pool_uniform[p]:
        k = uniform_int(x, n - 1)
        if k >= q:
            k += 1
        return state, k
    o = pool_off[p]
    lo = pool_cdf[o + q - 1] if q > 0 else 0.0
    hi = pool_cdf[o + n - 1] - pool_cdf[o + q]
    t = uniform_float(x) * (lo + hi)
    if t < lo or q == n - 1:
        return state, search_cdf(pool_cdf, o, o + q, t) - o
    t2 = (t - lo) + pool_cdf[o + q]
    return state, search_cdf(pool_cdf, o + q + 1, o + n, t2) - o


@njit(cache=True, inline="always")
def _label(state, lab, idx, cls):
    mode = lab[0]
    if mode == ORIGINAL:
        return state, cls
    if mode == POLYSEMY:
        state, x = next_u64(state)
        return state, idx * lab[2] + lab[1] + uniform_int(x, lab[2])
    if mode == ZIPF_POLYSEMY:
        state, x = next_u64(state)
        if idx < lab[1]:
            return state, idx * lab[2] + uniform_int(x, lab[2])
        return state, lab[1] * lab[2] + (idx - lab[1])
    return state, idx + lab[1]


@njit(cache=True, inline="always")
def _shuffle(state, ex, lb, rr, r, lo, n):
    """Fisher-Yates shuffle of positions [lo, lo + n) of the three rows together."""
    for i in range(n - 1, 0, -1):
        state, x = next_u64(state)
        j = uniform_int(x, i + 1)
        a, b = lo + i, lo + j
        ex[r, a], ex[r, b] = ex[r, b], ex[r, a]
        lb[r, a], lb[r, b] = lb[r, b], lb[r, a]
        rr[r, a], rr[r, b] = rr[r, b], rr[r, a]
    return state


@njit(cache=True, inline="always")
def _random_seq(state, p, n, lab, off, ex, lb, rr, r, pool_classes, pool_cdf, pool_off, pool_n, pool_uniform):
    """Original get_random_seq: n i.i.d. classes from pool p at positions [off, off + n)."""
    flag = 1 if p == RARE else 0
    for j in range(n):
        state, idx = _draw_idx(state, p, pool_cdf, pool_off, pool_n, pool_uniform)
        cls = pool_classes[pool_off[p] + idx]
        state, label = _label(state, lab, idx, cls)
        ex[r, off + j] = cls
        lb[r, off + j] = label
        rr[r, off + j] = flag
    return state


@njit(cache=True, inline="always")
def _fewshot_seq(state, p, shots, ways, lab, grouped, shuffle, off, ex, lb, rr, r,
                 pool_classes, pool_cdf, pool_off, pool_n, pool_uniform):
    """Original get_fewshot_seq: `ways` classes (with replacement) x `shots`, then a query among them.

    Positions [off, off + shots*ways) hold the support, position off + shots*ways the query. With
    `shuffle`, the support is shuffled (within each block of `ways` when `grouped`)."""
    flag = 1 if p == RARE else 0
    for w in range(ways):
        state, idx = _draw_idx(state, p, pool_cdf, pool_off, pool_n, pool_uniform)
        cls = pool_classes[pool_off[p] + idx]
        if lab[0] == UNFIXED:
            label = w
        else:
            state, label = _label(state, lab, idx, cls)
        ex[r, off + w] = cls
        lb[r, off + w] = label
    sw = shots * ways
    for k in range(ways, sw):
        ex[r, off + k] = ex[r, off + k - ways]
        lb[r, off + k] = lb[r, off + k - ways]
    state, x = next_u64(state)
    qw = uniform_int(x, ways)
    ex[r, off + sw] = ex[r, off + qw]
    lb[r, off + sw] = lb[r, off + qw]
    for k in range(sw + 1):
        rr[r, off + k] = flag
    if shuffle:
        if grouped:
            for s in range(shots):
                state = _shuffle(state, ex, lb, rr, r, off + s * ways, ways)
        else:
            state = _shuffle(state, ex, lb, rr, r, off, sw)
    return state


@njit(cache=True, inline="always")
def _no_support_seq(state, p, n, lab, ex, lb, rr, r, pool_classes, pool_cdf, pool_off, pool_n, pool_uniform):
    """Original get_no_support_seq(all_unique=False): query first, support from the other classes."""
    flag = 1 if p == RARE else 0
    state, q = _draw_idx(state, p, pool_cdf, pool_off, pool_n, pool_uniform)
    for j in range(n - 1):
        state, idx = _draw_idx_excluding(state, p, q, pool_cdf, pool_off, pool_n, pool_uniform)
        cls = pool_classes[pool_off[p] + idx]
        state, label = _label(state, lab, idx, cls)
        ex[r, j] = cls
        lb[r, j] = label
        rr[r, j] = flag
    cls = pool_classes[pool_off[p] + q]
    state, label = _label(state, lab, q, cls)
    ex[r, n - 1] = cls
    lb[r, n - 1] = label
    rr[r, n - 1] = flag
    return state


@njit(cache=True, inline="always")
def _assign_exemplars(state, ex, exm, r, n_ex):
    """Exemplars of each class without replacement within the sequence (the original draws them with
    np.random.choice(..., replace=False)): position k redraws uniformly in [0, n_ex) until it hits a
    drawing that no earlier position of its class holds."""
    L = ex.shape[1]
    if n_ex <= 1:
        for k in range(L):
            exm[r, k] = 0
        return state
    for k in range(L):
        used = np.int64(0)
        c = ex[r, k]
        for j in range(k):  # branch-free: classes repeat unpredictably
            used |= np.int64(ex[r, j] == c) << np.int64(exm[r, j])
        while True:
            state, x = next_u64(state)
            e = uniform_int(x, n_ex)
            if (used >> e) & 1 == 0:
                break
        exm[r, k] = e
    return state


@njit(cache=True, parallel=True)
def _bursty_kernel(base, start, seq_len, shots, ways, p_bursty, p_zipf, p_common_zipf, nb_kind, labs,
                   pool_classes, pool_cdf, pool_off, pool_n, pool_uniform, n_ex,
                   out_ex, out_lb, out_rr, out_exm):
    sw = shots * ways
    rem = seq_len - sw - 1
    for r in prange(out_ex.shape[0]):
        state = sequence_state(base, start + r)
        state, x = next_u64(state)
        if uniform_float(x) < p_bursty:
            state, x = next_u64(state)
            d = uniform_float(x)
            if d < p_zipf:
                fs_pool, fs_row, rem_pool, rem_row = ZIPFIAN, FS_ZIPF, ZIPFIAN, REM_ZIPF
            elif d < p_common_zipf:
                fs_pool, fs_row, rem_pool, rem_row = COMMON, FS_COMMON, RARE, REM_RARE
            else:
                fs_pool, fs_row, rem_pool, rem_row = RARE, FS_RARE, COMMON, REM_COMMON
            state = _fewshot_seq(state, fs_pool, shots, ways, labs[fs_row], False, False, rem,
                                 out_ex, out_lb, out_rr, r, pool_classes, pool_cdf, pool_off, pool_n, pool_uniform)
            if rem > 0:
                state = _random_seq(state, rem_pool, rem, labs[rem_row], 0, out_ex, out_lb, out_rr, r,
                                    pool_classes, pool_cdf, pool_off, pool_n, pool_uniform)
            state = _shuffle(state, out_ex, out_lb, out_rr, r, 0, seq_len - 1)
        elif nb_kind == NB_COMMON_NO_SUPPORT:
            state = _no_support_seq(state, COMMON, seq_len, labs[NB], out_ex, out_lb, out_rr, r,
                                    pool_classes, pool_cdf, pool_off, pool_n, pool_uniform)
        else:
            p = ZIPFIAN if nb_kind == NB_ZIPFIAN else COMMON
            state = _random_seq(state, p, seq_len, labs[NB], 0, out_ex, out_lb, out_rr, r,
                                pool_classes, pool_cdf, pool_off, pool_n, pool_uniform)
        _assign_exemplars(state, out_ex, out_exm, r, n_ex)


@njit(cache=True, parallel=True)
def _fewshot_kernel(base, start, fs_pool, shots, ways, grouped, fs_lab, mixed, p_fewshot, rnd_lab,
                    pool_classes, pool_cdf, pool_off, pool_n, pool_uniform, n_ex,
                    out_ex, out_lb, out_rr, out_exm):
    L = shots * ways + 1
    for r in prange(out_ex.shape[0]):
        state = sequence_state(base, start + r)
        fewshot = True
        if mixed:
            state, x = next_u64(state)
            fewshot = uniform_float(x) < p_fewshot
        if fewshot:
            state = _fewshot_seq(state, fs_pool, shots, ways, fs_lab, grouped, True, 0, out_ex, out_lb, out_rr, r,
                                 pool_classes, pool_cdf, pool_off, pool_n, pool_uniform)
        else:
            state = _random_seq(state, COMMON, L, rnd_lab, 0, out_ex, out_lb, out_rr, r,
                                pool_classes, pool_cdf, pool_off, pool_n, pool_uniform)
        _assign_exemplars(state, out_ex, out_exm, r, n_ex)


@njit(cache=True, parallel=True)
def _no_support_kernel(base, start, pool, lab, pool_classes, pool_cdf, pool_off, pool_n, pool_uniform, n_ex,
                       out_ex, out_lb, out_rr, out_exm):
    L = out_ex.shape[1]
    for r in prange(out_ex.shape[0]):
        state = sequence_state(base, start + r)
        state = _no_support_seq(state, pool, L, lab, out_ex, out_lb, out_rr, r,
                                pool_classes, pool_cdf, pool_off, pool_n, pool_uniform)
        _assign_exemplars(state, out_ex, out_exm, r, n_ex)


@njit(cache=True, parallel=True)
def _noise_seed_kernel(base, start, out):
    for r in prange(out.shape[0]):
        out[r] = noise_seed(sequence_state(base, start + r))


@njit(cache=True, parallel=True)
def _strategy_kernel(base, start, flip, shots, ways, grouped, lab,
                     pool_classes, pool_cdf, pool_off, pool_n, pool_uniform, n_ex,
                     out_ex, out_lb, out_rr, out_exm):
    """flip / copy_available (`seqgen.sampling`): `ways` DISTINCT classes of the zipfian pool (by its weights;
    a class already taken is redrawn), each labelled with its trained label `lab`; with `flip`, a uniform
    derangement (Fisher-Yates permutations redrawn until no way keeps its own label) moves every trained
    label to another way; then `shots` copies, a query way, the support shuffle (per block of `ways` when
    `grouped`) and the exemplars, in that order. The only kernel that allocates per sequence (two arrays
    of `ways` integers: evaluation sets are small)."""
    sw = shots * ways
    for r in prange(out_ex.shape[0]):
        state = sequence_state(base, start + r)
        trained = np.empty(ways, np.int64)
        perm = np.empty(ways, np.int64)
        for w in range(ways):
            while True:
                state, idx = _draw_idx(state, ZIPFIAN, pool_cdf, pool_off, pool_n, pool_uniform)
                cls = pool_classes[pool_off[ZIPFIAN] + idx]
                taken = False
                for u in range(w):
                    if out_ex[r, u] == cls:
                        taken = True
                if not taken:
                    break
            state, label = _label(state, lab, idx, cls)
            out_ex[r, w] = cls
            trained[w] = label
        for w in range(ways):
            perm[w] = w
        if flip:
            while True:
                for w in range(ways):
                    perm[w] = w
                for i in range(ways - 1, 0, -1):
                    state, x = next_u64(state)
                    j = uniform_int(x, i + 1)
                    perm[i], perm[j] = perm[j], perm[i]
                fixed = False
                for w in range(ways):
                    if perm[w] == w:
                        fixed = True
                if not fixed:
                    break
        for w in range(ways):
            out_lb[r, w] = trained[perm[w]]
        for k in range(ways, sw):
            out_ex[r, k] = out_ex[r, k - ways]
            out_lb[r, k] = out_lb[r, k - ways]
        state, x = next_u64(state)
        qw = uniform_int(x, ways)
        out_ex[r, sw] = out_ex[r, qw]
        out_lb[r, sw] = out_lb[r, qw]
        for k in range(sw + 1):
            out_rr[r, k] = 0  # zipfian pool: the original's _get_is_rare_seq flags nothing
        if grouped:
            for s in range(shots):
                state = _shuffle(state, out_ex, out_lb, out_rr, r, s * ways, ways)
        else:
            state = _shuffle(state, out_ex, out_lb, out_rr, r, 0, sw)
        _assign_exemplars(state, out_ex, out_exm, r, n_ex)

"""Fused element-wise kernels of the streamed merge (``streaming/``), compiled with numba.

Eager torch spends ~15 passes over every row block (abs, compares writing bool, counts,
``nonzero``, hardshrink, sums, sign election, divisor): ~10 ns per τ element, op-bound, not
memory-bound. These kernels do each step in one pass over a cache-resident block, with the
inner loops over contiguous columns written branch-free so LLVM vectorises them.

Every kernel performs the very same IEEE operations, in the same order, as the eager ops it
replaces (``methods``/``sparsify`` on the dense stack), so the streamed merge stays bit-identical
to the dense reference (``tests/merging/test_streaming.py``); ``fastmath`` is off.

Scalars are passed in the arrays' dtype (float32 or float64): a float64 threshold against float32
data would promote every comparison and stop vectorisation. Compiled on first use and cached on
disk (numba ``cache=True``); no C compiler is needed at run time.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False, fastmath=False, error_model="numpy")


_DEBRUIJN = np.array(
    [
        0,
        1,
        28,
        2,
        29,
        14,
        24,
        3,
        30,
        22,
        20,
        15,
        25,
        17,
        4,
        8,
        31,
        27,
        13,
        23,
        21,
        19,
        16,
        7,
        26,
        12,
        18,
        6,
        11,
        5,
        10,
        9,
    ],
    dtype=np.int64,
)


_DB64 = np.uint64(0x03F79D71B4CB0A89)
_DEBRUIJN64 = np.zeros(64, dtype=np.uint64)
for _i in range(64):
    _DEBRUIJN64[((1 << _i) * 0x03F79D71B4CB0A89 % (1 << 64)) >> 58] = _i


@njit(**_JIT)
def _count_bits(words, bit):  # pragma: no cover - jitted
    """How many bytes of ``words`` (uint64 view of a uint8 array) have bit ``bit`` set: bytes
    summed in parallel, 8 lanes of a uint64, flushed before a lane can overflow."""
    ones = np.uint64(0x0101010101010101)
    lanes16 = np.uint64(0x00FF00FF00FF00FF)
    sh = np.uint64(bit)
    total = 0
    nw = words.shape[0]
    for s in range(0, nw, 255):
        acc = np.uint64(0)
        for t in range(s, min(s + 255, nw)):
            acc += (words[t] >> sh) & ones
        acc = (acc & lanes16) + ((acc >> np.uint64(8)) & lanes16)  # 4 lanes of 16 bits
        total += np.int64((acc * np.uint64(0x0001000100010001)) >> np.uint64(48))
    return total


@njit(**_JIT)
def _lowest(bits):  # pragma: no cover - jitted
    """Index of the lowest set bit of a nonzero uint32 (de Bruijn multiplication)."""
    low = bits & (np.uint32(0) - bits)
    return _DEBRUIJN[np.uint32(low * np.uint32(0x077CB531)) >> np.uint32(27)]


@njit(**_JIT)
def _scan_row(row, lo, hi, vals, vrow, index, pos, flat0, union):  # pragma: no cover - jitted
    """One row: returns (#|row| > hi, new pos); appends each lo ≤ |row[j]| ≤ hi to
    ``vals[vrow, pos]``/``index[vrow, pos]`` (flat index ``flat0 + j``; counted, not stored,
    past the end) and ORs its bit into ``union[j // 32]``.

    Per chunk of 32 columns the bracket test builds a bit mask with a fixed trip count
    (vectorised); candidates are then visited bit by bit, so the ~99 % of entries outside the
    bracket are read once and never branched on.
    """
    n = row.shape[0]
    cap = vals.shape[1]
    above = 0
    for t in range((n + 31) // 32):
        s = 32 * t
        bits = np.uint32(0)
        if s + 32 <= n:
            m = 0
            for j in range(32):
                v = abs(row[s + j])
                above += v > hi
                m += (v >= lo) & (v <= hi)
            if m:  # ~1 chunk in 4 near a median threshold: only then build the mask
                for j in range(32):
                    v = abs(row[s + j])
                    bits |= np.uint32((v >= lo) & (v <= hi)) << np.uint32(j)
        else:
            for j in range(n - s):
                v = abs(row[s + j])
                above += v > hi
                bits |= np.uint32((v >= lo) & (v <= hi)) << np.uint32(j)
        if bits:
            union[t] |= bits
            while bits:
                j = s + _lowest(bits)
                bits &= bits - np.uint32(1)
                if pos < cap:
                    vals[vrow, pos] = abs(row[j])
                    index[vrow, pos] = flat0 + j
                pos += 1
    return above, pos


@njit(**_JIT)
def bracket_count(
    y, rows, lo, hi, vals, index, pos, base, sums, union
):  # pragma: no cover - jitted
    """Over the first ``rows`` rows of ``y``: count |y| > hi, append every lo ≤ |y| ≤ hi to
    ``vals[0]``/``index[0]`` (flat index = ``base`` + row-major position) from ``pos`` on.

    Returns (count above, new pos, Σ|y| above hi, Σ|y| of all) — the sums in float64 and only
    when ``sums``. ``pos`` past ``vals.shape[1]`` means the buffers were too small: the caller
    grows them and runs the block again. ``union``: a uint32 scratch row of ⌈n/32⌉.
    """
    n = y.shape[1]
    above = 0
    above_sum = 0.0
    total_sum = 0.0
    for i in range(rows):
        c, pos = _scan_row(y[i], lo, hi, vals, 0, index, pos, base + i * n, union)
        above += c
        if sums:
            row = y[i]
            for j in range(n):
                v = abs(row[j])
                total_sum += v
                if v > hi:
                    above_sum += v
    return above, pos, above_sum, total_sum


@njit(**_JIT)
def select(
    y, rows, mode, keep_t, drop_t, keep_ties, drop_ties, mask, c1, use_c1, c2, use_c2
):  # pragma: no cover
    """Sparsify the first ``rows`` rows of ``y`` in place, then multiply by ``c1``, ``c2``.

    ``mode`` 0: keep everything; 1 (top-k): keep |y| > keep_t (``hardshrink``); 2 (band,
    breadcrumbs): keep keep_t < |y| ≤ drop_t (keep_t < 0: no lower cut, drop_t = inf: no upper
    cut); 3: keep where ``mask`` (bool; y · 0 would only differ in the sign of zero). Ties at a threshold: the entries at local flat indices
    ``keep_ties`` get their value back, then those at ``drop_ties`` become 0, as the eager path
    does. ``c1`` (rescale) and ``c2`` (weight) are multiplied in that order when used.
    """
    n = y.shape[1]
    saved = np.empty(keep_ties.shape[0], y.dtype)
    for t in range(keep_ties.shape[0]):
        saved[t] = y[keep_ties[t] // n, keep_ties[t] % n]
    zero = keep_t - keep_t
    for i in range(rows):
        row = y[i]
        if mode == 1:
            for j in range(n):
                v = row[j]
                row[j] = v if abs(v) > keep_t else zero
        elif mode == 2:
            for j in range(n):
                v = row[j]
                a = abs(v)
                row[j] = v if (a > keep_t) & (a <= drop_t) else zero
        elif mode == 3:
            m = mask[i]
            for j in range(n):
                row[j] = row[j] if m[j] else zero
    for t in range(keep_ties.shape[0]):
        y[keep_ties[t] // n, keep_ties[t] % n] = saved[t]
    for t in range(drop_ties.shape[0]):
        y[drop_ties[t] // n, drop_ties[t] % n] = zero
    if use_c1 or use_c2:
        for i in range(rows):
            row = y[i]
            if use_c1:
                for j in range(n):
                    row[j] = row[j] * c1
            if use_c2:
                for j in range(n):
                    row[j] = row[j] * c2


@njit(**_JIT)
def _constants(dtype):  # pragma: no cover - jitted
    """0, 1 and the smallest normal number in ``dtype`` (a float64 literal would promote the
    float32 arithmetic)."""
    c = np.empty(3, dtype)
    c[0], c[1], c[2] = 0, 1, np.finfo(dtype).tiny
    return c


@njit(**_JIT)
def _consensus_row(
    ys, i, o, w, normalize, positive, lam, use_lam, c, sign, acc, div
):  # pragma: no cover
    """Row ``i`` of ``consensus`` into ``o``; one pass over the columns for up to 4 adapters
    (absent ones read as +0 with weight 0: adding +0 changes no sum)."""
    k = ys.shape[0]
    n = ys.shape[2]
    zero, one, tiny = c[0], c[1], c[2]
    if k <= 4:
        for j in range(n):
            sign[j] = zero
        y0 = ys[0, i]
        y1 = ys[1, i] if k > 1 else sign
        y2 = ys[2, i] if k > 2 else sign
        y3 = ys[3, i] if k > 3 else sign
        w0 = w[0]
        w1 = w[1] if k > 1 else zero
        w2 = w[2] if k > 2 else zero
        w3 = w[3] if k > 3 else zero
        for j in range(n):
            a0, a1, a2, a3 = y0[j], y1[j], y2[j], y3[j]
            sg = -one if (((a0 + a1) + a2) + a3) < zero else one
            z0, z1, z2, z3 = a0 * sg, a1 * sg, a2 * sg, a3 * sg
            z0 = z0 if z0 > zero else zero
            z1 = z1 if z1 > zero else zero
            z2 = z2 if z2 > zero else zero
            z3 = z3 if z3 > zero else zero
            v = (((z0 + z1) + z2) + z3) * sg
            if normalize:
                d = (
                    ((w0 if z0 > zero else zero) + (w1 if z1 > zero else zero))
                    + (w2 if z2 > zero else zero)
                ) + (w3 if z3 > zero else zero)
                if positive:
                    d = d if d > tiny else tiny
                else:
                    d = one if d == zero else d
                v = v / d
            if use_lam:
                v = v * lam
            o[j] = v
        return
    for j in range(n):
        sign[j] = zero
        acc[j] = zero
        div[j] = zero
    for a in range(k):
        row = ys[a, i]
        for j in range(n):
            sign[j] += row[j]
    for j in range(n):
        sign[j] = -one if sign[j] < zero else one
    for a in range(k):
        row = ys[a, i]
        wa = w[a]
        if normalize:
            for j in range(n):
                z = row[j] * sign[j]
                z = z if z > zero else zero
                acc[j] += z
                div[j] += wa if z > zero else zero
        else:
            for j in range(n):
                z = row[j] * sign[j]
                acc[j] += z if z > zero else zero
    if normalize and positive:
        for j in range(n):
            d = div[j]
            o[j] = acc[j] * sign[j] / (d if d > tiny else tiny)
    elif normalize:
        for j in range(n):
            d = div[j]
            o[j] = acc[j] * sign[j] / (one if d == zero else d)
    else:
        for j in range(n):
            o[j] = acc[j] * sign[j]
    if use_lam:
        for j in range(n):
            o[j] = o[j] * lam


@njit(**_JIT)
def consensus(
    ys, rows, out, w, normalize, positive, lam, use_lam, sign, acc, div
):  # pragma: no cover
    """TIES' sign election and disjoint mix of ``ys[:, :rows]`` (sparsified, weighted) into
    ``out[:rows]``, as ``methods.sign_consensus`` + ``methods.mix`` compute it on the stack:

    majority = +1 where Σ_i y_i ≥ 0 else −1; agreeing entries z_i = max(y_i · majority, 0);
    out = Σ_i z_i · majority, ÷ Σ_i w_i [z_i > 0] when ``normalize`` (guarded: tiny when all
    weights are ``positive``, else 1 where the divisor is 0), × λ when ``use_lam``. Sums run
    over the adapters in order. ``sign``, ``acc``, ``div``: row buffers of ``ys.shape[2]``.
    """
    c = _constants(ys.dtype)
    for i in range(rows):
        _consensus_row(ys, i, out[i], w, normalize, positive, lam, use_lam, c, sign, acc, div)


@njit(**_JIT)
def _tally_mix4(
    ys,
    rows,
    base,
    lo,
    hi,
    keep_t,
    above,
    unc_idx,
    unc_raw,
    unc_pos,
    flags,
    out,
    w,
    normalize,
    positive,
    lam,
    use_lam,
    c,
    sign,
):  # pragma: no cover - jitted
    """``tally_mix`` for up to 4 unit-weight adapters (see there)."""
    k = ys.shape[0]
    n = ys.shape[2]
    ucap = unc_idx.shape[0]
    words = flags.view(np.uint64)
    ones = np.uint64(0x0101010101010101)
    s3, s58 = np.uint64(3), np.uint64(58)
    for i in range(rows):
        _tally_trim_row4(
            ys, i, lo, hi, keep_t, out[i], w, normalize, positive, lam, use_lam, c, sign, flags
        )
        for a in range(k):
            above[a] += _count_bits(words, a + 1)
        q = unc_pos[0]
        flat0 = base + i * n
        for t in range(words.shape[0]):
            u = words[t] & ones  # bit 0 of each byte: in some bracket
            while u:
                j = 8 * t + np.int64(_DEBRUIJN64[((u & (np.uint64(0) - u)) * _DB64) >> s58] >> s3)
                if q < ucap:
                    unc_idx[q] = flat0 + j
                    for a in range(k):
                        unc_raw[a, q] = ys[a, i, j]
                q += 1
                u &= u - np.uint64(1)
        unc_pos[0] = q


@njit(**_JIT)
def tally_mix(
    ys,
    rows,
    base,
    lo,
    hi,
    active,
    keep_t,
    c2,
    use_c2,
    above,
    unc_idx,
    unc_raw,
    unc_pos,
    union,
    flags,
    out,
    w,
    normalize,
    positive,
    lam,
    use_lam,
    sign,
    acc,
    div,
):  # pragma: no cover
    """The single pass of plain TIES over a block of raw products ``ys[:, :rows]``, row by row
    while the row is in cache:

    1. tally: for each ``active`` adapter a, ``above[a]`` += #(|y| > hi[a]);
    2. every position some adapter's bracket [lo[a], hi[a]] holds is uncertain until the exact
       thresholds are known: its flat index (``base`` + row-major position) goes to
       ``unc_idx``, the raw values of all adapters to ``unc_raw``, from ``unc_pos[0]`` on
       (each adapter's bracket candidates are among them);
    3. the provisional mix: ``select`` mode 1 with ``keep_t``, × c2 (weight) where ``use_c2``,
       then ``consensus`` into ``out`` — the same operations as those kernels, so the
       provisional values are reproducible at the uncertain positions.

    Positions past the buffers' end are counted, not stored, and the general path overwrites
    ``ys``: on overflow the caller grows the buffers, recomputes the products and runs the block
    again. ``union``: uint32 scratch of ⌈n/32⌉; ``flags``: uint8 scratch of ⌈n/8⌉·8 (zero past n).

    Up to 4 unit-weight adapters (the common case) take one fused loop per row
    (``_tally_trim_row4``: bracket and count bits and the mix, each entry read once), then the
    counts from the bits (``_count_bits``) and a sweep over the flagged bytes; otherwise each
    adapter's row is scanned (``_scan_row``), trimmed and mixed (``_consensus_row``).
    """
    k = ys.shape[0]
    n = ys.shape[2]
    ucap = unc_idx.shape[0]
    c = _constants(ys.dtype)
    zero = c[0]
    n_chunks = (n + 31) // 32
    no_vals, no_index = np.empty((1, 0), ys.dtype), np.empty((1, 0), np.int64)  # count only
    if k <= 4 and not use_c2.any():
        _tally_mix4(
            ys,
            rows,
            base,
            lo,
            hi,
            keep_t,
            above,
            unc_idx,
            unc_raw,
            unc_pos,
            flags,
            out,
            w,
            normalize,
            positive,
            lam,
            use_lam,
            c,
            sign,
        )
        return
    for i in range(rows):
        for t in range(n_chunks):
            union[t] = 0
        hits = 0
        for a in range(k):
            if active[a]:
                got, p = _scan_row(
                    ys[a, i], lo[a], hi[a], no_vals, 0, no_index, 0, base + i * n, union
                )
                hits += p
                above[a] += got
        if hits:
            q = unc_pos[0]
            for t in range(n_chunks):
                bits = union[t]
                while bits:
                    j = 32 * t + _lowest(bits)
                    bits &= bits - np.uint32(1)
                    if q < ucap:
                        unc_idx[q] = base + i * n + j
                        for a in range(k):
                            unc_raw[a, q] = ys[a, i, j]
                    q += 1
            unc_pos[0] = q
        if k <= 4 and not use_c2.any():
            _trim_consensus_row4(
                ys, i, keep_t, out[i], w, normalize, positive, lam, use_lam, c, sign
            )
            continue
        for a in range(k):
            row = ys[a, i]
            t_a = keep_t[a]
            for j in range(n):
                v = row[j]
                row[j] = v if abs(v) > t_a else zero
            if use_c2[a]:
                c2_a = c2[a]
                for j in range(n):
                    row[j] = row[j] * c2_a
        _consensus_row(ys, i, out[i], w, normalize, positive, lam, use_lam, c, sign, acc, div)


@njit(**_JIT)
def _tally_trim_row4(
    ys, i, lo, hi, keep_t, o, w, normalize, positive, lam, use_lam, c, zrow, flags
):  # pragma: no cover - jitted
    """``_trim_consensus_row4`` of row ``i`` fused with its tally, written to ``flags[j]`` as bits:
    bit 0 where some adapter's |y_a| lies in [lo[a], hi[a]], bit 1 + a where |y_a| > hi[a]
    (inactive adapters have lo = hi = inf: never). A byte per entry keeps the loop vectorised
    (integer counters in it cost 2×); ``_count_bits`` and the sweep read the bytes afterwards.
    The mix is the same operations in the same order as ``_trim_consensus_row4``."""
    k = ys.shape[0]
    n = ys.shape[2]
    zero, one, tiny = c[0], c[1], c[2]
    inf = lo[0] - lo[0] + np.inf  # in the arrays' dtype
    if k < 4:
        for j in range(n):
            zrow[j] = zero
    y0 = ys[0, i]
    y1 = ys[1, i] if k > 1 else zrow
    y2 = ys[2, i] if k > 2 else zrow
    y3 = ys[3, i] if k > 3 else zrow
    t0 = keep_t[0]
    t1 = keep_t[1] if k > 1 else one
    t2 = keep_t[2] if k > 2 else one
    t3 = keep_t[3] if k > 3 else one
    l0, h0 = lo[0], hi[0]
    l1 = lo[1] if k > 1 else inf
    h1 = hi[1] if k > 1 else inf
    l2 = lo[2] if k > 2 else inf
    h2 = hi[2] if k > 2 else inf
    l3 = lo[3] if k > 3 else inf
    h3 = hi[3] if k > 3 else inf
    w0 = w[0]
    w1 = w[1] if k > 1 else zero
    w2 = w[2] if k > 2 else zero
    w3 = w[3] if k > 3 else zero
    for j in range(n):
        a0, a1, a2, a3 = y0[j], y1[j], y2[j], y3[j]
        b0, b1, b2, b3 = abs(a0), abs(a1), abs(a2), abs(a3)
        flags[j] = (
            (
                ((b0 >= l0) & (b0 <= h0))
                | ((b1 >= l1) & (b1 <= h1))
                | ((b2 >= l2) & (b2 <= h2))
                | ((b3 >= l3) & (b3 <= h3))
            )
            | (np.uint8(b0 > h0) << 1)
            | (np.uint8(b1 > h1) << 2)
            | (np.uint8(b2 > h2) << 3)
            | (np.uint8(b3 > h3) << 4)
        )
        a0 = a0 if b0 > t0 else zero
        a1 = a1 if b1 > t1 else zero
        a2 = a2 if b2 > t2 else zero
        a3 = a3 if b3 > t3 else zero
        sg = -one if (((a0 + a1) + a2) + a3) < zero else one
        z0, z1, z2, z3 = a0 * sg, a1 * sg, a2 * sg, a3 * sg
        z0 = z0 if z0 > zero else zero
        z1 = z1 if z1 > zero else zero
        z2 = z2 if z2 > zero else zero
        z3 = z3 if z3 > zero else zero
        v = (((z0 + z1) + z2) + z3) * sg
        if normalize:
            d = (
                ((w0 if z0 > zero else zero) + (w1 if z1 > zero else zero))
                + (w2 if z2 > zero else zero)
            ) + (w3 if z3 > zero else zero)
            if positive:
                d = d if d > tiny else tiny
            else:
                d = one if d == zero else d
            v = v / d
        if use_lam:
            v = v * lam
        o[j] = v


@njit(**_JIT)
def _trim_consensus_row4(
    ys, i, keep_t, o, w, normalize, positive, lam, use_lam, c, zrow
):  # pragma: no cover
    """``select`` mode 1 then ``_consensus_row`` for ≤ 4 unit-weight adapters, fused in
    registers: the same operations in the same order, without writing the trimmed rows back
    (a per-adapter weight test inside the loop would stop vectorisation: weighted merges take
    the unfused path)."""
    k = ys.shape[0]
    n = ys.shape[2]
    zero, one, tiny = c[0], c[1], c[2]
    for j in range(n):
        zrow[j] = zero
    y0 = ys[0, i]
    y1 = ys[1, i] if k > 1 else zrow
    y2 = ys[2, i] if k > 2 else zrow
    y3 = ys[3, i] if k > 3 else zrow
    t0 = keep_t[0]
    t1 = keep_t[1] if k > 1 else one
    t2 = keep_t[2] if k > 2 else one
    t3 = keep_t[3] if k > 3 else one
    w0 = w[0]
    w1 = w[1] if k > 1 else zero
    w2 = w[2] if k > 2 else zero
    w3 = w[3] if k > 3 else zero
    for j in range(n):
        a0, a1, a2, a3 = y0[j], y1[j], y2[j], y3[j]
        a0 = a0 if abs(a0) > t0 else zero
        a1 = a1 if abs(a1) > t1 else zero
        a2 = a2 if abs(a2) > t2 else zero
        a3 = a3 if abs(a3) > t3 else zero
        sg = -one if (((a0 + a1) + a2) + a3) < zero else one
        z0, z1, z2, z3 = a0 * sg, a1 * sg, a2 * sg, a3 * sg
        z0 = z0 if z0 > zero else zero
        z1 = z1 if z1 > zero else zero
        z2 = z2 if z2 > zero else zero
        z3 = z3 if z3 > zero else zero
        v = (((z0 + z1) + z2) + z3) * sg
        if normalize:
            d = (
                ((w0 if z0 > zero else zero) + (w1 if z1 > zero else zero))
                + (w2 if z2 > zero else zero)
            ) + (w3 if z3 > zero else zero)
            if positive:
                d = d if d > tiny else tiny
            else:
                d = one if d == zero else d
            v = v / d
        if use_lam:
            v = v * lam
        o[j] = v


@njit(**_JIT)
def decisions_differ(
    raw, index, count, provisional_t, exact_t, active, raw_out, index_out
):  # pragma: no cover
    """The positions p < ``count`` where some ``active`` adapter a's trimming of ``raw[a, p]``
    may differ between the provisional plan (keep |v| > provisional_t[a]) and the exact one
    (keep |v| > exact_t[a], or |v| = exact_t[a] for a kept tie): |v| on different sides of the
    two thresholds, or equal to the exact one. Their raw values and ``index`` go to
    ``raw_out``/``index_out`` in order; returns how many. Elsewhere the two mixes are the same
    operations on the same kept values, so only these positions need re-mixing."""
    k = raw.shape[0]
    flags = np.zeros(count, np.bool_)
    for a in range(k):  # adapter by adapter: vectorised
        if active[a]:
            tp = provisional_t[a]
            te = exact_t[a]
            row = raw[a]
            for p in range(count):
                v = abs(row[p])
                flags[p] |= ((v > tp) != (v > te)) | (v == te)
    q = 0
    for p in range(count):
        if flags[p]:  # a few per cent of the positions: the branch is cheaper than writing all
            for a in range(k):
                raw_out[a, q] = raw[a, p]
            index_out[q] = index[p]
            q += 1
    return q


@njit(**_JIT)
def bracket_candidates(raw, count, lo, hi, index, vals_out, index_out):  # pragma: no cover - jitted
    """The entries lo ≤ |raw[p]| ≤ hi of ``raw[:count]`` (one adapter's row of the uncertain
    positions' raw values): |raw| into ``vals_out``, ``index[p]`` into ``index_out``, in order;
    returns how many (the outputs hold ``count``)."""
    q = 0
    for p in range(count):
        v = abs(raw[p])
        vals_out[q] = v
        index_out[q] = index[p]
        q += (v >= lo) & (v <= hi)
    return q


def as_scalar(value: float, dtype: np.dtype):
    """``value`` in the arrays' dtype (see the module docstring)."""
    return np.dtype(dtype).type(value)


@njit(**{**_JIT, "fastmath": True})  # only brackets the threshold: reassociated sums are fine
def sample_abs(left, right_t, rows, per_row, seed, out):  # pragma: no cover - jitted
    """|(L R)[i, j]| for each row i of ``rows`` (ascending) at ``per_row`` uniformly random
    columns j, from L ``[m, r]`` and ``right_t`` = Rᵀ ``[n, r]``: a sample stratified by row, so
    no less precise than a uniform one, and L is read in order (uniform positions cost a cache
    miss each: ~35 ns a draw here). Columns from a xorshift64 stream. Only brackets the
    threshold, so the dot product's rounding does not matter."""
    r = left.shape[1]
    n = right_t.shape[0]
    x = np.uint64(seed) | np.uint64(1)
    s13, s7, s17, s32 = np.uint64(13), np.uint64(7), np.uint64(17), np.uint64(32)
    un = np.uint64(n)
    s = 0
    for i in rows:
        for _ in range(per_row):
            x ^= x << s13
            x ^= x >> s7
            x ^= x << s17
            j = np.int64(((x >> s32) * un) >> s32)
            acc = left[i, 0] * right_t[j, 0]
            for t in range(1, r):
                acc += left[i, t] * right_t[j, t]
            out[s] = abs(acc)
            s += 1


@njit(**_JIT)
def scatter_project(out_t, q, rows, cols, delta):  # pragma: no cover - jitted
    """``out_t[c, :] += q[r, :] · δ`` for each (r, c, δ): Qᵀ of a sparse correction, transposed
    (``out_t`` float64 ``[in, q]``)."""
    d = q.shape[1]
    for p in range(rows.shape[0]):
        r = rows[p]
        c = cols[p]
        v = delta[p]
        for t in range(d):
            out_t[c, t] += q[r, t] * v

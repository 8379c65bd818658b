"""Robust aggregation against hostile or broken clients: coordinate-wise median and trimmed mean.

Both need every client's value of a coordinate at once, so they cannot fold clients into one running sum;
they go tensor by tensor instead: decode that tensor from every payload into a [K, numel] block (NaN where a
client sent nothing), reduce it, and move on. Peak memory: the output plus K times the largest tensor.
Norm clipping (clip_norm=) lives in aggregate(): it scales each client's values before any of this.
"""
from __future__ import annotations

import numpy as np

from ..sparsity import KIND_DENSE, KIND_HEAD_COLS, KIND_HEAD_ROWS, element_mask, unpack_bitmap
from ..unpack import decode_entry
from .meta import AggregationError
from .stream import Accumulator, Client


def _mask_bits(c: Client, e) -> np.ndarray | None:
    if e.kind == KIND_DENSE:
        return None
    buf = memoryview(c.buffer)[e.mask_offset:e.mask_offset + -(-e.mask_nbits // 8)]
    return unpack_bitmap(buf, e.mask_nbits)


def reduce_block(sorted_vals: np.ndarray, count: np.ndarray, method: str, trim: float) -> np.ndarray:
    """sorted_vals: float [K, n] sorted along axis 0 with NaN (not sent) last; count: int [n] non-NaN per column.
    Returns float64 [n] (NaN where count == 0)."""
    k, n = sorted_vals.shape
    cols = np.arange(n)
    if method == "median":
        lo = sorted_vals[np.maximum((count - 1) // 2, 0), cols].astype(np.float64)
        hi = sorted_vals[np.maximum(count // 2, 0), cols].astype(np.float64)
        out = (lo + hi) / 2
    else:
        t = np.floor(trim * count).astype(np.int64)
        cs = np.zeros((k + 1, n))
        np.cumsum(np.nan_to_num(sorted_vals, nan=0.0), axis=0, dtype=np.float64, out=cs[1:])
        kept = count - 2 * t
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (cs[count - t, cols] - cs[t, cols]) / kept
    return np.where(count > 0, out, np.nan)


def robust_aggregate(clients: list, method: str, *, trim: float, base, scales: list) -> tuple:
    """Coordinate-wise median / trimmed mean of the clients' transmitted values (unweighted).

    Returns (Accumulator holding the output, {name: head counts}); coordinates no client sent keep base
    (0 without base).
    """
    if not 0 <= trim < 0.5:
        raise AggregationError(f"trim must be in [0, 0.5), got {trim!r}")
    acc = Accumulator(track_sums=False, use_scores=False)
    acc._start(clients[0])
    for c in clients[1:]:
        acc._check(c)
    acc.check_base(base)
    head_counts = {}
    for name in acc.order:
        t = acc.tensors[name]
        block = np.empty((len(clients), t.numel), np.float32)
        counts_h = None
        for i, c in enumerate(clients):
            e = next(x for x in c.tensors if x.name == name)
            row = decode_entry(c.buffer, e, c.layout.group_size).reshape(-1)
            bits = _mask_bits(c, e)
            if e.kind != KIND_DENSE:
                sent = element_mask(e.shape, e.kind, bits).reshape(-1)
                row = np.where(sent, row, np.float32(np.nan))
            if e.kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS):
                counts_h = (np.zeros(e.n_heads, np.int32) if counts_h is None else counts_h) + bits
            block[i] = row * np.float32(scales[i])
        block.sort(axis=0)
        count = np.count_nonzero(~np.isnan(block), axis=0)
        out = reduce_block(block, count, method, trim)
        missing = np.isnan(out)
        if missing.any():
            b = np.asarray(base[name], np.float64).reshape(-1) if base is not None and name in base else 0.0
            out = np.where(missing, b, out)
        acc.acc[t.acc_off:t.acc_off + t.numel] = out
        if counts_h is not None:
            head_counts[name] = counts_h
    return acc, head_counts

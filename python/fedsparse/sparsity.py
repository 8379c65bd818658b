"""Which elements of a tensor travel: dense, head-structured (blocks of rows or columns), or element-wise.

A tensor of any rank is viewed as a matrix [R, C]:
    KIND_HEAD_ROWS:  R = shape[0], C = numel // R; head h owns rows [h*R/H, (h+1)*R/H)
                     (lora_B of a query/key/value projection: its output rows are the heads).
    KIND_HEAD_COLS:  C = shape[-1], R = numel // C; head h owns columns [h*C/H, (h+1)*C/H)
                     (lora_A of an output projection: its input columns are the heads).
    KIND_ELEMENTS:   one mask bit per element, in row-major order (top-k sparsity).
The kept elements are compacted in row-major order of the tensor; that compact vector is what is
quantized. Masks travel as little-endian bitmaps (bit i is bit i%8 of byte i//8).
"""
from __future__ import annotations

import math

import numpy as np

KIND_DENSE, KIND_HEAD_ROWS, KIND_HEAD_COLS, KIND_ELEMENTS = 0, 1, 2, 3
KIND_NAMES = {KIND_DENSE: "dense", KIND_HEAD_ROWS: "head_rows", KIND_HEAD_COLS: "head_cols",
              KIND_ELEMENTS: "elements"}


def numel(shape) -> int:
    return int(math.prod(shape))


def matrix_view(shape, kind: int) -> tuple[int, int]:
    """(R, C) of the matrix view of a tensor of this shape for this sparsity kind."""
    n = numel(shape)
    if kind == KIND_HEAD_ROWS:
        r = shape[0]
        return r, (n // r if r else 0)
    if kind == KIND_HEAD_COLS:
        c = shape[-1]
        return (n // c if c else 0), c
    return 1, n


def mask_bits(shape, kind: int, n_heads: int) -> int:
    """How many mask bits a tensor of this kind carries."""
    if kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS):
        return n_heads
    if kind == KIND_ELEMENTS:
        return numel(shape)
    return 0


def kept_count(shape, kind: int, mask: np.ndarray | None) -> int:
    """Number of elements that travel, given the bool mask of mask_bits() entries."""
    if kind == KIND_DENSE:
        return numel(shape)
    kept = int(np.count_nonzero(mask))
    if kind == KIND_ELEMENTS:
        return kept
    r, c = matrix_view(shape, kind)
    return kept * (r * c // len(mask))


def element_mask(shape, kind: int, mask: np.ndarray | None) -> np.ndarray:
    """bool[R, C]: which elements of the matrix view travel."""
    r, c = matrix_view(shape, kind)
    if kind == KIND_DENSE:
        return np.ones((r, c), dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if kind == KIND_ELEMENTS:
        return mask.reshape(r, c)
    if kind == KIND_HEAD_ROWS:
        return np.repeat(mask, r // len(mask))[:, None].repeat(c, axis=1)
    return np.repeat(mask, c // len(mask))[None, :].repeat(r, axis=0)


def compact(x: np.ndarray, kind: int, mask: np.ndarray | None) -> np.ndarray:
    """float32[kept]: the travelling elements of x in row-major order."""
    x2 = np.asarray(x).reshape(matrix_view(x.shape, kind))
    if kind == KIND_DENSE:
        return x2.reshape(-1)
    return x2[element_mask(x.shape, kind, mask)]


def expand(kept: np.ndarray, shape, kind: int, mask: np.ndarray | None, dtype=np.float32) -> np.ndarray:
    """Inverse of compact: zeros where nothing travelled."""
    if kind == KIND_DENSE:
        return np.asarray(kept, dtype=dtype).reshape(shape)
    out = np.zeros(matrix_view(shape, kind), dtype=dtype)
    out[element_mask(shape, kind, mask)] = kept
    return out.reshape(shape)


def pack_bitmap(mask: np.ndarray) -> bytes:
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="little").tobytes()


def unpack_bitmap(buf, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=n, bitorder="little").astype(bool)

"""The aggregate's last step, _C.scale_units and its numpy twin stream.scale_units_numpy, against per-element
factors built independently, over odd shapes, both modes, empty input and non-finite results; and an overflow
through aggregate() names its tensor, whatever the tensor's weight-sum granularity."""
import numpy as np
import pytest

import fedsparse
from fedsparse import _backend
from fedsparse.server import AggregationError, aggregate
from fedsparse.server.stream import scale_units_numpy
from fedsparse.sparsity import KIND_DENSE, KIND_HEAD_COLS, KIND_HEAD_ROWS

PER_TENSOR, PER_HEAD = 0, 1
IMPLS = {"numpy": scale_units_numpy}
if _backend.native is not None:
    IMPLS["native"] = _backend.native.scale_units


@pytest.fixture(params=sorted(IMPLS))
def scale_units(request):
    return IMPLS[request.param]


def layout(rng, n_tensors):
    """Random tensors laid out one after the other: rows (int64 [n, 7]), the factors and per-element factors."""
    rows, factors, expanded, off = [], [], [], 0
    for _ in range(n_tensors):
        mode = int(rng.integers(2))
        h = int(rng.integers(1, 5))
        kind = int(rng.choice([KIND_HEAD_ROWS, KIND_HEAD_COLS])) if mode == PER_HEAD else KIND_DENSE
        r = h * int(rng.integers(1, 4)) if kind == KIND_HEAD_ROWS else int(rng.integers(1, 7))
        c = h * int(rng.integers(1, 4)) if kind == KIND_HEAD_COLS else int(rng.integers(1, 9))
        f = rng.uniform(0.1, 3, h if mode == PER_HEAD else 1).astype(np.float32)
        if mode == PER_TENSOR:
            per_el = np.full(r * c, f[0])
        elif kind == KIND_HEAD_ROWS:
            per_el = np.repeat(f, r * c // h)
        else:
            per_el = np.tile(np.repeat(f, c // h), r)
        rows.append((off, r, c, h, mode, kind, sum(x.size for x in factors)))
        factors.append(f)
        expanded.append(per_el)
        off += r * c
    return (np.array(rows, np.int64).reshape(-1, 7), np.concatenate(factors + [np.zeros(0, np.float32)]),
            np.concatenate(expanded + [np.zeros(0, np.float32)]).astype(np.float32))


@pytest.mark.parametrize("seed", range(12))
def test_matches_per_element_factors(scale_units, seed):
    rng = np.random.default_rng(seed)
    rows, factors, per_el = layout(rng, int(rng.integers(0, 9)))
    acc = rng.standard_normal(per_el.size).astype(np.float32)
    expected = acc * per_el
    assert scale_units(acc, factors, rows) == -1
    np.testing.assert_array_equal(acc, expected)


def test_a_large_tensor_on_threads(scale_units):
    """Past 2**20 elements the native one splits the rows over threads: the same products."""
    rng = np.random.default_rng(1)
    rows = np.array([[0, 768, 768, 12, PER_HEAD, KIND_HEAD_COLS, 0], [768 * 768, 1024, 768, 4, PER_HEAD,
                     KIND_HEAD_ROWS, 12], [768 * 768 + 1024 * 768, 1, 5, 0, PER_TENSOR, KIND_DENSE, 16]], np.int64)
    f = rng.uniform(0.5, 2, 17).astype(np.float32)
    acc = rng.standard_normal(768 * 768 + 1024 * 768 + 5).astype(np.float32)
    expected = np.concatenate([np.tile(np.repeat(f[:12], 64), 768), np.repeat(f[12:16], 256 * 768),
                               np.full(5, f[16])]) * acc
    assert scale_units(acc, f, rows) == -1
    np.testing.assert_array_equal(acc, expected)


def test_first_non_finite_row(scale_units):
    rng = np.random.default_rng(2)
    rows, factors, per_el = layout(rng, 6)
    acc = np.ones(per_el.size, np.float32)
    assert scale_units(acc.copy(), factors, rows) == -1
    for value, row in ((np.inf, 4), (np.nan, 2), (-np.inf, 5)):
        a = acc.copy()
        a[rows[row, 0] + rows[row, 1] * rows[row, 2] - 1] = value
        a[rows[5, 0]] = np.nan  # a later row too: the first one is named
        assert scale_units(a, factors, rows) == row
    big = np.full(per_el.size, 3e38, np.float32)  # finite in, infinite out
    assert scale_units(big, np.full(factors.size, 2, np.float32), rows) == 0


def test_empty(scale_units):
    acc = np.zeros(0, np.float32)
    assert scale_units(acc, np.zeros(0, np.float32), np.zeros((0, 7), np.int64)) == -1
    rows = np.array([[0, 0, 4, 2, PER_HEAD, KIND_HEAD_COLS, 0]], np.int64)  # a tensor with no rows
    assert scale_units(acc, np.ones(2, np.float32), rows) == -1


@pytest.mark.skipif(_backend.native is None, reason="native module not built")
@pytest.mark.parametrize("row, match", [
    ([0, 2, 4, 2, PER_HEAD, KIND_HEAD_COLS, 2], "factors too short"),
    ([1, 2, 4, 2, PER_TENSOR, KIND_DENSE, 0], "outside acc"),
    ([-1, 2, 4, 2, PER_TENSOR, KIND_DENSE, 0], "outside acc"),
    ([0, 2, 4, 3, PER_HEAD, KIND_HEAD_COLS, 0], "n_heads must divide"),
    ([0, 2, 4, 2, PER_HEAD, KIND_DENSE, 0], "head kind"),
    ([0, 2, 4, 0, 2, KIND_DENSE, 0], "unknown mode"),
    ([0, -2, 4, 0, PER_TENSOR, KIND_DENSE, 0], "bad shape"),
])
def test_bad_rows_raise_before_writing(row, match):
    acc = np.arange(8, dtype=np.float32)
    rows = np.array([[0, 1, 8, 0, PER_TENSOR, KIND_DENSE, 0], row], np.int64)
    with pytest.raises(ValueError, match=match):
        _backend.native.scale_units(acc, np.full(3, 2, np.float32), rows)
    np.testing.assert_array_equal(acc, np.arange(8, dtype=np.float32))
    with pytest.raises(ValueError, match="rows must be"):
        _backend.native.scale_units(acc, np.ones(3, np.float32), rows.astype(np.int32))
    with pytest.raises(ValueError, match="acc must be"):
        _backend.native.scale_units(acc.astype(np.float64), np.ones(3, np.float32), rows)


@pytest.mark.parametrize("topk", [None, 0.5])
@pytest.mark.parametrize("method", ["fedavg", "headwise"])
@pytest.mark.parametrize("backend", sorted(IMPLS))
def test_an_overflowing_aggregate_names_its_tensor(method, backend, topk, monkeypatch):
    """topk: weight sums per element (divided in numpy); else per tensor (scale_units). The first tensor that
    overflowed is named, of either kind."""
    if backend == "numpy":
        monkeypatch.setattr(_backend, "native", None)
    small = np.ones((4, 8), np.float32)
    big = np.full((4, 8), 3e38, np.float32)
    ps = [fedsparse.pack({"a": small, "b": big, "c": big}, bits=32, topk=topk, metadata={"num_examples": 1})
          for _ in range(2)]
    with pytest.raises(AggregationError, match="tensor 'b': the aggregate overflowed float32"):
        aggregate(ps, method=method)

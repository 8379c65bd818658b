"""The native kernel _C.accumulate / _C.sum_squares against numpy (decode, weight, scatter), and its plan checks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedsparse
from fedsparse import _backend
from fedsparse.sparsity import KIND_DENSE, KIND_ELEMENTS, KIND_HEAD_COLS, KIND_HEAD_ROWS, element_mask, matrix_view
from fedsparse.unpack import decode_entry

C = _backend.native
pytestmark = pytest.mark.skipif(C is None, reason="native module not built")
PER_TENSOR, PER_HEAD, PER_ELEMENT = 0, 1, 2


def acc1(payload, plan, weights, scale, group_size, acc, wsum, counts, max_level=2):
    """One payload through the batch kernel (max_level: 8-bit loop on AVX-512 2, AVX2 1, scalar 0, where present)."""
    C.accumulate([payload], [plan], [weights], [scale], [group_size], acc, wsum, counts, max_level=max_level)


def one_tensor_payload(shape, kind, n_heads, mask, bits, group_size, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == KIND_HEAD_ROWS:
        p = fedsparse.pack({"m.q_proj.lora_B": x}, head_mask={"m.q_proj": mask}, bits=bits, group_size=group_size)
    elif kind == KIND_HEAD_COLS:
        p = fedsparse.pack({"m.o_proj.lora_A": x}, head_mask={"m.o_proj": mask}, bits=bits, group_size=group_size)
    elif kind == KIND_ELEMENTS:
        p = fedsparse.pack({"t": x}, topk=0.4, bits=bits, group_size=group_size)
    else:
        p = fedsparse.pack({"t": x}, bits=bits, group_size=group_size)
    u = fedsparse.unpack(p)
    (name,) = list(u)
    return p, u.layout, u.entry(name)


def plan_row(e, acc_off=0, w_off=0, wsum_off=-1, mode=None, mask_off=None, kind=None, n_heads=None):
    kind = e.kind if kind is None else kind
    n_heads = e.n_heads if n_heads is None else n_heads
    r, c = matrix_view(e.shape, kind)
    if mode is None:
        mode = {KIND_DENSE: PER_TENSOR, KIND_ELEMENTS: PER_ELEMENT}.get(kind, PER_HEAD)
    return np.array([[kind, r, c, n_heads, e.mask_offset if mask_off is None else mask_off, e.n_kept, e.bits,
                      e.data_offset, e.data_nbytes, acc_off, w_off, wsum_off, mode]], np.int64)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from([KIND_DENSE, KIND_HEAD_ROWS, KIND_HEAD_COLS, KIND_ELEMENTS]),
       bits=st.sampled_from([32, 16, 8, 4, 2]), group_size=st.sampled_from([16, 64, 256]),
       n_heads=st.integers(1, 6), per_head=st.integers(1, 5), other=st.integers(1, 70),
       seed=st.integers(0, 2**31), scale=st.sampled_from([1.0, 0.37]), per_element=st.booleans(),
       level=st.sampled_from([0, 1, 2]))
def test_accumulate_matches_numpy(kind, bits, group_size, n_heads, per_head, other, seed, scale, per_element, level):
    rng = np.random.default_rng(seed)
    if kind == KIND_HEAD_ROWS:
        shape = (n_heads * per_head, other)
    elif kind == KIND_HEAD_COLS:
        shape = (other, n_heads * per_head)
    else:
        shape = (other, per_head + 1)
    mask = rng.random(n_heads) < 0.6
    p, layout, e = one_tensor_payload(shape, kind, n_heads, mask, bits, group_size, rng)
    numel = int(np.prod(shape))
    heads = kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS)
    nw = e.n_heads if heads else 1
    w = rng.random(nw + 3).astype(np.float32)
    mode = PER_ELEMENT if per_element else None
    n_ws = numel if (per_element or kind == KIND_ELEMENTS) else nw
    acc0 = rng.standard_normal(numel + 5).astype(np.float32)
    ws0 = rng.random(n_ws + 2).astype(np.float32)
    acc, wsum, counts = acc0.copy(), ws0.copy(), np.zeros_like(ws0)
    acc1(p, plan_row(e, acc_off=5, w_off=3, wsum_off=2, mode=mode), w, scale, layout.group_size, acc, wsum,
         counts, max_level=level)

    x = decode_entry(memoryview(p), e, layout.group_size).reshape(-1)
    bits_mask = fedsparse.unpack(p).head_masks.get(e.name, fedsparse.unpack(p).element_masks.get(e.name))
    sent = element_mask(e.shape, e.kind, bits_mask).reshape(-1)
    wu = w[3:3 + nw]
    if heads:
        wel = element_mask(e.shape, e.kind, np.ones(e.n_heads, bool)).astype(np.float32).reshape(-1)
        r, c = matrix_view(e.shape, e.kind)
        grid = np.repeat(wu, r // e.n_heads)[:, None].repeat(c, 1) if e.kind == KIND_HEAD_ROWS else \
            np.repeat(wu, c // e.n_heads)[None, :].repeat(r, 0)
        wel = grid.reshape(-1)
    else:
        wel = np.full(numel, wu[0], np.float32)
    np.testing.assert_allclose(acc[5:], acc0[5:] + np.where(sent, scale * wel * x, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(acc[:5], acc0[:5])
    exp_ws, exp_cnt = ws0.copy(), np.zeros_like(ws0)
    if per_element or kind == KIND_ELEMENTS:
        exp_ws[2:] += np.where(sent, wel, 0)
        exp_cnt[2:] += sent
    elif heads:
        exp_ws[2:] += np.where(bits_mask, wu, 0)
        exp_cnt[2:] += bits_mask
    else:
        exp_ws[2] += wu[0]
        exp_cnt[2] += 1
    np.testing.assert_allclose(wsum, exp_ws, rtol=1e-6)
    np.testing.assert_array_equal(counts, exp_cnt)
    ssq = C.sum_squares(p, plan_row(e), layout.group_size)
    assert ssq == pytest.approx(float(np.square(x.astype(np.float64)).sum()), rel=1e-5, abs=1e-9)


def test_dense_entry_as_all_heads_kept():
    rng = np.random.default_rng(0)
    p, layout, e = one_tensor_payload((8, 5), KIND_DENSE, 0, None, 8, 64, rng)
    w = np.array([1, 2, 3, 4], np.float32)
    acc, ws, cnt = np.zeros(40, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
    acc1(p, plan_row(e, wsum_off=0, kind=KIND_HEAD_ROWS, n_heads=4, mask_off=-1, mode=PER_HEAD), w, 1.0,
                 layout.group_size, acc, ws, cnt)
    x = decode_entry(memoryview(p), e, layout.group_size)
    np.testing.assert_allclose(acc.reshape(8, 5), x * np.repeat(w, 2)[:, None], rtol=1e-6)
    np.testing.assert_array_equal(ws, w)
    np.testing.assert_array_equal(cnt, 1)


@pytest.mark.parametrize("col,value,match", [
    (7, 10**9, "values outside the payload"),
    (7, -1, "values outside the payload"),
    (8, 3, "value section size"),
    (4, 10**9, "mask outside the payload"),
    (9, 100, "accumulator too small"),
    (10, 20, "weights too short"),
    (11, 9, "wsum too short"),
    (12, 0, "wsum_mode does not fit"),
    (0, 7, "unknown sparsity kind"),
    (6, 5, "bad bit width"),
    (3, 3, "n_heads must divide"),
    (5, 1, "value section size|kept"),
])
def test_bad_plans_raise_and_write_nothing(col, value, match):
    rng = np.random.default_rng(1)
    p, layout, e = one_tensor_payload((8, 6), KIND_HEAD_ROWS, 4, np.array([True, False, True, True]), 8, 16, rng)
    good = plan_row(e, wsum_off=0)
    plan = np.concatenate([good, good])
    plan[1, col] = value
    w = np.ones(4, np.float32)
    acc, ws, cnt = np.zeros(48, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=match):
        acc1(p, plan, w, 1.0, layout.group_size, acc, ws, cnt)
    assert not acc.any() and not ws.any() and not cnt.any()


def test_bad_buffers():
    rng = np.random.default_rng(2)
    p, layout, e = one_tensor_payload((8, 6), KIND_DENSE, 0, None, 8, 16, rng)
    plan = plan_row(e, wsum_off=0)
    ok = dict(acc=np.zeros(48, np.float32), wsum=np.zeros(1, np.float32), counts=np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="finite"):
        acc1(p, plan, np.array([np.nan], np.float32), 1.0, 16, **ok)
    with pytest.raises(ValueError, match="scale"):
        acc1(p, plan, np.ones(1, np.float32), float("inf"), 16, **ok)
    with pytest.raises(ValueError, match="plan must be"):
        acc1(p, plan.astype(np.int32), np.ones(1, np.float32), 1.0, 16, **ok)
    with pytest.raises(ValueError, match="acc must be"):
        acc1(p, plan, np.ones(1, np.float32), 1.0, 16, np.zeros(48), ok["wsum"], ok["counts"])
    with pytest.raises(ValueError, match="counts must be"):
        acc1(p, plan, np.ones(1, np.float32), 1.0, 16, ok["acc"], ok["wsum"], np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="group_size"):
        acc1(p, plan, np.ones(1, np.float32), 1.0, 24, **ok)
    shared = np.zeros(60, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        acc1(p, plan, np.ones(1, np.float32), 1.0, 16, shared[:48], shared[40:41], np.zeros(1, np.float32))


def test_batch_equals_one_at_a_time_across_blocks():
    """Tensors bigger than the kernel's 8192-element output blocks, every kind, mixed bits: a batch gives what
    one payload at a time gives (the block boundaries cut heads, rows and groups anywhere)."""
    rng = np.random.default_rng(3)
    specs = [((384, 64), KIND_HEAD_ROWS, 6), ((64, 390), KIND_HEAD_COLS, 6), ((200, 97), KIND_ELEMENTS, 0),
             ((150, 131), KIND_DENSE, 0)]
    for shape, kind, n_heads in specs:
        numel = int(np.prod(shape))
        items = []
        for b, bits in enumerate([8, 8, 4, 32, 16, 2, 8]):
            mask = rng.random(max(n_heads, 1)) < 0.5
            p, layout, e = one_tensor_payload(shape, kind, n_heads, mask, bits, [16, 64, 128][b % 3], rng)
            nw = n_heads if kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS) else 1
            n_ws = numel if kind == KIND_ELEMENTS else nw
            items.append((p, plan_row(e, wsum_off=0), rng.random(nw).astype(np.float32), float(rng.random()),
                          layout.group_size))
        seq = [np.zeros(numel, np.float32), np.zeros(n_ws, np.float32), np.zeros(n_ws, np.float32)]
        for it in items:
            acc1(*it, *seq)
        bat = [np.zeros(numel, np.float32), np.zeros(n_ws, np.float32), np.zeros(n_ws, np.float32)]
        C.accumulate(*[list(x) for x in zip(*items)], *bat)
        for x, y in zip(seq, bat):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
        assert np.abs(seq[0]).sum() > 0


@pytest.mark.parametrize("shape,kind", [((12 * 64, 16), KIND_HEAD_ROWS), ((16, 12 * 64), KIND_HEAD_COLS),
                                        ((12 * 5, 130), KIND_HEAD_ROWS), ((7, 12 * 6), KIND_HEAD_COLS)])
def test_8bit_loop_same_on_every_instruction_set(shape, kind):
    """The 8-bit loop's three builds over a batch that crosses output blocks: whole groups of 64 per head block
    (LoRA shapes: the fast walk) and head blocks that cut groups (the general walk). AVX2 and AVX-512 round
    alike (one fused multiply-add per element); the scalar build within float32 rounding of them."""
    rng = np.random.default_rng(5)
    items = []
    for _ in range(5):
        p, layout, e = one_tensor_payload(shape, kind, 12, rng.random(12) < 0.5, 8, 64, rng)
        items.append((p, plan_row(e, wsum_off=0), rng.random(12).astype(np.float32), float(rng.random()), 64))
    numel = int(np.prod(shape))
    out = {}
    for level in (2, 1, 0):
        bufs = [np.zeros(numel, np.float32), np.zeros(12, np.float32), np.zeros(12, np.float32)]
        C.accumulate(*[list(x) for x in zip(*items)], *bufs, max_level=level)
        out[level] = bufs
    ref = np.zeros(numel, np.float32)
    for p, plan, w, sc, gs in items:
        e = fedsparse.unpack(p).entry(next(iter(fedsparse.unpack(p))))
        x = decode_entry(memoryview(p), e, gs).reshape(-1)
        r, c = matrix_view(e.shape, e.kind)
        wel = (np.repeat(w, r // 12)[:, None].repeat(c, 1) if kind == KIND_HEAD_ROWS else
               np.repeat(w, c // 12)[None, :].repeat(r, 0)).reshape(-1)
        ref += np.float32(sc) * wel * x
    for level in (2, 1, 0):
        np.testing.assert_allclose(out[level][0], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[level][1], out[2][1])
    np.testing.assert_array_equal(out[1][0], out[2][0])


def test_bad_payload_in_a_batch_writes_nothing():
    rng = np.random.default_rng(4)
    p, layout, e = one_tensor_payload((8, 6), KIND_DENSE, 0, None, 8, 16, rng)
    good, bad = plan_row(e), plan_row(e)
    bad[0, 7] = 10**9
    acc = np.zeros(48, np.float32)
    e0 = np.zeros(0, np.float32)
    with pytest.raises(ValueError, match="payload 1: .*values outside the payload"):
        C.accumulate([p, p], [good, bad], [np.ones(1, np.float32)] * 2, [1.0, 1.0], [16, 16], acc, e0, e0.copy())
    assert not acc.any()
    with pytest.raises(ValueError, match="same length"):
        C.accumulate([p, p], [good], [np.ones(1, np.float32)] * 2, [1.0, 1.0], [16, 16], acc, e0, e0.copy())


def test_plans_checked_in_parallel_raise_for_the_first_bad_payload():
    """From 512 plan rows in a batch the plans are built on several threads: whichever thread meets a bad one, the
    error names the first bad payload in batch order, and nothing is written."""
    rng = np.random.default_rng(6)
    p, layout, e = one_tensor_payload((8, 6), KIND_DENSE, 0, None, 8, 16, rng)
    n = 600  # one row each
    plans = [plan_row(e) for _ in range(n)]
    plans[290][0, 7] = 10**9  # values outside the payload
    plans[170][0, 6] = 3  # bad bit width: the first bad one
    acc, e0 = np.zeros(48, np.float32), np.zeros(0, np.float32)
    args = ([p] * n, plans, [np.ones(1, np.float32)] * n, [1.0] * n, [16] * n, acc, e0, e0.copy())
    for _ in range(5):
        with pytest.raises(ValueError, match=r"^fedsparse: payload 170: plan row 0: bad bit width$"):
            C.accumulate(*args)
        assert not acc.any()
    plans[170] = plan_row(e)
    with pytest.raises(ValueError, match=r"^fedsparse: payload 290: plan row 0: values outside the payload$"):
        C.accumulate(*args)
    plans[290] = plan_row(e)
    C.accumulate(*args)
    ref = np.zeros(48, np.float32)
    for _ in range(n):
        acc1(p, plan_row(e), np.ones(1, np.float32), 1.0, 16, ref, e0, e0.copy())
    np.testing.assert_array_equal(acc, ref)


def test_clip_norm_in_the_kernel_equals_scaling_by_the_norm():
    """clip_norm: each payload's scale times min(1, clip / ||values||), the norm from sum_squares; every kind
    and width, group sizes that differ within the batch, payloads above and below the clip."""
    rng = np.random.default_rng(5)
    specs = [((48, 32), KIND_HEAD_ROWS, 4, 8), ((32, 40), KIND_HEAD_COLS, 4, 4), ((30, 17), KIND_ELEMENTS, 0, 8),
             ((25, 9), KIND_DENSE, 0, 16), ((12, 7), KIND_DENSE, 0, 32), ((40, 30), KIND_DENSE, 0, 2),
             ((0, 5), KIND_DENSE, 0, 8)]
    gss = [16, 256, 64, 16]
    e0 = np.zeros(0, np.float32)
    for shape, kind, n_heads, bits in specs:
        items = [one_tensor_payload(shape, kind, n_heads, rng.random(max(n_heads, 1)) < 0.6, bits, gs, rng)
                 for gs in gss]
        plans = [plan_row(e) for _, _, e in items]
        nw = n_heads if kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS) else 1
        ws = [rng.random(nw).astype(np.float32) + 0.5 for _ in items]
        norms = [np.sqrt(C.sum_squares(p, plan, gs)) for (p, _, _), plan, gs in zip(items, plans, gss)]
        clip = float(np.median(norms)) or 1.0
        scales = [0.5, 2.0, 1.0, 0.25]
        numel = int(np.prod(shape))
        payloads = [p for p, _, _ in items]

        def run(sc, **kw):
            out = np.zeros(numel, np.float32)
            C.accumulate(payloads, plans, ws, sc, gss, out, e0, e0.copy(), **kw)
            return out

        got = run(scales, clip_norm=clip)
        np.testing.assert_array_equal(got, run([s * (min(1.0, clip / n) if n > 0 else 1.0)
                                                for s, n in zip(scales, norms)]))
        if numel and max(norms) > clip:
            assert not np.array_equal(got, run(scales))
    p, _, e = items[0]
    with pytest.raises(ValueError, match="clip_norm"):
        C.accumulate([p], [plan_row(e)], [np.ones(1, np.float32)], [1.0], [16], np.zeros(0, np.float32), e0, e0.copy(),
                     clip_norm=-1.0)


def multi_tensor_batch(order, n=4, seed=8):
    """n payloads of LoRA-like tensors (head rows, head columns, dense; 8, 4 and 16 bits) big enough for two
    threads and several runs of output blocks, with plans whose accumulator layout follows `order` (sorted or
    reversed names: the payloads' tensors then lie in the accumulator's order or against it)."""
    rng = np.random.default_rng(seed)
    payloads = []
    for b in range(n):
        update = {f"l{i}.q_proj.lora_B": rng.standard_normal((768, 16)).astype(np.float32) for i in range(3)}
        update.update({f"l{i}.o_proj.lora_A": rng.standard_normal((16, 768)).astype(np.float32) for i in range(3)})
        update["l0.dense"] = rng.standard_normal((100, 130)).astype(np.float32)
        masks = {f"l{i}.{m}": rng.random(12) < 0.5 for i in range(3) for m in ("q_proj", "o_proj")}
        payloads.append(fedsparse.pack(update, head_mask=masks, bits=[8, 4, 16, 8][b % 4], group_size=64,
                                       metadata={"client_id": b, "note": "x" * 300}))
    entries = [e for e in fedsparse.unpack(payloads[0]).layout.entries if not e.is_meta]
    names = sorted((e.name for e in entries), reverse=order == "reversed")
    off = dict(zip(names, np.cumsum([0] + [int(np.prod(e.shape)) for e in sorted(
        entries, key=lambda e: names.index(e.name))])[:-1]))
    plans = []
    for p in payloads:
        es = [e for e in fedsparse.unpack(p).layout.entries if not e.is_meta]
        plans.append(np.concatenate([plan_row(e, acc_off=int(off[e.name]), w_off=0, wsum_off=-1,
                                              mode=PER_TENSOR if e.kind == KIND_DENSE else PER_HEAD) for e in es]))
    numel = sum(int(np.prod(e.shape)) for e in entries)
    args = [payloads, plans, [np.ones(12, np.float32)] * n, [1.0] * n, [64] * n]
    return args, numel


@pytest.mark.parametrize("level", [2, 1])
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_check_crc_catches_a_flipped_byte_anywhere(order, level):
    """accumulate(check_crc=True) checks each payload's CRC-32 within its own pass (the ranges of the threads'
    runs combined; on AVX-512, level 2, the 8-bit multiply-add folds the codes in itself): the sums are those
    without the check, and a byte flipped anywhere in a payload (header, metadata, table, masks, scales, codes,
    the CRC itself) raises for that payload, however the payload's tensors lie against the accumulator."""
    args, numel = multi_tensor_batch(order)
    out = [np.zeros(numel, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)]
    C.accumulate(*args, *out, max_level=level)
    checked = [np.zeros(numel, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)]
    C.accumulate(*args, *checked, max_level=level, check_crc=True)
    np.testing.assert_array_equal(checked[0], out[0])
    payloads = args[0]
    rng = np.random.default_rng(1)
    for b in (0, 2, 3):
        size = len(payloads[b])
        edges = {x for e in fedsparse.unpack(payloads[b]).layout.entries
                 for x in (e.mask_offset, e.data_offset, e.data_offset + 5, e.data_offset + e.data_nbytes - 1)}
        for pos in sorted({0, 7, 25, size // 2, size - 5, size - 4, size - 1, *edges,
                           *rng.integers(0, size, 40).tolist()}):
            bad = bytearray(payloads[b])
            bad[pos] ^= 0x10
            trial = list(payloads)
            trial[b] = bytes(bad)
            acc = np.zeros(numel, np.float32)
            with pytest.raises(ValueError, match=rf"^fedsparse: payload {b}: (CRC mismatch|plan row \d+: kept-element)"):
                C.accumulate(trial, *args[1:], acc, out[1], out[2], max_level=level, check_crc=True)
    with pytest.raises(ValueError, match=r"payload 0: CRC mismatch"):  # the first bad one in batch order
        C.accumulate([payloads[0][:-1] + b"\0", payloads[1], payloads[2], payloads[3][:-1] + b"\0"], *args[1:],
                     np.zeros(numel, np.float32), out[1], out[2], max_level=level, check_crc=True)


@pytest.mark.parametrize("portable", [False, True])
def test_crc32_combine_matches_zlib(portable):
    """The carry-less-multiply products (where the CPU has PCLMULQDQ) and the bit-serial fallback alike."""
    import zlib
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    for cut in (0, 1, 15, 64, 4097, 99_999, 100_000, *rng.integers(0, 100_000, 40).tolist()):
        a, b = data[:cut], data[cut:]
        assert C.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b), portable) == zlib.crc32(data)

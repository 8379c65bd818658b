"""Hostile bytes: every malformed payload raises PayloadError, in the native and the reference parser alike.

Mutations re-seal the CRC, so that they reach the structural checks behind it. Both parsers must agree:
either both raise PayloadError, or both accept and decode to the same arrays.
"""
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedsparse
from fedsparse import PayloadError, _backend, pack, unpack
from fedsparse.wire import HEADER, MAGIC, encode_table_entry, write_payload

needs_native = pytest.mark.skipif(not fedsparse.has_native(), reason="native module not built")


def seeds():
    rng = np.random.default_rng(0)
    upd = {"l.q.lora_A.weight": rng.standard_normal((4, 24)).astype(np.float32),
           "l.q.lora_B.weight": rng.standard_normal((24, 4)).astype(np.float32),
           "l.o_proj.lora_A.weight": rng.standard_normal((4, 24)).astype(np.float32),
           "v": rng.standard_normal(37).astype(np.float32)}
    mask = np.array([True, False, True, False, False, True])
    out = []
    for bits in (32, 16, 8, 4, 2):
        out.append(pack(upd, bits=bits, group_size=16, head_mask={"l.q": mask, "l.o_proj": mask},
                        metadata={"client_id": "c", "round": 2, "head_scores": np.arange(6.0)}))
    out.append(pack({"t": rng.standard_normal((9, 7)).astype(np.float32)}, bits=4, topk=0.3))
    out.append(pack({}))
    return out


SEEDS = seeds()


def reseal(body: bytes) -> bytes:
    """Replace the trailing CRC with the right one (the payload keeps its length)."""
    if len(body) < 4:
        return body
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def outcome(payload, native: bool):
    saved = _backend.native
    if not native:
        _backend.native = None
    try:
        u = unpack(payload, max_elements=1 << 20)
        arrays = {k: u[k] for k in u}
        meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in u.metadata.items()}
        return ("ok", u.layout, {k: a.tobytes() for k, a in arrays.items()}, repr(sorted(meta.items())))
    except PayloadError:
        return ("error",)
    finally:
        _backend.native = saved


def check(payload):
    ref = outcome(payload, native=False)
    if fedsparse.has_native():
        assert outcome(payload, native=True) == ref
    return ref


def mutate(rng, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.integers(6)
    if op == 0 and b:  # flip bytes
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(len(b))] ^= 1 << rng.integers(8)
    elif op == 1 and b:  # set a byte to an extreme
        b[rng.integers(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
    elif op == 2:  # truncate
        b = b[: rng.integers(len(b) + 1)]
    elif op == 3:  # insert random bytes
        at = rng.integers(len(b) + 1)
        b[at:at] = rng.bytes(int(rng.integers(1, 9)))
    elif op == 4 and len(b) > 1:  # delete a span
        at = rng.integers(len(b))
        del b[at: at + rng.integers(1, 9)]
    else:  # append garbage
        b += rng.bytes(int(rng.integers(1, 9)))
    return bytes(b)


def test_seeds_are_valid():
    for s in SEEDS:
        assert check(s)[0] == "ok"


@pytest.mark.parametrize("seed_index", range(len(SEEDS)))
def test_thousands_of_resealed_mutations(seed_index):
    rng = np.random.default_rng(seed_index)
    errors = 0
    for _ in range(1500):
        data = mutate(rng, SEEDS[seed_index])
        if rng.random() < 0.5:
            data = mutate(rng, data)
        if rng.random() < 0.9:
            data = reseal(data)
        errors += check(data)[0] == "error"
    assert errors > 100  # the mutations do reach the checks


def test_unsealed_corruption_fails_the_crc():
    rng = np.random.default_rng(1)
    for seed in SEEDS:
        for _ in range(50):
            b = bytearray(seed)
            b[rng.integers(len(b))] ^= 0x10
            with pytest.raises(PayloadError):
                unpack(bytes(b))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_behind_a_valid_header(tail, seal):
    data = MAGIC + struct.pack("<H", 1) + tail + b"\0\0\0\0"
    check(reseal(data) if seal else data)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    assert check(data) == ("error",) or data.startswith(MAGIC)


def craft(shape, kind=0, n_heads=0, bits=32, mask=b"", values=b"", group_size=64, meta=b""):
    entry = encode_table_entry(b"", b"w", "float32", bits, kind, False, n_heads, shape)
    return write_payload(group_size, meta, [entry], [mask + values])


@pytest.mark.parametrize("payload,match", [
    (b"", "truncated"),
    (b"NOPE" + bytes(30), "magic"),
    (reseal(MAGIC + struct.pack("<H", 9) + bytes(18)), "version 9"),
    (craft((3,), values=np.ones(3, "<f4").tobytes())[:-6], "CRC"),
    (reseal(craft((3,), values=np.ones(3, "<f4").tobytes()) + b"junk"), "trailing garbage|truncated"),
    (craft((1 << 30, 1 << 30), kind=1, n_heads=1, mask=b"\0"), "exceed|cap"),
    (craft((4,), values=np.array([1, np.nan, 0, 0], "<f4").tobytes()), "NaN"),
    (craft((4,), bits=8, values=struct.pack("<f", 1.0) + np.array([np.nan], "<f2").tobytes() + bytes(4)),
     "scales"),
    (craft((4,), bits=8, values=struct.pack("<f", -1.0) + np.array([1], "<f2").tobytes() + bytes(4)),
     "scale"),
    (craft((3,), bits=4, values=struct.pack("<f", 1.0) + np.array([1], "<f2").tobytes() + b"\x11\xf1"),
     "padding"),
    (craft((4,), kind=1, n_heads=3, mask=b"\x01"), "divide"),
    (craft((4,), kind=1, n_heads=2, mask=b"\x05"), "padding"),
    (craft((2,), group_size=48, values=bytes(8)), "group_size"),
    (craft((2,), meta=b"[1]", values=bytes(8)), "JSON object"),
    (craft((2,), meta=b"{bad", values=bytes(8)), "JSON"),
])
def test_crafted_payloads_name_what_is_wrong(payload, match):
    with pytest.raises(PayloadError, match=match):
        unpack(payload)
    check(payload)


def test_element_cap_is_configurable():
    payload = craft((1000,), kind=1, n_heads=1, mask=b"\0")  # all pruned: tiny payload, big declared shape
    assert unpack(payload)["w"].shape == (1000,)
    with pytest.raises(PayloadError, match="cap|exceed"):
        unpack(payload, max_elements=999)


def test_non_bytes_input():
    with pytest.raises(PayloadError, match="bytes-like"):
        unpack("FSPK")


def test_header_size_is_documented():
    assert HEADER.size == 20


@pytest.mark.parametrize("native", [True, False])
def test_a_value_error_comes_before_a_later_structural_one(native, monkeypatch):
    """The native parser finds where every tensor lies first and checks the values after (their reads then
    overlap): an error still names the first thing wrong in payload order, as the reference parser does."""
    if native and not fedsparse.has_native():
        pytest.skip("native module not built")
    x = np.ones((4, 64), np.float32)
    good = pack({"a": x, "b": x}, bits=8, group_size=64)
    p = bytearray(good)
    e = unpack(good).entry("a")
    p[e.data_offset + 4:e.data_offset + 6] = struct.pack("<H", 0x7E00)  # a NaN group scale of 'a'
    if not native:
        monkeypatch.setattr(_backend, "native", None)
    with pytest.raises(PayloadError, match="values of 'a': group scales"):
        unpack(reseal(bytes(p[:-10]) + bytes(4)))  # and 'b' cut short
    with pytest.raises(PayloadError, match="truncated payload: values of 'b'"):
        unpack(reseal(good[:-10] + bytes(4)))

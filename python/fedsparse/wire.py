"""The fedsparse wire format, version 1: layout constants, the writer and the reference parser.

docs/wire-format.md describes it byte by byte. Everything is little-endian on every host:

    header   20 B   magic b"FSPK", u16 version, u16 flags (0), u32 group_size, u32 n_tensors, u32 meta_len
    meta     meta_len B of UTF-8 JSON (an object)
    table    n_tensors entries: varint prefix_len, varint suffix_len, suffix, u8 dtype, u8 bits,
             u8 flags (bits 0-1: sparsity kind, bit 2: metadata array), varint n_heads, u8 ndim, ndim varints
    data     per entry, in table order: mask bitmap, then values
             (bits 32/16: raw float32/float16; bits 8/4/2: f32 tstep, f16 scales[G], codes)
    crc      u32 CRC-32 (zlib) of every byte before it

The parser trusts nothing: every length is bounds-checked before it is used, the sizes of the data
sections follow from the table and must add up to the payload exactly, and declared shapes are capped.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _backend
from .errors import PayloadError
from .quant import ALL_BITS, code_bytes, num_groups
from .sparsity import KIND_DENSE, KIND_ELEMENTS, KIND_HEAD_COLS, KIND_HEAD_ROWS, matrix_view

MAGIC = b"FSPK"
VERSION = 1
HEADER = struct.Struct("<4sHHIII")
CRC_SIZE = 4
MIN_PAYLOAD = HEADER.size + CRC_SIZE

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}
FLAG_META = 0x4
KIND_MASK = 0x3

MAX_TENSORS = 1 << 16
MAX_NAME_BYTES = 1024
MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1
MAX_META_BYTES = 1 << 20
MIN_GROUP, MAX_GROUP = 16, 1 << 16
DEFAULT_MAX_ELEMENTS = 1 << 28  # 1 GiB of float32 once decoded


class Entry(NamedTuple):
    """One tensor of a parsed payload; offsets are into the payload bytes. A NamedTuple: the server
    builds one per tensor per client, and tuples are several times cheaper than frozen dataclasses."""

    name: str
    dtype: str
    bits: int
    kind: int
    is_meta: bool
    n_heads: int
    shape: tuple
    mask_offset: int
    mask_nbits: int
    n_kept: int
    data_offset: int
    data_nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    version: int
    group_size: int
    meta_offset: int
    meta_len: int
    entries: tuple


def values_nbytes(n_kept: int, bits: int, group_size: int) -> int:
    """Bytes of an entry's value section."""
    if bits == 32:
        return 4 * n_kept
    if bits == 16:
        return 2 * n_kept
    return 4 + 2 * num_groups(n_kept, group_size) + code_bytes(n_kept, bits)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_table_entry(prev_name: bytes, name: bytes, dtype: str, bits: int, kind: int, is_meta: bool,
                       n_heads: int, shape) -> bytes:
    prefix = 0
    for a, b in zip(prev_name, name):
        if a != b:
            break
        prefix += 1
    suffix = name[prefix:]
    flags = kind | (FLAG_META if is_meta else 0)
    dims = b"".join(_varint(int(d)) for d in shape)
    return (_varint(prefix) + _varint(len(suffix)) + suffix
            + bytes((DTYPE_CODES[dtype], bits, flags)) + _varint(n_heads) + bytes((len(shape),)) + dims)


def new_payload(group_size: int, meta_json: bytes, table: list[bytes], data_nbytes: int) -> tuple[np.ndarray, int]:
    """(uint8 buffer of the whole payload with header, metadata and table written, offset of the data)."""
    head = b"".join([HEADER.pack(MAGIC, VERSION, 0, group_size, len(table), len(meta_json)), meta_json, *table])
    n = len(head) + data_nbytes + CRC_SIZE
    native = _backend.native
    # Natively: an array over a fresh bytes object, so that seal_payload returns it without a copy.
    out = native.payload_buffer(n) if native is not None and hasattr(native, "payload_buffer") else np.empty(n, np.uint8)
    out[:len(head)] = np.frombuffer(head, np.uint8)
    return out, len(head)


def seal_payload(out: np.ndarray) -> bytes:
    """Write the CRC of everything before it into the last 4 bytes; return the payload."""
    crc32 = _backend.native.crc32 if _backend.native is not None else zlib.crc32  # same value, faster
    out[-CRC_SIZE:] = np.frombuffer(struct.pack("<I", crc32(out[:-CRC_SIZE])), np.uint8)
    return out.base if type(out.base) is bytes else out.tobytes()


def write_payload(group_size: int, meta_json: bytes, table: list[bytes], sections: list[bytes]) -> bytes:
    """Assemble a payload from ready sections (tests and tools craft payloads with this)."""
    out, offset = new_payload(group_size, meta_json, table, sum(map(len, sections)))
    for section in sections:
        out[offset:offset + len(section)] = np.frombuffer(section, np.uint8)
        offset += len(section)
    return seal_payload(out)


class _Reader:
    """Bounds-checked cursor over untrusted bytes."""

    def __init__(self, buf: memoryview, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.end - self.pos:
            raise PayloadError(f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                               f"{self.end - self.pos} left")
        start = self.pos
        self.pos += n
        return start

    def u8(self, what: str) -> int:
        return self.buf[self.take(1, what)]

    def varint(self, what: str, limit: int) -> int:
        value, shift = 0, 0
        while True:
            b = self.u8(what)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 35:
                raise PayloadError(f"malformed varint for {what} at offset {self.pos}")
        if value > limit:
            raise PayloadError(f"{what} = {value} exceeds the limit {limit}")
        return value


def parse(payload, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Layout:
    """Reference parser: validate the whole payload structure and return its layout.

    Raises PayloadError on anything malformed. Validates CRC, every bound, and the values that could
    poison a decode (NaN/Inf or out-of-range scales, raw NaN/Inf values, non-zero padding bits).
    """
    buf = memoryview(payload).cast("B")
    n = len(buf)
    if n < MIN_PAYLOAD:
        raise PayloadError(f"truncated payload: {n} bytes, a payload has at least {MIN_PAYLOAD}")
    magic, version, flags, group_size, n_tensors, meta_len = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: not a fedsparse payload")
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version} (this fedsparse reads version {VERSION})")
    (crc,) = struct.unpack_from("<I", buf, n - CRC_SIZE)
    if zlib.crc32(buf[: n - CRC_SIZE]) != crc:
        raise PayloadError("CRC mismatch: payload corrupted or truncated")
    if flags != 0:
        raise PayloadError(f"unknown header flags 0x{flags:04x}")
    if not (MIN_GROUP <= group_size <= MAX_GROUP) or group_size & (group_size - 1):
        raise PayloadError(f"group_size {group_size} is not a power of two in [{MIN_GROUP}, {MAX_GROUP}]")
    if n_tensors > MAX_TENSORS:
        raise PayloadError(f"{n_tensors} tensors exceeds the limit {MAX_TENSORS}")
    if meta_len > MAX_META_BYTES:
        raise PayloadError(f"metadata of {meta_len} bytes exceeds the limit {MAX_META_BYTES}")
    r = _Reader(buf, HEADER.size, n - CRC_SIZE)
    meta_offset = r.take(meta_len, "metadata")

    heads = []
    prev = b""
    total_elements = 0
    for i in range(n_tensors):
        what = f"tensor #{i}"
        prefix = r.varint(f"{what} name prefix", len(prev))
        suffix_len = r.varint(f"{what} name length", MAX_NAME_BYTES - prefix)
        name = prev[:prefix] + bytes(buf[r.take(suffix_len, f"{what} name"): r.pos])
        if not name:
            raise PayloadError(f"{what} has an empty name")
        prev = name
        dtype_code, bits, tflags = r.u8(f"{what} dtype"), r.u8(f"{what} bits"), r.u8(f"{what} flags")
        if dtype_code not in DTYPE_NAMES:
            raise PayloadError(f"{what}: unknown dtype code {dtype_code}")
        if bits not in ALL_BITS:
            raise PayloadError(f"{what}: unsupported bit width {bits}")
        if tflags & ~(KIND_MASK | FLAG_META):
            raise PayloadError(f"{what}: unknown flags 0x{tflags:02x}")
        kind = tflags & KIND_MASK
        n_heads = r.varint(f"{what} n_heads", MAX_DIM)
        ndim = r.u8(f"{what} ndim")
        if ndim > MAX_NDIM:
            raise PayloadError(f"{what}: {ndim} dimensions exceeds the limit {MAX_NDIM}")
        shape = tuple(r.varint(f"{what} dim", MAX_DIM) for _ in range(ndim))
        numel = math.prod(shape)
        total_elements += numel
        if total_elements > max_elements:
            raise PayloadError(f"{what}: declared shapes total {total_elements} elements, over the cap "
                               f"{max_elements}")
        if kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS):
            if ndim == 0 or n_heads == 0:
                raise PayloadError(f"{what}: head sparsity needs a tensor of rank >= 1 and n_heads >= 1")
            rows, cols = matrix_view(shape, kind)
            if (rows if kind == KIND_HEAD_ROWS else cols) % n_heads:
                raise PayloadError(f"{what}: {n_heads} heads do not divide shape {shape}")
        elif n_heads != 0:
            raise PayloadError(f"{what}: n_heads = {n_heads} given for a tensor without head sparsity")
        heads.append((name, DTYPE_NAMES[dtype_code], bits, kind, bool(tflags & FLAG_META), n_heads, shape))

    entries = []
    for name, dtype, bits, kind, is_meta, n_heads, shape in heads:
        label = repr(name.decode("utf-8", "replace"))
        numel = math.prod(shape)
        nbits = n_heads if kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS) else (numel if kind == KIND_ELEMENTS else 0)
        mask_offset = r.take(-(-nbits // 8), f"mask of {label}")
        mask = np.frombuffer(buf, np.uint8, -(-nbits // 8), mask_offset)
        if nbits % 8 and mask[-1] >> (nbits % 8):
            raise PayloadError(f"mask of {label} has non-zero padding bits")
        kept = int(np.unpackbits(mask, count=nbits, bitorder="little").sum()) if nbits else 0
        n_kept = numel if kind == KIND_DENSE else (kept if kind == KIND_ELEMENTS else kept * (numel // n_heads))
        size = values_nbytes(n_kept, bits, group_size)
        data_offset = r.take(size, f"values of {label}")
        _check_values(buf, data_offset, n_kept, bits, group_size, label)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError(f"tensor name {name!r} is not valid UTF-8") from None
        entries.append(Entry(text, dtype, bits, kind, is_meta, n_heads, shape,
                             mask_offset, nbits, n_kept, data_offset, size))
    if r.pos != r.end:
        raise PayloadError(f"{r.end - r.pos} bytes of trailing garbage after the last tensor")
    return Layout(version, group_size, meta_offset, meta_len, tuple(entries))


def _check_values(buf, offset: int, n_kept: int, bits: int, group_size: int, label: str) -> None:
    if bits in (32, 16):
        vals = np.frombuffer(buf, "<f4" if bits == 32 else "<f2", n_kept, offset)
        if not np.isfinite(vals).all():
            raise PayloadError(f"values of {label} contain NaN or Inf")
        return
    (tstep,) = struct.unpack_from("<f", buf, offset)
    # Decoded values are at most 2**(bits-1) * tstep (a hostile code may be one past qmax): keep that finite.
    with np.errstate(over="ignore"):
        peak = np.float32(tstep) * np.float32(1 << (bits - 1))
    if not (tstep >= 0 and np.isfinite(peak)):
        raise PayloadError(f"values of {label}: tensor scale {tstep} is not a finite non-negative number "
                           "small enough to decode")
    g = num_groups(n_kept, group_size)
    scales = np.frombuffer(buf, "<f2", g, offset + 4)
    if not ((scales >= 0) & (scales <= 1)).all():  # NaN fails both comparisons
        raise PayloadError(f"values of {label}: group scales outside [0, 1] or NaN")
    nbytes = code_bytes(n_kept, bits)
    used = (n_kept * bits) % 8
    if used and buf[offset + 4 + 2 * g + nbytes - 1] >> used:
        raise PayloadError(f"codes of {label} have non-zero padding bits")


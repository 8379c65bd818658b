"""unpack(): payload bytes -> PackedUpdate, a read-only mapping of names to dequantized arrays."""
from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from . import _backend, gpu_pack
from .errors import PayloadError
from .quant import dequantize
from .sparsity import KIND_DENSE, KIND_ELEMENTS, expand, matrix_view, unpack_bitmap
from .wire import DEFAULT_MAX_ELEMENTS, DTYPE_NAMES, Entry, Layout, parse


def parse_layout(payload, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Layout:
    """Validate a payload (native parser when built, else the reference) and return its layout."""
    native = _backend.native
    if native is None:
        return parse(payload, max_elements)
    try:
        version, group_size, meta_offset, meta_len, raw = native.parse_payload(payload, max_elements)
    except ValueError as exc:
        raise PayloadError(str(exc)) from None
    return Layout(version, group_size, meta_offset, meta_len, entries_from_native(raw))


def entries_from_native(raw) -> tuple:
    """Entry objects from the native parser's entry tuples (names as UTF-8 bytes, dtype codes)."""
    try:
        return tuple(Entry._make((t[0].decode("utf-8"), DTYPE_NAMES[t[1]]) + t[2:]) for t in raw)
    except UnicodeDecodeError:
        raise PayloadError("a tensor name is not valid UTF-8") from None


def read_metadata(buf, layout: Layout, meta_entries) -> dict:
    """The payload's metadata: its JSON object plus the decoded array entries (meta_entries)."""
    raw = bytes(memoryview(buf)[layout.meta_offset:layout.meta_offset + layout.meta_len])
    meta = {}
    if raw:
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise PayloadError(f"metadata is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise PayloadError("metadata must be a JSON object")
    for e in meta_entries:
        if e.name in meta:
            raise PayloadError(f"metadata key {e.name!r} given twice")
        meta[e.name] = decode_entry(buf, e, layout.group_size)
    return meta


def decode_entry(buf, entry: Entry, group_size: int) -> np.ndarray:
    """float32 array of entry.shape: the dequantized values, zeros where nothing travelled."""
    if entry.bits == 32 and entry.kind == KIND_DENSE:  # stored as they are (a server's metadata arrays): a copy
        return np.frombuffer(buf, "<f4", entry.n_kept, entry.data_offset).astype(np.float32).reshape(entry.shape)
    values = np.frombuffer(buf, np.uint8, entry.data_nbytes, entry.data_offset)
    mask_bytes = np.frombuffer(buf, np.uint8, -(-entry.mask_nbits // 8), entry.mask_offset)
    native = _backend.native
    if native is not None:
        rows, cols = matrix_view(entry.shape, entry.kind)
        out = np.zeros(entry.shape, dtype=np.float32)
        native.dequantize(values, entry.kind, rows, cols, entry.n_heads, mask_bytes, entry.n_kept, entry.bits,
                          group_size, out.reshape(-1))
        return out
    if entry.bits == 32:
        kept = values.view("<f4").astype(np.float32)
    elif entry.bits == 16:
        kept = values.view("<f2").astype(np.float32)
    else:
        tstep = values[:4].view("<f4")[0]
        g = -(-entry.n_kept // group_size)
        scales = values[4:4 + 2 * g].view("<f2")
        kept = dequantize(tstep, scales, values[4 + 2 * g:], entry.n_kept, entry.bits, group_size)
    mask = unpack_bitmap(mask_bytes, entry.mask_nbits) if entry.kind != KIND_DENSE else None
    return expand(kept, entry.shape, entry.kind, mask)


class PackedUpdate(Mapping):
    """A parsed payload: name -> float32 numpy array, decoded on each access (nothing is cached, so
    memory stays bounded; `dict(update)` decodes everything once).

    Attributes: metadata (dict; array-valued entries as float32 numpy arrays), shapes, dtypes (the
    original dtype names), bits, head_masks (name -> bool[H] for head-sparse tensors), element_masks
    (name -> bool[numel] for top-k tensors), nbytes (payload length), group_size, layout.
    """

    def __init__(self, payload, layout: Layout):
        self.buffer = memoryview(payload).cast("B")
        self.layout = layout
        self.group_size = layout.group_size
        self.nbytes = len(self.buffer)
        self._entries = {e.name: e for e in layout.entries if not e.is_meta}
        if len(self._entries) + sum(e.is_meta for e in layout.entries) != len(layout.entries):
            raise PayloadError("duplicate tensor names in payload")
        self.metadata = read_metadata(self.buffer, layout, [e for e in layout.entries if e.is_meta])

    def __getitem__(self, name: str) -> np.ndarray:
        return decode_entry(self.buffer, self._entries[name], self.group_size)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry:
        return self._entries[name]

    @property
    def shapes(self) -> dict:
        return {n: e.shape for n, e in self._entries.items()}

    @property
    def dtypes(self) -> dict:
        return {n: e.dtype for n, e in self._entries.items()}

    @property
    def bits(self) -> dict:
        return {n: e.bits for n, e in self._entries.items()}

    @property
    def head_masks(self) -> dict:
        return {n: self._mask(e) for n, e in self._entries.items() if e.kind not in (KIND_DENSE, KIND_ELEMENTS)}

    @property
    def element_masks(self) -> dict:
        return {n: self._mask(e) for n, e in self._entries.items() if e.kind == KIND_ELEMENTS}

    def _mask(self, e: Entry) -> np.ndarray:
        return unpack_bitmap(self.buffer[e.mask_offset:e.mask_offset + -(-e.mask_nbits // 8)], e.mask_nbits)

    def torch(self, name: str, device=None):
        """The tensor as torch, in its original dtype, on device (decoded there by the Triton kernels
        when device is a CUDA device)."""
        import torch

        dtype = getattr(torch, self._entries[name].dtype)
        if device is not None and torch.device(device).type == "cuda" and gpu_pack.available():
            return gpu_pack.decode_entry(self.buffer, self._entries[name], self.group_size, device).to(dtype)
        return torch.from_numpy(self[name]).to(device=device, dtype=dtype)

    def to_dict(self, *, as_torch: bool = False, device=None) -> dict:
        return {n: (self.torch(n, device) if as_torch else self[n]) for n in self}

    def __repr__(self) -> str:
        return (f"PackedUpdate({len(self)} tensors, {self.nbytes} bytes, group_size={self.group_size}, "
                f"metadata keys={sorted(self.metadata)})")


def unpack(payload, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> PackedUpdate:
    """Parse and validate a payload. Raises PayloadError (a ValueError) on any malformed bytes.

    max_elements caps the total declared elements (default 2**28, 1 GiB once decoded to float32).
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes-like, got {type(payload).__name__}")
    payload = bytes(payload) if isinstance(payload, bytearray) else payload
    return PackedUpdate(payload, parse_layout(payload, max_elements))

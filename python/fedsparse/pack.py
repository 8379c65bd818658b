"""pack(): a LoRA update -> the fewest bytes that still reconstruct it well (wire format: wire.py)."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping

import numpy as np

from . import _backend, gpu_pack
from .errors import PackError
from .quant import ALL_BITS, quantize
from .sparsity import (KIND_DENSE, KIND_ELEMENTS, KIND_HEAD_COLS, KIND_HEAD_ROWS, compact, kept_count,
                       matrix_view, pack_bitmap)
from .wire import (DTYPE_CODES, MAX_GROUP, MAX_NAME_BYTES, MAX_NDIM, MIN_GROUP, encode_table_entry,
                   new_payload, seal_payload, values_nbytes)

# Modules whose heads are their *input* columns (attention output projections): Llama/Qwen/Mistral
# o_proj, BERT attention.output.dense, T5 SelfAttention.o / EncDecAttention.o, OPT/BART out_proj.
DEFAULT_HEAD_COLS_PATTERN = r"(o_proj|out_proj|attention\.output\.dense|Attention\.o)$"
_LORA_A = re.compile(r"(^|\.)lora_A(\.|$)")
_LORA_B = re.compile(r"(^|\.)lora_B(\.|$)")


def pack(
    update: Mapping,
    *,
    head_mask: Mapping | None = None,
    bits: int = 8,
    group_size: int = 64,
    rounding: str = "nearest",
    seed: int = 0,
    topk: float | None = None,
    metadata: Mapping | None = None,
    nan: str = "raise",
    head_cols_pattern: str = DEFAULT_HEAD_COLS_PATTERN,
) -> bytes:
    """Serialize an update (name -> torch tensor or numpy array) into a compact, checksummed payload.

    head_mask: LoRA module name -> bool[H] of the heads whose slices travel. Under a module, lora_B
        keeps its kept heads' blocks of rows (query/key/value), or, for a module matching
        head_cols_pattern (an output projection), lora_A keeps its kept heads' blocks of columns; the
        other factor travels whole. Pruned slices cost one mask bit each and decode as zeros.
    bits: 32 (lossless float32), 16 (float16), or 8/4/2 (blockwise absmax over group_size elements,
        float16 scales; rounding "nearest" or "stochastic", unbiased and seeded by seed).
    topk: keep only this fraction of the largest-magnitude elements of tensors without a head mask (exact zeros
        never travel).
    metadata: JSON-serializable values (client id, round, num_examples, ...); numpy arrays / torch
        tensors (e.g. head scores) travel losslessly (float16 ones as float16, others as float32) and
        come back as float32 numpy arrays.
    nan: "raise" (PackError on NaN/Inf) or "zero" (replace them by 0).
    """
    if bits not in ALL_BITS:
        raise PackError(f"bits must be one of {ALL_BITS}, got {bits!r}")
    if not (isinstance(group_size, int) and MIN_GROUP <= group_size <= MAX_GROUP
            and group_size & (group_size - 1) == 0):
        raise PackError(f"group_size must be a power of two in [{MIN_GROUP}, {MAX_GROUP}], got {group_size!r}")
    if rounding not in ("nearest", "stochastic"):
        raise PackError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if nan not in ("raise", "zero"):
        raise PackError(f"nan must be 'raise' or 'zero', got {nan!r}")
    if topk is not None and not (0.0 < topk <= 1.0):
        raise PackError(f"topk must be a fraction in (0, 1], got {topk!r}")
    if not isinstance(update, Mapping):
        raise PackError(f"update must be a mapping of names to tensors, got {type(update).__name__}")

    arrays = {name: _as_float32(name, value) for name, value in update.items()}
    specs = _sparsity_specs({n: a for n, (a, _) in arrays.items()}, head_mask or {}, re.compile(head_cols_pattern))
    meta_json, meta_arrays = _split_metadata(metadata or {}, arrays)

    # Size everything first, then let the kernels write straight into the one output buffer.
    table, planned = [], []
    prev = b""
    tensors = [(n, a, d, False, bits) for n, (a, d) in arrays.items()]
    # Metadata arrays travel losslessly: float16 ones as float16 (half the bytes), the rest as float32.
    tensors += [(n, a, d, True, 16 if d == "float16" else 32) for n, (a, d) in meta_arrays.items()]
    for index, (name, x, dtype, is_meta, tbits) in enumerate(tensors):
        kind, n_heads, mask = specs.get(name, (KIND_DENSE, 0, None))
        if topk is not None and kind == KIND_DENSE and not is_meta and np.prod(x.shape) > 0:
            kind, mask = KIND_ELEMENTS, _topk_mask(x, topk)
        encoded = name.encode("utf-8")
        table.append(encode_table_entry(prev, encoded, dtype, tbits, kind, is_meta, n_heads, x.shape))
        prev = encoded
        mask_bytes = pack_bitmap(mask) if kind != KIND_DENSE else b""
        n_values = values_nbytes(kept_count(x.shape, kind, mask), tbits, group_size)
        planned.append((name, x, kind, n_heads, mask, mask_bytes, tbits, n_values,
                        (seed * 0x9E3779B1 + index) & 0xFFFFFFFF))

    out, offset = new_payload(group_size, meta_json, table,
                              sum(len(p[5]) + p[7] for p in planned))
    for name, x, kind, n_heads, mask, mask_bytes, tbits, n_values, tensor_seed in planned:
        out[offset:offset + len(mask_bytes)] = np.frombuffer(mask_bytes, np.uint8)
        offset += len(mask_bytes)
        _encode_values(name, x, kind, n_heads, mask, mask_bytes, tbits, group_size, rounding == "stochastic",
                       tensor_seed, nan == "zero", out[offset:offset + n_values])
        offset += n_values
    return seal_payload(out)


def _as_float32(name: str, value) -> tuple[np.ndarray, str]:
    """(contiguous float32 numpy array, original dtype name)."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise PackError(f"tensor names must be non-empty strings of at most {MAX_NAME_BYTES} bytes: {name!r}")
    if type(value).__module__.startswith("torch"):
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in DTYPE_CODES:
            raise PackError(f"{name!r}: dtype {value.dtype} is not a floating type fedsparse packs")
        if value.device.type == "cuda" and gpu_pack.available():
            if value.dim() > MAX_NDIM:
                raise PackError(f"{name!r}: {value.dim()} dimensions exceeds the limit {MAX_NDIM}")
            return value.detach(), dtype  # stays on the GPU: the Triton kernels encode it there
        value = value.detach().to("cpu").float().numpy()
    else:
        value = np.asarray(value)
        dtype = value.dtype.name
        if dtype not in DTYPE_CODES:
            raise PackError(f"{name!r}: dtype {value.dtype} is not a floating type fedsparse packs")
    if value.ndim > MAX_NDIM:
        raise PackError(f"{name!r}: {value.ndim} dimensions exceeds the limit {MAX_NDIM}")
    return np.ascontiguousarray(value, dtype=np.float32), dtype


def _sparsity_specs(arrays: dict, head_mask: Mapping, cols_pattern: re.Pattern) -> dict:
    """name -> (kind, n_heads, bool mask) for every tensor under a module of head_mask."""
    specs = {}
    for module, mask in head_mask.items():
        mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
        if mask.ndim != 1 or mask.size == 0 or mask.dtype != bool:
            raise PackError(f"head mask of {module!r} must be a non-empty 1-D bool array, got "
                            f"{mask.dtype}{list(mask.shape)}")
        under = [n for n in arrays if n == module or n.startswith(module + ".")]
        if not under:
            raise PackError(f"head mask given for {module!r}, but no tensor of the update is under it")
        cols = bool(cols_pattern.search(module))
        for name in under:
            if not (_LORA_A if cols else _LORA_B).search(name[len(module):]):
                continue  # the other factor travels whole
            kind = KIND_HEAD_COLS if cols else KIND_HEAD_ROWS
            shape = arrays[name].shape
            rows, ncols = matrix_view(shape, kind) if shape else (0, 0)
            head_dim = rows if kind == KIND_HEAD_ROWS else ncols
            if not shape or head_dim % mask.size:
                axis = "rows" if kind == KIND_HEAD_ROWS else "columns"
                raise PackError(f"{name!r}: head mask of length {mask.size} does not divide its {head_dim} "
                                f"{axis} (shape {tuple(shape)})")
            specs[name] = (kind, int(mask.size), mask)
    return specs


def _split_metadata(metadata: Mapping, arrays: dict) -> tuple[bytes, dict]:
    """(compact JSON of the plain values, name -> float32 array of the array values)."""
    plain, meta_arrays = {}, {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise PackError(f"metadata keys must be strings, got {key!r}")
        if isinstance(value, np.ndarray) or type(value).__module__.startswith("torch"):
            if key in arrays:
                raise PackError(f"metadata key {key!r} collides with a tensor name")
            arr, dtype = _as_float32(key, value)
            if not np.isfinite(arr).all():
                raise PackError(f"metadata array {key!r} contains NaN or Inf")
            meta_arrays[key] = (arr, dtype)
        else:
            plain[key] = value
    try:
        meta_json = json.dumps(plain, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise PackError(f"metadata must be JSON-serializable (or arrays): {exc}") from None
    return (b"" if not plain else meta_json), meta_arrays


def _topk_mask(x, fraction: float) -> np.ndarray:
    """The largest-magnitude fraction of x's elements, exact zeros excluded: a zero carries no update, and
    sending it would count as a vote for 0 in the server's element-wise weight sums (an untrained tensor,
    e.g. lora_A of a layer with no kept head, would dilute the clients that trained it)."""
    if not isinstance(x, np.ndarray):  # a CUDA tensor: rank on the device, bring back only the mask
        import torch

        flat = x.reshape(-1).abs()
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
        mask[flat.topk(max(1, int(round(fraction * flat.numel())))).indices] = True
        return (mask & (flat != 0)).cpu().numpy()
    flat = np.abs(x.reshape(-1))
    k = max(1, int(round(fraction * flat.size)))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argpartition(flat, flat.size - k)[flat.size - k:]] = True
    return mask & (flat != 0)


def _encode_values(name, x, kind, n_heads, mask, mask_bytes, bits, group_size, stochastic, seed, nan_to_zero,
                   out: np.ndarray) -> None:
    """Encode the travelling elements of x into out (uint8 view of the payload: one value section)."""
    if not isinstance(x, np.ndarray):  # a CUDA tensor
        status = gpu_pack.encode_values(x, kind, mask, bits, group_size, stochastic, seed, nan_to_zero, out)
        _raise_for_status(name, status)
        return
    n_kept = kept_count(x.shape, kind, mask)
    native = _backend.native
    if native is not None:
        rows, cols = matrix_view(x.shape, kind)
        status = native.quantize(x.reshape(-1), kind, rows, cols, n_heads, np.frombuffer(mask_bytes, np.uint8),
                                 n_kept, bits, group_size, stochastic, seed, nan_to_zero, out)
        _raise_for_status(name, status)
        return
    kept = compact(x, kind, mask)
    finite = np.isfinite(kept)
    if not finite.all():
        _raise_for_status(name, 0 if nan_to_zero else 1)
        kept = np.where(finite, kept, np.float32(0))
    if bits == 32:
        out.view("<f4")[:] = kept
    elif bits == 16:
        with np.errstate(over="ignore"):
            half = kept.astype("<f2")
        _raise_for_status(name, 0 if np.isfinite(half).all() else 2)
        out.view("<f2")[:] = half
    else:
        tstep, scales, codes = quantize(kept, bits, group_size, stochastic=stochastic, seed=seed)
        g = scales.size
        out[:4].view("<f4")[0] = tstep
        out[4:4 + 2 * g].view("<f2")[:] = scales
        out[4 + 2 * g:] = codes


def _raise_for_status(name: str, status: int) -> None:
    if status == 1:
        raise PackError(f"{name!r} contains NaN or Inf; pass nan='zero' to replace them by 0")
    if status == 2:
        raise PackError(f"{name!r} has values beyond the float16 range (65504); use bits=32")

"""The device path of pack/unpack: torch tensors stay on their device, the Triton kernels (or, with
FEDSPARSE_GPU_BACKEND=cuda, the CUDA C++ ones) quantize there, and only the compact value section crosses
to the host (or back). Used for CUDA tensors; it runs on CPU
tensors too under TRITON_INTERPRET=1, which is how it is tested without a GPU.
"""
from __future__ import annotations

import os

import numpy as np

from .sparsity import KIND_DENSE, element_mask, matrix_view, unpack_bitmap
from .wire import Entry

STATUS_OK, STATUS_NONFINITE, STATUS_F16_OVERFLOW = 0, 1, 2


def available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _kept(x, kind: int, mask):
    """float32 [n_kept] on x's device, in row-major order of the travelling elements."""
    import torch

    x2 = x.detach().reshape(matrix_view(tuple(x.shape), kind)).float()
    if kind == KIND_DENSE:
        return x2.reshape(-1).contiguous()
    keep = torch.from_numpy(element_mask(tuple(x.shape), kind, mask)).to(x.device)
    return x2[keep].contiguous()


def encode_values(x, kind: int, mask, bits: int, group_size: int, stochastic: bool, seed: int,
                  nan_to_zero: bool, out: np.ndarray) -> int:
    """Encode the travelling elements of torch tensor x into out (uint8 host buffer of one value section).

    Returns STATUS_OK, STATUS_NONFINITE (NaN/Inf and not nan_to_zero) or STATUS_F16_OVERFLOW.
    """
    import torch

    kept = _kept(x, kind, mask)
    if not bool(torch.isfinite(kept).all()):
        if not nan_to_zero:
            return STATUS_NONFINITE
        kept = torch.nan_to_num(kept, nan=0.0, posinf=0.0, neginf=0.0)
    if bits == 32:
        out.view("<f4")[:] = kept.cpu().numpy()
    elif bits == 16:
        half = kept.half()
        if not bool(torch.isfinite(half).all()):
            return STATUS_F16_OVERFLOW
        out.view("<f2")[:] = half.cpu().numpy()
    elif use_cuda_cpp():
        from . import _cuda

        out[:] = _cuda.quantize_section(kept, bits, group_size, stochastic=stochastic, seed=seed,
                                        check_finite=False).cpu().numpy()
    else:
        from .kernels import pack as triton_pack

        tstep, scales, codes = triton_pack.quantize(kept, bits, group_size, stochastic=stochastic, seed=seed)
        g = scales.numel()
        out[:4].view("<f4")[:] = tstep.cpu().numpy()
        out[4:4 + 2 * g].view("<f2")[:] = scales.cpu().numpy()
        out[4 + 2 * g:] = codes.cpu().numpy()
    return STATUS_OK


def use_cuda_cpp() -> bool:
    """FEDSPARSE_GPU_BACKEND=cuda picks the CUDA C++ kernels over Triton (same codes, bit for bit)."""
    if os.environ.get("FEDSPARSE_GPU_BACKEND", "triton").lower() != "cuda":
        return False
    from . import _cuda

    return _cuda.available()


def decode_entry(buf, entry: Entry, group_size: int, device):
    """torch float32 tensor of entry.shape on device: dequantized there, zeros where nothing travelled."""
    import torch

    values = torch.from_numpy(np.frombuffer(buf, np.uint8, entry.data_nbytes, entry.data_offset).copy()).to(device)
    if entry.n_kept == 0:
        kept = torch.zeros(0, dtype=torch.float32, device=device)
    elif entry.bits == 32:
        kept = values.view(torch.float32)
    elif entry.bits == 16:
        kept = values.view(torch.float16).float()
    else:
        g = -(-entry.n_kept // group_size)
        tstep = values[:4].view(torch.float32)
        scales = values[4:4 + 2 * g].view(torch.float16)
        if use_cuda_cpp():
            from . import _cuda as impl
        else:
            from .kernels import pack as impl
        kept = impl.dequantize(tstep, scales, values[4 + 2 * g:], entry.n_kept, entry.bits, group_size)
    if entry.kind == KIND_DENSE:
        return kept.reshape(entry.shape)
    mask = unpack_bitmap(np.frombuffer(buf, np.uint8, -(-entry.mask_nbits // 8), entry.mask_offset),
                         entry.mask_nbits)
    out = torch.zeros(matrix_view(entry.shape, entry.kind), dtype=torch.float32, device=device)
    out[torch.from_numpy(element_mask(entry.shape, entry.kind, mask)).to(device)] = kept
    return out.reshape(entry.shape)

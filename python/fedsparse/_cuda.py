"""CUDA C++ pack/unpack kernels (fedsparse._C.cuda) on torch CUDA tensors.

A thin, checked wrapper: it validates devices, dtypes and sizes, allocates the outputs with torch,
and passes data pointers and torch's current stream to the raw kernels, so the work is ordered with
the caller's other torch work and nothing synchronizes (except the optional NaN/Inf check of
`quantize`). Results are bit-identical to the numpy reference fedsparse.quant for round-to-nearest and
for seeded stochastic rounding.

torch is imported inside the functions: importing this module needs neither torch nor a GPU.
"""
from __future__ import annotations

from ._backend import native
from .errors import PackError
from .quant import QUANT_BITS, code_bytes, num_groups

__all__ = [
    "available",
    "dequantize",
    "dequantize_section",
    "mask_to_bitmap",
    "quantize",
    "quantize_section",
    "section_nbytes",
    "split_section",
]


def _ops():
    """fedsparse._C.cuda, or a RuntimeError saying why it is missing."""
    if native is None:
        from ._backend import native_error

        raise RuntimeError(f"fedsparse: native module unavailable ({native_error})")
    ops = getattr(native, "cuda", None)
    if ops is None:
        raise RuntimeError(
            "fedsparse was built without its CUDA kernels (no CUDA toolkit at build time, or "
            "-DFEDSPARSE_CUDA=OFF); rebuild with nvcc on PATH"
        )
    return ops


def available() -> bool:
    """True when the CUDA kernels were built, torch sees a CUDA device, and so does the CUDA runtime the
    kernels are linked with (statically: it needs a driver recent enough for the toolkit they were built
    with, which torch's own runtime may not)."""
    if native is None or not native.build_info().get("cuda", False):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and native.cuda.device_count() > 0


def _check_options(bits: int, group_size: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if not (16 <= group_size <= 65536 and group_size & (group_size - 1) == 0):
        raise ValueError(f"group_size must be a power of two in [16, 65536], got {group_size}")


def _cuda_tensor(t, name: str, dtype=None, numel: int | None = None, device=None):
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be on a CUDA device, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")
    return t


def _out(t, name: str, dtype, numel: int, device):
    """A caller-given output: checked, and contiguous (it is written through its pointer)."""
    _cuda_tensor(t, name, dtype, numel, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _stream(device) -> int:
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def mask_to_bitmap(mask, *, out=None):
    """Kept-element mask (bool or uint8 CUDA tensor, any shape, row-major; nonzero = kept) ->
    (bitmap: uint8[ceil(n/8)] little-endian, padding bits zero, as sparsity.pack_bitmap;
    count: int64 0-dim tensor on the device, the number kept). Does not synchronize."""
    import torch

    _cuda_tensor(mask, "mask")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"mask must be torch.bool or torch.uint8, got {mask.dtype}")
    mask = mask.contiguous()
    n = mask.numel()
    dev = mask.device
    bitmap = torch.empty((n + 7) // 8, dtype=torch.uint8, device=dev) if out is None else \
        _out(out, "out", torch.uint8, (n + 7) // 8, dev)
    count = torch.empty((), dtype=torch.int64, device=dev)
    with torch.cuda.device(dev):
        _ops().mask_to_bitmap(mask.data_ptr(), n, bitmap.data_ptr(), count.data_ptr(), _stream(dev))
    return bitmap, count


def section_nbytes(n: int, bits: int, group_size: int) -> int:
    """Bytes of one quantized value section: f32 tstep, f16 scales[G], codes (the wire layout)."""
    return 4 + 2 * num_groups(n, group_size) + code_bytes(n, bits)


def split_section(section, n: int, bits: int, group_size: int):
    """Views (tstep: float32[1], scales: float16[G], codes: uint8[code_bytes]) of a uint8 value section
    whose first byte is at a 4-byte-aligned address (any torch allocation's start)."""
    import torch

    g = num_groups(n, group_size)
    if section.dtype != torch.uint8 or section.dim() != 1 or section.numel() != section_nbytes(n, bits, group_size):
        raise ValueError("section must be a 1-D uint8 tensor of section_nbytes(n, bits, group_size) bytes")
    return section[:4].view(torch.float32), section[4:4 + 2 * g].view(torch.float16), section[4 + 2 * g:]


def quantize_section(x, bits: int, group_size: int, *, stochastic: bool = False, seed: int = 0,
                     nan_to_zero: bool = False, check_finite: bool = True, out=None):
    """Quantize the compact vector x (CUDA tensor, flattened, cast to float32) into one uint8 value
    section in wire layout (f32 tstep, f16 scales[G], codes), as fedsparse.quant.quantize.

    NaN/Inf: with nan_to_zero they are encoded as 0; otherwise, with check_finite (the default, one
    device synchronization) a PackError is raised; with neither, their codes are unspecified."""
    import torch

    _check_options(bits, group_size)
    _cuda_tensor(x, "x")
    dev = x.device
    x = x.detach().reshape(-1).to(torch.float32).contiguous()
    n = x.numel()
    g = num_groups(n, group_size)
    nbytes = section_nbytes(n, bits, group_size)
    section = torch.empty(nbytes, dtype=torch.uint8, device=dev) if out is None else \
        _out(out, "out", torch.uint8, nbytes, dev)
    ops = _ops()
    workspace = torch.empty(ops.quantize_workspace_bytes(n, group_size), dtype=torch.uint8, device=dev)
    base = section.data_ptr()
    with torch.cuda.device(dev):
        ops.quantize(x.data_ptr(), n, bits, group_size, bool(stochastic), int(seed) & 0xFFFFFFFF,
                     bool(nan_to_zero), base, base + 4, base + 4 + 2 * g, workspace.data_ptr(), _stream(dev))
    if check_finite and not nan_to_zero:
        off = ops.WORKSPACE_STATUS_OFFSET
        if int(workspace[off:off + 4].view(torch.int32).item()) != 0:
            raise PackError("values to quantize contain NaN or Inf (pass nan_to_zero=True to encode them as 0)")
    return section


def quantize(x, bits: int, group_size: int, *, stochastic: bool = False, seed: int = 0,
             nan_to_zero: bool = False, check_finite: bool = True):
    """As fedsparse.quant.quantize, on the GPU: (tstep: float32[1], scales: float16[G], codes: uint8),
    views into one value section (see quantize_section)."""
    x_n = x.numel()
    section = quantize_section(x, bits, group_size, stochastic=stochastic, seed=seed, nan_to_zero=nan_to_zero,
                               check_finite=check_finite)
    return split_section(section, x_n, bits, group_size)


def dequantize(tstep, scales, codes, n: int, bits: int, group_size: int, *, out=None):
    """Inverse of quantize: float32[n] = (code - 2**(bits-1)) * float32(scale_g) * tstep.
    tstep: a float32 CUDA tensor of one element, or a Python float."""
    import torch

    _check_options(bits, group_size)
    if n < 0:
        raise ValueError("n must be >= 0")
    _cuda_tensor(codes, "codes", torch.uint8, code_bytes(n, bits))
    dev = codes.device
    _cuda_tensor(scales, "scales", torch.float16, num_groups(n, group_size), dev)
    if isinstance(tstep, torch.Tensor):
        _cuda_tensor(tstep, "tstep", torch.float32, 1, dev)
        tstep = tstep.contiguous()
    else:
        tstep = torch.tensor([float(tstep)], dtype=torch.float32, device=dev)
    scales, codes = scales.contiguous(), codes.contiguous()
    y = torch.empty(n, dtype=torch.float32, device=dev) if out is None else _out(out, "out", torch.float32, n, dev)
    with torch.cuda.device(dev):
        _ops().dequantize(tstep.data_ptr(), scales.data_ptr(), codes.data_ptr(), n, bits, group_size,
                          y.data_ptr(), _stream(dev))
    return y


def dequantize_section(section, n: int, bits: int, group_size: int, *, out=None):
    """Inverse of quantize_section: float32[n] from one uint8 value section (a CUDA tensor)."""
    import torch

    _check_options(bits, group_size)
    _cuda_tensor(section, "section", torch.uint8, section_nbytes(n, bits, group_size))
    section = section.contiguous()
    dev = section.device
    g = num_groups(n, group_size)
    y = torch.empty(n, dtype=torch.float32, device=dev) if out is None else _out(out, "out", torch.float32, n, dev)
    base = section.data_ptr()
    with torch.cuda.device(dev):
        _ops().dequantize(base, base + 4, base + 4 + 2 * g, n, bits, group_size, y.data_ptr(), _stream(dev))
    return y

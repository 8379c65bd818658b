"""`fedsparse info`: versions, and which backends are active (native CPU, Triton, CUDA C++), and why not."""
from __future__ import annotations

import importlib.metadata
import os
import platform

from . import __version__, _backend


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def backends() -> dict[str, tuple[bool, str]]:
    """name -> (active, detail: what it is, or why it is missing)."""
    out = {}
    native = _backend.native
    if native is None:
        out["native CPU (C++)"] = (False, _backend.native_error or "not built")
        out["CUDA C++"] = (False, "needs the native module")
    else:
        info = native.build_info()
        threads = f"OpenMP, {os.cpu_count()} cores" if info["openmp"] else "no OpenMP: single-threaded"
        out["native CPU (C++)"] = (True, f"{threads}; AVX2 {'on' if info['avx2'] else 'off'}; {info['compiler']}")
        out["CUDA C++"] = _cuda_status(info["cuda"])
    out["Triton"] = _triton_status()
    return out


def _torch_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, torch.cuda.get_device_name()


def _cuda_status(built: bool) -> tuple[bool, str]:
    if not built:
        return False, "built without a CUDA toolkit (rebuild where nvcc is on PATH)"
    ok, detail = _torch_cuda()
    return ok, detail if ok else f"compiled in, but {detail}"


def _triton_status() -> tuple[bool, str]:
    version = _version("triton")
    if version is None:
        return False, "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {version} in interpreter mode (TRITON_INTERPRET=1: CPU, slow, for tests)"
    ok, detail = _torch_cuda()
    return ok, f"triton {version} on {detail}" if ok else f"triton {version} installed, but {detail}"


def report() -> str:
    lines = [f"fedsparse {__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    for dist in ("numpy", "torch", "triton", "transformers", "peft", "flwr"):
        lines.append(f"{dist} {_version(dist) or '-- not installed'}")
    lines.append("backends:")
    for name, (active, detail) in backends().items():
        lines.append(f"  [{'x' if active else ' '}] {name}: {detail}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.description = __doc__


def main(args) -> int:
    print(report())
    return 0

"""Benchmark: Triton blockwise quantize + dequantize (fedsparse.kernels.pack) on a CUDA GPU.

Times, for a 64 MiB float32 tensor and every bit width (round-to-nearest and stochastic rounding):

* triton  - fedsparse.kernels.pack.quantize then .dequantize,
* torch   - the same quantization written in plain torch ops (the peer; it also checks bit-identity),
* copy    - a torch copy of the 64 MiB tensor (read 64 MiB + write 64 MiB): the memory-bandwidth limit.
            quantize + dequantize must at least read x, write the codes, read them back and write x,
            so the limit for it is copy time * (2*64 MiB + 2*code bytes) / (2*64 MiB).

Prints a table and writes benchmarks/results/triton_pack.json. On a machine without CUDA it says so and
exits 0.

    python benchmarks/bench_triton_pack.py [--mib 64] [--group-size 64] [--no-verify]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "triton_pack.json"


# ----------------------------------------------------------------------------------------------------
# plain-torch implementation of fedsparse.quant (the peer)
# ----------------------------------------------------------------------------------------------------
def _uniform01_torch(seed: int, n: int, device) -> torch.Tensor:
    """fedsparse.quant.uniform01 in torch (int64 arithmetic masked to 32 bits)."""
    m = 0xFFFFFFFF

    def lowbias32(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & m
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    key = lowbias32(torch.tensor(seed & m, dtype=torch.int64, device=device))
    idx = torch.arange(n, dtype=torch.int64, device=device) & m
    h = lowbias32(idx ^ key)
    return (h >> 8).to(torch.float32) * (2.0**-24)


def torch_quantize(x: torch.Tensor, bits: int, group_size: int, stochastic: bool = False, seed: int = 0):
    n = x.numel()
    g = -(-n // group_size)
    qmax = float((1 << (bits - 1)) - 1)
    dev = x.device
    a = torch.zeros(g * group_size, dtype=torch.float32, device=dev)
    a[:n] = x.abs()
    amax = a.view(g, group_size).amax(dim=1)
    tmax = amax.max()
    # Divide by a device tensor: torch turns division by a CPU scalar into a multiply by its
    # reciprocal, which is not the correctly rounded quotient the spec asks for.
    tstep = tmax / torch.full((), qmax, dtype=torch.float32, device=dev)
    rel = torch.where(tmax > 0, amax / tmax, torch.zeros((), device=dev))
    scales = rel.to(torch.float16)
    step = scales.to(torch.float32) * tstep
    step_e = step.repeat_interleave(group_size)[:n]
    y = torch.where(step_e > 0, x / step_e, torch.zeros((), device=dev))
    if stochastic:
        q = torch.floor(y + _uniform01_torch(seed, n, dev))
    else:
        q = torch.round(y)  # half to even
    q = q.clamp(-qmax, qmax).to(torch.int32) + (1 << (bits - 1))
    per = 8 // bits
    nbytes = -(-n * bits // 8)
    c = torch.zeros(nbytes * per, dtype=torch.int32, device=dev)
    c[:n] = q
    c = c.view(nbytes, per) << (torch.arange(per, device=dev, dtype=torch.int32) * bits)
    return tstep.reshape(1), scales, c.sum(dim=1).to(torch.uint8)


def torch_dequantize(tstep, scales, codes, n: int, bits: int, group_size: int):
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    u = ((codes.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    step = scales.to(torch.float32) * tstep
    return (u - (1 << (bits - 1))).to(torch.float32) * step.repeat_interleave(group_size)[:n]


# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="tensor size in MiB of float32 (default 64)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--no-verify", action="store_true", help="skip the bit-identity checks")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton_pack: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to time.")
        return 0
    # fedsparse.kernels picks the Triton interpreter unless told the GPU is real; it must be told
    # before the kernels are defined.
    os.environ["FEDSPARSE_TRITON_REAL"] = "1"
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_triton_pack: unset TRITON_INTERPRET to time the compiled kernels", file=sys.stderr)
        return 2
    import numpy as np
    import triton
    from triton.testing import do_bench

    from fedsparse import quant
    from fedsparse.kernels import pack

    dev = torch.device("cuda")
    n = args.mib * (1 << 20) // 4
    gs = args.group_size
    torch.manual_seed(0)
    x = torch.randn(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(x)

    copy_ms = do_bench(lambda: dst.copy_(x), warmup=50, rep=200)
    copy_bytes = 2 * x.numel() * 4
    copy_gbs = copy_bytes / copy_ms / 1e6

    rows = []
    for stochastic in (False, True):
        for bits in (8, 4, 2):
            kw = dict(stochastic=stochastic, seed=1234)

            def tri():
                t, s, c = pack.quantize(x, bits, gs, **kw)
                return pack.dequantize(t, s, c, n, bits, gs)

            def ref():
                t, s, c = torch_quantize(x, bits, gs, stochastic, 1234)
                return torch_dequantize(t, s, c, n, bits, gs)

            verified = None
            if not args.no_verify:
                t, s, c = pack.quantize(x, bits, gs, **kw)
                tt, ts, tc = torch_quantize(x, bits, gs, stochastic, 1234)
                d = pack.dequantize(t, s, c, n, bits, gs)
                same_torch = (torch.equal(t, tt) and torch.equal(s, ts) and torch.equal(c, tc)
                              and torch.equal(d, torch_dequantize(tt, ts, tc, n, bits, gs)))
                rt, rs, rc = quant.quantize(x.cpu().numpy(), bits, gs, stochastic=stochastic, seed=1234)
                same_numpy = (t.cpu().numpy()[0] == rt and np.array_equal(s.cpu().numpy().view(np.uint16),
                                                                          rs.view(np.uint16))
                              and np.array_equal(c.cpu().numpy(), rc))
                verified = bool(same_torch and same_numpy)

            q_ms = do_bench(lambda: pack.quantize(x, bits, gs, **kw), warmup=25, rep=100)
            t, s, c = pack.quantize(x, bits, gs, **kw)
            dq_ms = do_bench(lambda: pack.dequantize(t, s, c, n, bits, gs), warmup=25, rep=100)
            tri_ms = do_bench(tri, warmup=25, rep=100)
            torch_ms = do_bench(ref, warmup=10, rep=50)
            code_bytes = -(-n * bits // 8)
            # minimal traffic of quantize + dequantize: read x, write codes, read codes, write out
            ideal_bytes = 2 * n * 4 + 2 * code_bytes + 2 * s.numel() * 2
            limit_ms = copy_ms * ideal_bytes / copy_bytes
            rows.append(dict(
                bits=bits, rounding="stochastic" if stochastic else "nearest", group_size=gs,
                quantize_ms=q_ms, dequantize_ms=dq_ms, triton_ms=tri_ms, torch_ms=torch_ms,
                bandwidth_limit_ms=limit_ms, speedup_vs_torch=torch_ms / tri_ms,
                fraction_of_bandwidth_limit=limit_ms / tri_ms,
                triton_gbs=ideal_bytes / tri_ms / 1e6, bit_identical=verified,
            ))

    name = torch.cuda.get_device_name(dev)
    print(f"device: {name}; tensor: {args.mib} MiB float32 ({n} elements); group size {gs}")
    print(f"copy of {args.mib} MiB: {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s (read + write)")
    hdr = (f"{'bits':>4} {'rounding':>10} {'quant ms':>9} {'dequant ms':>10} {'q+dq ms':>8} {'torch ms':>9} "
           f"{'limit ms':>9} {'x torch':>8} {'% limit':>8} {'GB/s':>6} {'exact':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['bits']:>4} {r['rounding']:>10} {r['quantize_ms']:>9.3f} {r['dequantize_ms']:>10.3f} "
              f"{r['triton_ms']:>8.3f} {r['torch_ms']:>9.3f} {r['bandwidth_limit_ms']:>9.3f} "
              f"{r['speedup_vs_torch']:>7.1f}x {100 * r['fraction_of_bandwidth_limit']:>7.0f}% "
              f"{r['triton_gbs']:>6.0f} {str(r['bit_identical']):>6}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(dict(
        benchmark="triton_pack", device=name, torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), mib=args.mib, n=n, group_size=gs,
        copy_ms=copy_ms, copy_gbs=copy_gbs, rows=rows,
    ), indent=2))
    print(f"wrote {RESULTS}")
    return 0 if all(r["bit_identical"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Speed of pack/unpack on a 64 MiB float32 update (half the heads kept, 8 bits), in one run, against:

  limit   numpy copying the same 64 MiB (np.copyto into a ready buffer: the memory-bandwidth bound), and a
          fresh-buffer copy (x.copy(): what any decoder that returns a new array pays for page faults);
  torch   a plain-torch implementation of the same head gather + blockwise int8 quantization (and back);
  bnb     bitsandbytes' quantize_blockwise on CPU, when it is installed (the whole tensor, no head mask).

Prints a table and writes benchmarks/results/pack_speed.json. Times are the best of --repeat runs.
Usage: python benchmarks/bench_pack.py [--mib 64] [--repeat 7]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import fedsparse

RESULTS = Path(__file__).parent / "results"


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up: first-touch page faults, thread pools, lazy imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def torch_peer(x, head_rows: np.ndarray, group_size: int):
    """Plain torch, the same quantization as fedsparse (quant.py): gather the kept rows, a float32 tensor
    scale, float16 group scales relative to it, round-to-nearest offset uint8 codes; and the inverse
    scattered into zeros."""
    import torch

    t = torch.from_numpy(x)
    rows = torch.from_numpy(np.flatnonzero(head_rows))

    def pack():
        kept = t.index_select(0, rows).reshape(-1, group_size)
        amax = kept.abs().amax(dim=1, keepdim=True)
        tmax = amax.max()
        tstep = tmax / 127
        scales = (amax / tmax).half()
        step = scales.float() * tstep
        codes = (torch.round(kept / step).clamp(-127, 127) + 128).to(torch.uint8)
        return tstep, scales, codes

    tstep, scales, codes = pack()

    def unpack():
        out = torch.zeros_like(t)
        kept = (codes.float() - 128) * (scales.float() * tstep)
        out.index_copy_(0, rows, kept.reshape(-1, t.shape[1]))
        return out

    return pack, unpack


def bnb_peer(x, group_size: int):
    try:
        import bitsandbytes.functional as F
        import torch
    except Exception as exc:  # not installed, or no CPU backend in this build
        return None, f"{type(exc).__name__}: {exc}"
    t = torch.from_numpy(x).reshape(-1)
    try:
        q, state = F.quantize_blockwise(t, blocksize=group_size)
        F.dequantize_blockwise(q, state)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return (lambda: F.quantize_blockwise(t, blocksize=group_size),
            lambda: F.dequantize_blockwise(q, state)), "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()

    cols = 4096
    rows = args.mib * 2**20 // 4 // cols
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    mask = np.arange(args.heads) % 2 == 0  # half the heads kept
    update = {"layer.q.lora_B.weight": x}
    kw = dict(bits=8, group_size=args.group_size, head_mask={"layer.q": mask})
    payload = fedsparse.pack(update, **kw)

    dst = np.empty_like(x)
    t_copy = best_of(lambda: np.copyto(dst, x), args.repeat)
    t_copy_new = best_of(lambda: x.copy(), args.repeat)
    t_pack = best_of(lambda: fedsparse.pack(update, **kw), args.repeat)
    t_unpack = best_of(lambda: fedsparse.unpack(payload)["layer.q.lora_B.weight"], args.repeat)
    tp, tu = torch_peer(x, np.repeat(mask, rows // args.heads), args.group_size)
    t_torch_pack, t_torch_unpack = best_of(tp, args.repeat), best_of(tu, args.repeat)
    bnb, bnb_status = bnb_peer(x, args.group_size)
    t_bnb = (best_of(bnb[0], args.repeat), best_of(bnb[1], args.repeat)) if bnb else None

    native = fedsparse.has_native()
    res = {
        "mib": args.mib, "shape": [rows, cols], "heads": args.heads, "kept_heads": int(mask.sum()),
        "group_size": args.group_size, "bits": 8, "payload_bytes": len(payload), "native": native,
        "copy_s": t_copy, "copy_fresh_s": t_copy_new, "pack_s": t_pack, "unpack_s": t_unpack,
        "torch_pack_s": t_torch_pack, "torch_unpack_s": t_torch_unpack,
        "bnb_status": bnb_status, "bnb_pack_s": t_bnb[0] if t_bnb else None,
        "bnb_unpack_s": t_bnb[1] if t_bnb else None,
    }
    gbps = x.nbytes / 1e9
    print(f"{args.mib} MiB float32 [{rows}, {cols}], {mask.sum()}/{args.heads} heads kept, 8 bits, "
          f"group {args.group_size}: payload {len(payload) / 2**20:.2f} MiB; native kernels: {native}")
    print(f"{'op':<28}{'ms':>9}{'GB/s in':>9}{'x copy':>8}{'x fresh copy':>13}{'peer / fedsparse':>18}")
    rows_out = [
        ("numpy copyto (limit)", t_copy, None),
        ("numpy x.copy()", t_copy_new, None),
        ("fedsparse pack", t_pack, None),
        ("fedsparse unpack", t_unpack, None),
        ("torch pack (peer)", t_torch_pack, t_torch_pack / t_pack),
        ("torch unpack (peer)", t_torch_unpack, t_torch_unpack / t_unpack),
    ]
    if t_bnb:
        rows_out += [("bnb quantize_blockwise", t_bnb[0], t_bnb[0] / t_pack),
                     ("bnb dequantize_blockwise", t_bnb[1], t_bnb[1] / t_unpack)]
    for name, t, ratio in rows_out:
        print(f"{name:<28}{t * 1e3:9.2f}{gbps / t:9.2f}{t / t_copy:8.2f}{t / t_copy_new:13.2f}"
              f"{'' if ratio is None else f'{ratio:.1f}x':>18}")
    if not t_bnb:
        print(f"bitsandbytes: not measured ({bnb_status})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pack_speed.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

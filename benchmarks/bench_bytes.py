"""Bytes on the wire for a real LoRA update of all-MiniLM-L6-v2 (r=8 on query/key/value, 110,592
parameters), 90% of heads pruned by confidence, against dense float32 (the FedAvg-LoRA upload).

Targets (issue 2): >= 6.5x fewer bytes at 8 bits with <= 1% relative error of the kept slices, >= 12x at
4 bits with <= 10%, and >= 60x at 4 bits with lora_A left out (frozen shared A, FFA-LoRA).
Prints the table and writes benchmarks/results/bytes.json.
Usage: python benchmarks/bench_bytes.py [--steps 30]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsparse.demo import format_table, measure, train_real_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    update, scores, modules, n = train_real_update(steps=args.steps)
    res = measure(update, scores, modules, args.sparsity, num_examples=n)
    res["train_steps"] = args.steps
    print(format_table(res))
    out = Path(__file__).parent / "results" / "bytes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""`fedsparse run`: federated LoRA fine-tuning of all-MiniLM-L6-v2 on BBC News, dense FedAvg against the
fedsparse arms, in one invocation on the same split and seed."""
from __future__ import annotations

import argparse

from .config import ARMS, RunConfig, make_config

# flag -> RunConfig field (type comes from the field's default)
_FLAGS = {
    "--seed": "seed", "--clients": "n_clients", "--alpha": "alpha", "--test-fraction": "test_fraction",
    "--max-len": "max_len", "--eval-examples": "eval_examples", "--rounds": "rounds",
    "--clients-per-round": "clients_per_round", "--local-steps": "local_steps", "--batch-size": "batch_size",
    "--lr": "lr", "--rank": "rank", "--sparsity": "sparsity", "--group-size": "group_size",
    "--score-batches": "score_batches", "--topk": "topk", "--explore": "explore", "--threads": "threads",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    parser.description = __doc__
    parser.add_argument("--quick", action="store_true", help="a short run (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--config", metavar="TOML", help="settings from a TOML file (keys as the flags, with _); "
                        "flags given on the command line win")
    parser.add_argument("--hetero", action="store_true", default=None,
                        help="clients of different depths and LoRA ranks, aggregated multi-branch")
    parser.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)} (default: all)")
    parser.add_argument("--bits", type=int, choices=(8, 4), help=f"upload bits of the fedsparse arms "
                        f"(default {defaults.bits})")
    parser.add_argument("--head-scope", choices=("global", "layer"), help="choose heads over the whole model or "
                        f"per layer (default {defaults.head_scope})")
    parser.add_argument("--mode", choices=("drop", "freeze"), help=f"pruned heads (default {defaults.mode})")
    parser.add_argument("--head-fit", choices=("full", "pruned"), help="drop mode: fit the classification head "
                        "on the full network's features of the scoring batches, or train it on the pruned "
                        f"network's (default {defaults.head_fit})")
    parser.add_argument("--hetero-layers", help="depths of the --hetero branches, e.g. 6,3")
    parser.add_argument("--hetero-ranks", help="LoRA ranks of the --hetero branches, e.g. 8,4")
    parser.add_argument("--out", dest="out_dir", help="output folder (default fedsparse-run, "
                        "fedsparse-run-quick with --quick)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars")
    parser.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                        help="inprocess (default), or flower: one superlink and N supernodes on 127.0.0.1 "
                             "(fedsparse starts and always stops them); same seed, same numbers")
    parser.add_argument("--supernodes", type=int, default=None,
                        help="supernodes for --engine flower (default min(clients, 3))")
    for flag, name in _FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument(flag, dest=name, type=type(default), metavar=name.upper(),
                            help=f"(default {default})")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig that parsed flags describe (flags over the TOML file over the defaults)."""
    overrides = {name: getattr(args, name, None) for name in list(_FLAGS.values()) +
                 ["hetero", "bits", "head_scope", "mode", "head_fit", "out_dir", "progress", "arms", "hetero_layers",
                  "hetero_ranks"]}
    return make_config(quick=args.quick, toml=args.config, overrides=overrides)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.engine == "flower":
        from ..flower.deploy import run_experiment

        result = run_experiment(cfg, n_supernodes=args.supernodes)
    else:
        from .runner import run

        result = run(cfg)
    print(result["table"])
    print(f"\nwrote {result['json']}" + (f", {result['png']}" if result.get("png") else "")
          + f" and {result['markdown']}")
    return 0

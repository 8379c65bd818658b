"""The `fedsparse` command line: `info`, `pack-demo` and `run` (see `fedsparse --help`)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and main(args) -> int, one-line help)
COMMANDS = {
    "info": ("fedsparse.info", "versions and which backends are active (and why not)"),
    "pack-demo": ("fedsparse.demo", "pack a real LoRA update of all-MiniLM-L6-v2 and print the bytes saved"),
    "run": ("fedsparse.experiment.cli", "federated LoRA fine-tuning of all-MiniLM-L6-v2 on BBC News"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # Import only the chosen command's module: `fedsparse info` must work without torch.
        if argv and argv[0] == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    args = parser.parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Settings of `fedsparse run`: defaults < --quick preset < TOML file < command-line flags.

The same settings (seed included) give the same numbers: every random draw derives from `seed`.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

ARMS = ("dense", "fedsparse", "fedsparse_ffa")


@dataclass
class RunConfig:
    seed: int = 0
    # data
    n_clients: int = 10
    alpha: float = 0.5              # Dirichlet concentration of the non-IID label split
    test_fraction: float = 0.2      # held out before the split: no client sees it
    max_len: int = 64               # tokens per article (title + first lines)
    eval_examples: int = 0          # evaluate on the first N of the test split each round (0: all of it)
    # federation
    rounds: int = 20
    clients_per_round: int = 3
    local_steps: int = 8
    batch_size: int = 16
    lr: float = 1e-2
    rank: int = 8                   # LoRA rank on query/key/value
    # fedsparse arms
    sparsity: float = 0.9           # share of heads pruned
    head_scope: str = "global"      # choose heads over the whole model ("global") or per layer ("layer")
    mode: str = "drop"              # pruned heads leave the forward pass ("drop") or only stop training ("freeze")
    bits: int = 4                   # upload quantization of the fedsparse arms (8 or 4)
    group_size: int = 64
    topk: float = 0.25              # share of the elements of tensors without a head mask (lora_A, the
                                    # classifier) that the fedsparse arms upload: the largest; 1: all
    score_batches: int = 2          # client batches scored (and losses taken, the head fitted) per round
    explore: float = 0.1            # exploration share of loss-gap client selection
    head_fit: str = "full"          # drop mode: the classification head is fitted on the full network's features
                                    # of the scoring batches ("full") or trained on the pruned network's ("pruned")
    arms: list = field(default_factory=lambda: list(ARMS))
    # --hetero: clients of different depths and LoRA ranks, aggregated multi-branch
    hetero: bool = False
    hetero_layers: list = field(default_factory=lambda: [6, 3])
    hetero_ranks: list = field(default_factory=lambda: [8, 4])
    # output and machine
    out_dir: str = "fedsparse-run"
    threads: int = 0                # torch threads (0: torch's default)
    progress: bool = True

    def validate(self) -> "RunConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.n_clients >= 1, "n_clients must be >= 1")
        need(1 <= self.clients_per_round <= self.n_clients, "clients_per_round must be in [1, n_clients]")
        need(self.rounds >= 1 and self.local_steps >= 1 and self.batch_size >= 1, "rounds, local_steps and "
             "batch_size must be >= 1")
        need(8 <= self.max_len <= 512, "max_len must be in [8, 512]")
        need(0.0 <= self.sparsity < 1.0, "sparsity must be in [0, 1)")
        need(self.head_scope in ("global", "layer"), "head_scope must be 'global' or 'layer'")
        need(self.mode in ("drop", "freeze"), "mode must be 'drop' or 'freeze'")
        need(self.head_fit in ("full", "pruned"), "head_fit must be 'full' or 'pruned'")
        need(self.bits in (8, 4, 2, 16, 32), "bits must be one of 32, 16, 8, 4, 2")
        need(0.0 < self.topk <= 1.0, "topk must be in (0, 1]")
        need(self.score_batches >= 1, "score_batches must be >= 1")
        need(self.eval_examples >= 0, "eval_examples must be >= 0")
        bad = [a for a in self.arms if a not in ARMS]
        need(self.arms and not bad, f"arms must be a non-empty subset of {ARMS}, got {self.arms}")
        need(len(self.hetero_layers) == len(self.hetero_ranks) >= 1,
             "hetero_layers and hetero_ranks must have the same, non-zero length")
        need(all(1 <= n <= 6 for n in self.hetero_layers), "hetero_layers must be in [1, 6] (MiniLM has 6)")
        need(all(r >= 1 for r in self.hetero_ranks), "hetero_ranks must be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --quick: under 3 minutes on 2 CPU cores for the three arms, model loading included.
QUICK = dict(rounds=6, clients_per_round=3, local_steps=6, batch_size=16, max_len=48, eval_examples=192,
             out_dir="fedsparse-run-quick")


def _field_types() -> dict:
    return {f.name: f for f in fields(RunConfig)}


def read_toml(path: str | Path) -> dict:
    """Settings from a TOML file: keys as in RunConfig, at the top level or under [run]."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError("reading a TOML file on Python < 3.11 needs tomli: `pip install tomli`") from None
    with open(path, "rb") as f:
        data = tomllib.load(f)
    data = dict(data.get("run", data))
    unknown = sorted(set(data) - set(_field_types()))
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(_field_types())}")
    return data


def make_config(*, quick: bool = False, toml: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    values: dict = {}
    if quick:
        values.update(QUICK)
    if toml is not None:
        values.update(read_toml(toml))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = RunConfig(**values)
    # TOML numbers: accept 3 for 3.0 and lists for lists; reject what cannot be coerced.
    for name, f in _field_types().items():
        v = getattr(cfg, name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        elif isinstance(default, float) and isinstance(v, int):
            setattr(cfg, name, float(v))
        elif isinstance(default, list):
            if isinstance(v, str):
                v = [x.strip() for x in v.split(",") if x.strip()]
            setattr(cfg, name, [type(default[0])(x) for x in v] if default else list(v))
        elif type(default) is not type(v):
            raise ValueError(f"{name} must be {type(default).__name__}, got {v!r}")
    return cfg.validate()

"""`fedsparse run`: federated LoRA fine-tuning of all-MiniLM-L6-v2 on BBC News (dense FedAvg vs fedsparse).

Needs the demo extras (torch, transformers, peft, tqdm, matplotlib and the two data/model packages).
"""
from .config import RunConfig, make_config

__all__ = ["RunConfig", "make_config", "run"]


def run(cfg: RunConfig) -> dict:
    from .runner import run as _run

    return _run(cfg)

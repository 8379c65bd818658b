"""The arms of `fedsparse run`: what each client does in a round and how the server combines the results."""
from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig


@dataclass(frozen=True)
class ArmSpec:
    """One way of running the federation. Every arm sees the same split, seed and client batches."""

    name: str
    label: str
    prune: bool            # score heads by confidence and train/upload only the kept ones
    sparsity: float
    mode: str              # "drop" or "freeze" (pruned heads)
    head_scope: str
    bits: int              # upload and download quantization (32: fp32)
    aggregation: str       # fedsparse.server.aggregate method ("fedavg" / "headwise"; under --hetero the inner
                           # method of "multibranch")
    selection: str         # fedsparse.server.select_clients strategy
    freeze_lora_a: bool    # FFA-LoRA: lora_A stays at its shared-seed init, only lora_B trains and travels
    hetero: bool = False   # clients of several architectures, aggregated "multibranch"
    topk: float = 1.0      # upload only this share (the largest) of tensors without a head mask

    @property
    def needs_loss_stats(self) -> bool:
        return self.selection == "loss_gap"


def make_arm(name: str, cfg: RunConfig) -> ArmSpec:
    if name == "dense":
        return ArmSpec(name, "dense FedAvg-LoRA (fp32, all heads, random)", prune=False, sparsity=0.0,
                       mode="none", head_scope=cfg.head_scope, bits=32, aggregation="fedavg",
                       selection="random", freeze_lora_a=False, hetero=cfg.hetero)
    common = dict(prune=True, sparsity=cfg.sparsity, mode=cfg.mode, head_scope=cfg.head_scope, bits=cfg.bits,
                  aggregation="headwise", selection="loss_gap", hetero=cfg.hetero, topk=cfg.topk)
    pct = round(100 * cfg.sparsity)
    topk = f", top {100 * cfg.topk:g}% of unmasked tensors" if cfg.topk < 1 else ""
    if name == "fedsparse":
        return ArmSpec(name, f"fedsparse ({pct}% heads {cfg.mode}, {cfg.bits}-bit{topk}, head-wise, loss-gap)",
                       freeze_lora_a=False, **common)
    if name == "fedsparse_ffa":
        return ArmSpec(name, f"fedsparse + FFA-LoRA (lora_A frozen, {pct}% heads {cfg.mode}, {cfg.bits}-bit{topk})",
                       freeze_lora_a=True, **common)
    raise ValueError(f"unknown arm {name!r}")

"""`fedsparse pack-demo`: pack a real LoRA update of all-MiniLM-L6-v2 and print the bytes saved.

One client's round, for real: LoRA r=8 on query/key/value (110,592 parameters) trains on BBC News for a
few steps while fedsparse scores every head's confidence; the 10% most confident heads are kept; the
update (trained minus initial LoRA factors) is packed four ways and compared with dense float32:

  fp32 dense      every parameter as float32 (the baseline FedAvg-LoRA upload)
  8-bit, heads    lora_A whole, lora_B rows of kept heads only, 8-bit blockwise
  4-bit, heads    the same at 4 bits
  4-bit, B only   lora_A frozen from a shared seed (FFA-LoRA): only kept heads' lora_B travels

Each row gives the payload bytes (len of the bytes that would be sent), the ratio against dense float32,
the relative error of what travelled (kept slices), and the overhead (header, names, shapes, masks,
metadata and CRC) as a share of the payload.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .pack import pack
from .unpack import unpack
from .wire import values_nbytes


def train_real_update(steps: int = 20, batch_size: int = 16, max_len: int = 128, lr: float = 2e-3,
                      n_examples: int = 320, seed: int = 0, progress: bool = True):
    """Train LoRA on BBC News; return (update name -> float32 array [LoRA deltas], head scores [6, 12],
    module names of the q/k/v LoRA layers, examples used)."""
    import torch

    from . import hf
    from .experiment.data import load_bbc_news, tokenize
    from .experiment.model import build_model, load_tokenizer

    torch.manual_seed(seed)
    texts, labels, classes = load_bbc_news()
    pick = np.random.default_rng(seed).permutation(len(texts))[:n_examples]
    data = tokenize([texts[i] for i in pick], labels[pick], classes, load_tokenizer(), max_len)
    model = build_model(len(classes), rank=8, seed=seed)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    initial = {n: p.detach().clone() for n, p in lora.items()}
    scorer = hf.patch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(seed + 1)
    bar = _progress(range(steps), "training LoRA on BBC News", progress)
    model.train()
    for _ in bar:
        batch = data.batch(rng.choice(len(data), batch_size, replace=False))
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    update = {n.replace(".default", ""): (p.detach() - initial[n]).numpy() for n, p in lora.items()}
    modules = sorted({n.rsplit(".lora_", 1)[0] for n in update})
    return update, scorer.scores().numpy(), modules, steps * batch_size


def _progress(it, desc, enabled):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False)


def head_mask_by_module(modules: list[str], kept: np.ndarray) -> dict[str, np.ndarray]:
    """module name -> bool[12]: kept[l] for every q/k/v LoRA module of encoder layer l."""
    out = {}
    for m in modules:
        layer = int(m.split(".layer.")[1].split(".")[0])
        out[m] = kept[layer]
    return out


def measure(update: dict, scores: np.ndarray, modules: list[str], sparsity: float = 0.9,
            num_examples: int = 0) -> dict:
    """Pack the update four ways; return a dict of rows and the head mask used."""
    from .heads import choose_heads

    kept = choose_heads(scores, sparsity, scope="global").mask
    mask = head_mask_by_module(modules, kept)
    # Confidences are in [0, 1]: float16 keeps them to 3 decimals at half the bytes.
    meta = {"client_id": "client-0", "round": 1, "num_examples": num_examples,
            "head_scores": scores.astype(np.float16)}
    n_params = sum(a.size for a in update.values())
    dense = n_params * 4
    b_only = {n: a for n, a in update.items() if "lora_A" not in n}
    arms = {
        "fp32 dense": (update, dict(bits=32)),
        "8-bit, heads": (update, dict(bits=8, head_mask=mask)),
        "4-bit, heads": (update, dict(bits=4, head_mask=mask)),
        "4-bit, B only": (b_only, dict(bits=4, head_mask=mask)),
    }
    rows = {}
    for name, (upd, kw) in arms.items():
        payload = pack(upd, metadata=meta, **kw)
        got = unpack(payload)
        num = den = 0.0
        for n, a in upd.items():
            travelled = _travelled(got, n, a.shape)
            num += float(np.sum((got[n][travelled] - a[travelled]).astype(np.float64) ** 2))
            den += float(np.sum(a[travelled].astype(np.float64) ** 2))
        entries = got.layout.entries
        values = sum(values_nbytes(e.n_kept, e.bits, got.group_size) for e in entries if not e.is_meta)
        rows[name] = {"bytes": len(payload), "ratio": dense / len(payload),
                      "rel_error": (num / den) ** 0.5 if den else 0.0,
                      "overhead_bytes": len(payload) - values, "overhead_share": (len(payload) - values) / len(payload)}
    return {"parameters": n_params, "dense_fp32_bytes": dense, "kept_heads": int(kept.sum()),
            "total_heads": int(kept.size), "rows": rows}


def _travelled(got, name, shape) -> np.ndarray:
    masks = got.head_masks
    if name not in masks:
        return np.ones(shape, dtype=bool)
    e = got.entry(name)
    from .sparsity import element_mask

    return element_mask(shape, e.kind, masks[name]).reshape(shape)


def format_table(res: dict) -> str:
    lines = [f"LoRA r=8 on query/key/value of all-MiniLM-L6-v2: {res['parameters']:,} parameters; "
             f"{res['kept_heads']}/{res['total_heads']} heads kept "
             f"({1 - res['kept_heads'] / res['total_heads']:.0%} pruned)",
             f"{'upload':<16}{'bytes':>10}{'vs fp32':>10}{'rel. error':>12}{'overhead':>10}"]
    for name, r in res["rows"].items():
        lines.append(f"{name:<16}{r['bytes']:>10,}{r['ratio']:>9.1f}x{r['rel_error']:>12.4f}"
                     f"{r['overhead_share']:>10.1%}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--steps", type=int, default=20, help="local training steps (default 20)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="share of heads pruned (default 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    t0 = time.perf_counter()
    update, scores, modules, n = train_real_update(steps=args.steps, seed=args.seed, progress=not args.no_progress)
    res = measure(update, scores, modules, args.sparsity, num_examples=n)
    res["train_steps"] = args.steps
    print(format_table(res))
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0

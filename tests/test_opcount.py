"""fedsparse.opcount.count_ops against an analytic count of a tiny BERT + LoRA training step."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fedsparse import hf, peft_tools  # noqa: E402
from fedsparse.opcount import CATEGORIES, OpCount, count_ops  # noqa: E402

# d hidden, H heads (D = d / H), I intermediate, L layers, r LoRA rank, B x S tokens
d, H, I, L, r, B, S = 32, 4, 48, 3, 2, 2, 8
D, N = d // H, B * S


def model(stock: str = "sdpa"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                  intermediate_size=I, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    base = transformers.BertModel(cfg, add_pooling_layer=False)
    base.set_attn_implementation(stock)
    return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_dropout=0.0, target_modules=[
        "query", "key", "value", "attention.output.dense"]))


def inputs():
    # inputs_embeds that need a gradient make every layer's backward alike (grad w.r.t. every input)
    return {"inputs_embeds": torch.randn(B, S, d, generator=torch.Generator().manual_seed(1), requires_grad=True)}


def analytic(kept_per_layer, flash=True):
    """Forward and backward FLOPs of a BERT layer stack with LoRA (rank r) on q, k, v and the output projection,
    frozen base weights, and K of H heads computed in each layer (K = 0: the attention block is skipped).
    flash: the attention backward recomputes q k^T (flash-style kernels: torch SDPA on the CPU, fedsparse's
    op) instead of reading stored probabilities (eager)."""
    fwd = dict.fromkeys(CATEGORIES, 0)
    bwd = dict.fromkeys(CATEGORIES, 0)
    for k in kept_per_layer:
        kd = k * D  # features of the kept heads
        fwd["feed_forward"] += 2 * 2 * N * d * I
        bwd["feed_forward"] += 2 * 2 * N * d * I  # grad w.r.t. the input only (frozen weights)
        if k == 0:
            continue
        fwd["projections"] += 3 * 2 * N * d * kd + 2 * N * kd * d
        bwd["projections"] += 3 * 2 * N * d * kd + 2 * N * kd * d
        fwd["attention"] += 2 * (2 * B * k * S * S * D)  # q k^T and p v
        bwd["attention"] += (5 if flash else 4) * (2 * B * k * S * S * D)  # (q k^T again,) dv, dp, dq, dk
        lora = 3 * (2 * N * d * r + 2 * N * r * kd) + (2 * N * kd * r + 2 * N * r * d)
        fwd["lora"] += lora
        bwd["lora"] += 2 * lora  # weight grad and input grad of every factor
    return fwd, bwd


@pytest.mark.parametrize("how", ["sdpa", "eager", "fedsparse"])
def test_dense_step_matches_analytic(how):
    m = model("sdpa" if how == "fedsparse" else how)
    if how == "fedsparse":
        hf.patch(m, score=False)
    ops = count_ops(m, inputs())
    fwd, bwd = analytic([H] * L, flash=how != "eager")
    assert ops.forward == fwd and ops.backward == bwd
    assert ops.total == sum(fwd.values()) + sum(bwd.values())
    assert ops.breakdown == {c: fwd[c] + bwd[c] for c in CATEGORIES}


def test_drop_mode_matches_analytic():
    m = model()
    mask = np.zeros((L, H), dtype=bool)
    mask[0, [1, 3]] = True  # 2 heads, none, all 4
    mask[2] = True
    peft_tools.prune(m, mask, mode="drop").scorer.enabled = False
    ops = count_ops(m, inputs())
    fwd, bwd = analytic([2, 0, 4])
    assert ops.forward == fwd and ops.backward == bwd


def test_masked_heads_cost_no_attention():
    m = model()
    mask = np.zeros((L, H), dtype=bool)
    mask[:, 0] = True
    hf.patch(m, head_mask=mask, score=False)
    ops = count_ops(m, inputs())
    dense_fwd, dense_bwd = analytic([H] * L)
    # masking keeps the projections (they run for every head) but the attention core runs for 1 head of 4
    assert ops.forward["projections"] == dense_fwd["projections"]
    assert ops.forward["attention"] == dense_fwd["attention"] // 4
    assert ops.backward["attention"] == dense_bwd["attention"] // 4


def test_forward_only_and_side_effects():
    m = model()
    kw = inputs()
    before = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    ops = count_ops(m, kw, backward=False)
    fwd, _ = analytic([H] * L)
    assert ops.forward == fwd and ops.backward_total == 0
    count_ops(m, kw)
    assert all((p.grad is None) == (before[n] is None) for n, p in m.named_parameters())
    assert all(p.grad is None for p in m.parameters())
    assert not m.base_model.model.encoder.layer[0].attention.self.query._forward_hooks
    text = str(ops)
    assert all(c in text for c in CATEGORIES) and "total" in text
    assert set(ops.to_dict()) == {"forward", "backward", "forward_total", "backward_total", "total"}
    assert OpCount().total == 0


def test_other_category_and_loss_fn():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=d, num_hidden_layers=1, num_attention_heads=H,
                                  intermediate_size=I, max_position_embeddings=32, num_labels=3)
    clf = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(0, 50, (B, S), generator=torch.Generator().manual_seed(2))
    ops = count_ops(clf, {"input_ids": ids, "labels": torch.tensor([0, 2])})
    # pooler d x d and classifier d x 3 on B rows: forward, and weight + input grads backward
    assert ops.forward["other"] == 2 * B * d * d + 2 * B * d * 3
    assert ops.backward["other"] == 2 * (2 * B * d * d + 2 * B * d * 3)
    custom = count_ops(clf, {"input_ids": ids}, loss_fn=lambda out: out.logits.sum())
    assert custom.forward == ops.forward
    for p in clf.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        count_ops(clf, {"input_ids": ids})

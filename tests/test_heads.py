"""HeadMask, choose_heads and the gradient importance scorer (fedsparse.heads)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedsparse.errors import PayloadError
from fedsparse.heads import HeadMask, choose_heads


# ---- HeadMask ---------------------------------------------------------------------------------------------

def _mask():
    m = np.zeros((3, 4), dtype=bool)
    m[0, [1, 3]] = True
    m[2, :] = True
    return HeadMask(m)


def test_headmask_views_and_repr():
    m = _mask()
    assert m.shape == (3, 4) and m.n_layers == 3 and m.n_heads == 4 and len(m) == 3
    assert m.kept() == [[1, 3], [], [0, 1, 2, 3]]
    assert m.n_kept == 6 and m.sparsity == pytest.approx(0.5)
    assert m[0].tolist() == [False, True, False, True]
    text = repr(m)
    assert "3 layers x 4 heads" in text and "kept 6/12" in text and "sparsity 0.500" in text
    assert "layer 0: 1, 3" in text and "layer 1: -" in text and "layer 2: 0, 1, 2, 3" in text
    with pytest.raises(ValueError):
        m.mask[0, 0] = True  # read-only
    assert np.asarray(m).dtype == bool


def test_headmask_accepts_numeric_and_torch():
    torch = pytest.importorskip("torch")
    m = _mask()
    assert HeadMask(m.mask.astype(np.int8)) == m
    assert HeadMask(torch.from_numpy(m.mask.copy())) == m
    assert HeadMask(m) == m and hash(HeadMask(m)) == hash(m)
    assert m.torch().dtype == torch.bool and m.torch().tolist() == m.to_list()
    assert HeadMask.ones(2, 3).n_kept == 6
    assert HeadMask.from_kept(m.kept(), 4) == m


@pytest.mark.parametrize("bad,err", [(np.zeros(4, bool), ValueError), (np.zeros((2, 0), bool), ValueError),
                                     (np.array([["a", "b"]]), TypeError)])
def test_headmask_rejects(bad, err):
    with pytest.raises(err):
        HeadMask(bad)


def test_headmask_from_kept_rejects_bad_index():
    with pytest.raises(ValueError, match="head index"):
        HeadMask.from_kept([[0, 4]], 4)


def test_headmask_roundtrips():
    m = _mask()
    assert HeadMask.from_bytes(m.to_bytes()) == m
    assert HeadMask.from_json(m.to_json()) == m
    assert HeadMask.from_list(m.to_list()) == m
    assert len(m.to_bytes()) == 9 + 2 + 4  # header, ceil(12 / 8) bitmap bytes, crc32
    big = HeadMask(np.random.default_rng(0).random((24, 32)) > 0.7)
    assert HeadMask.from_bytes(big.to_bytes()) == big
    with pytest.raises(ValueError):
        HeadMask.from_json('{"layers": 2, "heads": 4, "kept": [[1]]}')
    with pytest.raises(ValueError):
        HeadMask.from_list([[True], [True, False]])


def test_headmask_from_bytes_rejects_malformed():
    data = _mask().to_bytes()
    cases = [b"", data[:5], data[:-1], data + b"\0", b"XXXX" + data[4:], data[:4] + b"\x09" + data[5:],
             data[:-4] + bytes(4), data[:10] + bytes([data[10] ^ 1]) + data[11:]]
    for bad in cases:
        with pytest.raises(PayloadError):
            HeadMask.from_bytes(bad)
    rng = np.random.default_rng(1)
    for _ in range(300):  # random garbage and random corruptions: PayloadError and nothing else
        raw = bytearray(data if rng.random() < 0.5 else rng.bytes(int(rng.integers(0, 40))))
        if raw:
            raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
        try:
            HeadMask.from_bytes(bytes(raw))
        except PayloadError:
            pass


# ---- choose_heads -----------------------------------------------------------------------------------------

def test_choose_global_keeps_the_top_scores():
    rng = np.random.default_rng(0)
    scores = rng.random((6, 12))
    m = choose_heads(scores, 0.9)
    assert m.n_kept == 72 - 65  # round(0.9 * 72) = 65 pruned
    threshold = np.sort(scores.reshape(-1))[::-1][m.n_kept - 1]
    assert (scores[m.mask] >= threshold).all() and (scores[~m.mask] < threshold).all()
    assert choose_heads(np.ones((1, 20)), 0.9).n_kept == 2
    assert choose_heads(scores, 0.0).n_kept == 72
    assert choose_heads(scores, 1.0).n_kept == 0


def test_choose_per_layer():
    scores = np.random.default_rng(1).random((4, 10))
    m = choose_heads(scores, 0.7, scope="layer")
    assert m.mask.sum(1).tolist() == [3, 3, 3, 3]
    for layer in range(4):
        assert sorted(m.kept()[layer]) == sorted(np.argsort(-scores[layer])[:3].tolist())


def test_choose_min_per_layer():
    scores = np.zeros((3, 4))
    scores[0] = [9, 8, 7, 6]  # all the best heads in layer 0
    m = choose_heads(scores + np.arange(4) * 0.01, 0.5, min_per_layer=1)
    assert m.n_kept == 6 and all(len(k) >= 1 for k in m.kept())
    assert set(m.kept()[0]) >= {0, 1, 2}
    # the minimum wins over the budget
    assert choose_heads(scores, 1.0, min_per_layer=2).mask.sum(1).tolist() == [2, 2, 2]
    assert choose_heads(scores, 1.0, scope="layer", min_per_layer=1).n_kept == 3


def test_choose_ties_are_deterministic():
    m = choose_heads(np.ones((2, 4)), 0.75)
    assert m.kept() == [[0, 1], []]  # lower (layer, head) wins
    scores = np.array([[1.0, 2.0, 2.0, 0.0]])
    assert choose_heads(scores, 0.75).kept() == [[1]]
    assert choose_heads(scores, 0.5, scope="layer").kept() == [[1, 2]]


def test_choose_accepts_torch_and_lists():
    torch = pytest.importorskip("torch")
    s = [[0.1, 0.5], [0.3, 0.2]]
    assert choose_heads(s, 0.5) == choose_heads(torch.tensor(s), 0.5) == HeadMask([[False, True], [True, False]])


@pytest.mark.parametrize("scores,kw,err", [
    (np.ones(4), {}, ValueError),
    (np.ones((0, 4)), {}, ValueError),
    (np.array([[1.0, np.nan]]), {}, ValueError),
    (np.array([[1.0, np.inf]]), {}, ValueError),
    (np.ones((2, 2)), {"sparsity": 1.5}, ValueError),
    (np.ones((2, 2)), {"sparsity": -0.1}, ValueError),
    (np.ones((2, 2)), {"sparsity": float("nan")}, ValueError),
    (np.ones((2, 2)), {"sparsity": "0.5"}, TypeError),
    (np.ones((2, 2)), {"scope": "model"}, ValueError),
    (np.ones((2, 2)), {"min_per_layer": 3}, ValueError),
    (np.ones((2, 2)), {"min_per_layer": -1}, ValueError),
    (np.ones((2, 2)), {"min_per_layer": 1.0}, TypeError),
    ([["a", "b"]], {}, TypeError),
])
def test_choose_validates(scores, kw, err):
    kw = {"sparsity": 0.5, **kw}
    with pytest.raises(err):
        choose_heads(scores, kw.pop("sparsity"), **kw)


def test_heads_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fedsparse.heads import HeadMask, choose_heads\n"
            "m = choose_heads([[0.1, 0.9], [0.5, 0.2]], 0.5)\n"
            "assert HeadMask.from_bytes(m.to_bytes()) == m and m.kept() == [[1], [0]]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- gradient importance (Michel et al. 2019) -----------------------------------------------------------

def _tiny_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return torch, transformers.BertModel(cfg, add_pooling_layer=False).double().eval()


def _loss(torch, hidden, mean=True):
    """A loss that depends on every head (a squared norm after LayerNorm would be almost constant)."""
    w = torch.linspace(-1, 1, hidden.shape[-1], dtype=hidden.dtype)
    per_example = (hidden * w).sum(-1).pow(2).sum(-1)
    return per_example.mean() if mean else per_example.sum()


def _scaled_loss(torch, model, ids, layer_module, head, eps):
    """Loss with head `head` of one layer scaled by (1 + eps), by a pre-hook on its output projection."""
    def hook(mod, args):
        x = args[0].clone()
        x[..., head * 4:(head + 1) * 4] *= 1 + eps
        return (x,)

    h = layer_module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return _loss(torch, model(input_ids=ids).last_hidden_state).item()
    finally:
        h.remove()


def test_gradient_importance_matches_finite_differences():
    from fedsparse.heads import GradientImportance
    from fedsparse.hf import attention_layers

    torch, model = _tiny_bert()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    with GradientImportance(model, per_example=False) as imp:
        _loss(torch, model(input_ids=ids).last_hidden_state).backward()
        scores = imp.scores()
    assert scores.shape == (2, 4) and (scores > 0).all()
    eps = 1e-6
    for index, layer in enumerate(attention_layers(model)):
        for head in range(4):
            up = _scaled_loss(torch, model, ids, layer.o_module, head, eps)
            down = _scaled_loss(torch, model, ids, layer.o_module, head, -eps)
            assert abs((up - down) / (2 * eps)) == pytest.approx(float(scores[index, head]), rel=1e-4)
    # hooks are gone: the model computes what it did, without gates
    assert all(not layer.o_module._forward_pre_hooks for layer in attention_layers(model))


def test_gradient_importance_per_example_accumulates():
    from fedsparse.heads import GradientImportance

    torch, model = _tiny_bert()
    ids = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(2))
    single = GradientImportance(model)
    for i in range(4):  # one example per pass; loss summed so each pass weighs one example
        _loss(torch, model(input_ids=ids[i:i + 1]).last_hidden_state, mean=False).backward()
    per_one = single.scores() * 4  # scores() averages over the 4 passes
    single.remove()
    batch = GradientImportance(model)
    _loss(torch, model(input_ids=ids).last_hidden_state, mean=False).backward()
    torch.testing.assert_close(batch.scores(), per_one, rtol=1e-5, atol=1e-7)
    assert torch.allclose(batch.scores(normalize=True).norm(dim=1), torch.ones(2, dtype=torch.float32))
    batch.reset()
    assert (batch.scores() == 0).all()
    batch.remove()

"""fedsparse.server.aggregate against the numpy reference (server/reference.py), its properties, and bad input."""
import struct
import zlib

import numpy as np
import pytest

import fedsparse
from fedsparse import _backend
from fedsparse.errors import PayloadError
from fedsparse.server import AggregationError, aggregate
from fedsparse.server import reference as R

L, H, D, RANK = 2, 4, 32, 8
MODULES = [f"model.layers.{l}.self_attn.{m}" for l in range(L) for m in ("q_proj", "o_proj")]


def make_update(rng, scale=1.0):
    u = {}
    for mod in MODULES:
        u[f"{mod}.lora_A.weight"] = (scale * rng.standard_normal((RANK, D))).astype(np.float32)
        u[f"{mod}.lora_B.weight"] = (scale * rng.standard_normal((D, RANK))).astype(np.float32)
    u["classifier.bias"] = rng.standard_normal(5).astype(np.float32)
    return u


def make_payloads(n=5, *, bits=8, seed=0, scores="array", masks=True, topk=None, ids=True):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        meta = {"num_examples": int(rng.integers(1, 100)), "round": 3}
        if ids:
            meta["client_id"] = f"c{k}"
        if scores == "array":
            meta["head_scores"] = rng.random((L, H)).astype(np.float32)
        elif scores == "dict":
            meta["head_scores"] = {m: rng.random(H).round(3).tolist() for m in MODULES}
        elif scores == "flat":
            meta["head_scores"] = rng.random(H).astype(np.float32)
        elif scores == "module":
            for m in MODULES:
                meta[f"head_scores/{m}"] = rng.random(H).astype(np.float32)
        mask = {m: rng.random(H) < 0.5 for m in MODULES} if masks else None
        out.append(fedsparse.pack(make_update(rng), head_mask=mask, bits=bits, metadata=meta, topk=topk))
    return out


def decoded(payloads):
    return [R.ClientUpdate.from_packed(fedsparse.unpack(p)) for p in payloads]


def make_base(payloads, seed=9):
    rng = np.random.default_rng(seed)
    u = fedsparse.unpack(payloads[0])
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in u.shapes.items()}


def assert_close(res, exp, atol=2e-6):
    assert sorted(res) == sorted(exp)
    for n in exp:
        np.testing.assert_allclose(res[n], exp[n], rtol=2e-5, atol=atol, err_msg=n)


REFS = {
    "fedavg": lambda ups, base, w=None: R.fedavg(ups, w, base),
    "headwise": lambda ups, base, w=None: R.headwise(ups, w, base),
    "median": lambda ups, base, w=None: R.median(ups, base),
    "trimmed_mean": lambda ups, base, w=None: R.trimmed_mean(ups, 0.2, base),
}


@pytest.fixture(params=["native", "numpy"])
def backend(request, monkeypatch):
    if request.param == "native":
        if _backend.native is None:
            pytest.skip("native module not built")
    else:
        monkeypatch.setattr(_backend, "native", None)
    return request.param


@pytest.mark.parametrize("method", list(REFS))
@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_reference(method, bits, with_base, backend):
    ps = make_payloads(5, bits=bits, seed=bits)
    base = make_base(ps) if with_base else None
    res = aggregate(ps, method=method, base=base, trim=0.2)
    assert_close(res, REFS[method](decoded(ps), base))
    assert res.method == method and res.clients == [f"c{k}" for k in range(5)]
    assert res.metadata["round"] == 3 and res.metadata["num_clients"] == 5


@pytest.mark.parametrize("scores", ["array", "dict", "flat", "module", None])
def test_head_score_forms(scores, backend):
    ps = make_payloads(4, scores=scores, seed=3)
    assert_close(aggregate(ps), R.headwise(decoded(ps)))


@pytest.mark.parametrize("method", ["fedavg", "headwise"])
def test_mixed_sparsity_kinds(method, backend):
    """Dense, head-sparse and top-k clients of the same tensors: weight sums get finer as clients arrive. Each
    order twice: the second time every accumulator starts from what the first left in stream._STARTS, which the
    upgrades must not have changed."""
    rng = np.random.default_rng(5)
    ps = []
    for k, kind in enumerate(["dense", "heads", "topk", "heads", "dense"]):
        mask = {m: rng.random(H) < 0.5 for m in MODULES} if kind == "heads" else None
        ps.append(fedsparse.pack(make_update(rng), head_mask=mask, topk=0.3 if kind == "topk" else None,
                                 metadata={"client_id": k, "num_examples": k + 1}))
    base = make_base(ps)
    for order in ([0, 1, 2, 3, 4], [1, 0, 3, 2, 4], [2, 1, 0, 4, 3]) * 2:
        sub = [ps[i] for i in order]
        assert_close(aggregate(sub, method=method, base=base), REFS[method](decoded(sub), base))


@pytest.mark.parametrize("method", ["fedavg", "headwise", "median"])
def test_clip_norm(method, backend):
    ps = make_payloads(4, bits=32, seed=11)
    ups = R.clip(decoded(ps), 3.0)
    assert_close(aggregate(ps, method=method, clip_norm=3.0), REFS[method](ups, None), atol=1e-5)


@pytest.mark.parametrize("method", ["headwise", "fedavg", "multibranch"])
def test_batch_sizes_agree(method):
    ps = branch_payloads() if method == "multibranch" else make_payloads(7, seed=17)
    base = None if method == "multibranch" else make_base(ps)
    ref = aggregate(ps, method=method, base=base, batch=1)
    for batch in (2, 3, 100):
        res = aggregate(iter(ps), method=method, base=base, batch=batch)
        for n in ref:
            np.testing.assert_allclose(res[n], ref[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="batch"):
        aggregate(ps, batch=0)


def test_given_weights_sequence_and_mapping():
    ps = make_payloads(4, seed=2)
    w = [0.5, 2.0, 0.0, 1.5]
    exp = R.headwise(decoded(ps), w)
    assert_close(aggregate(ps, weights=w), exp)
    assert_close(aggregate(ps, weights={f"c{k}": x for k, x in enumerate(w)}), exp)
    res = aggregate(ps, weights=[3 * x for x in w], method="fedavg")
    assert_close(res, R.fedavg(decoded(ps), w))
    assert abs(sum(res.weights.values()) - 1) < 1e-12
    assert res.weights["c2"] == 0


# -- properties ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fedavg", "headwise", "median", "trimmed_mean", "hetlora", "flora", "flexlora"])
def test_client_order_invariance(method):
    ps = make_payloads(6, seed=4)
    a = aggregate(ps, method=method)
    b = aggregate(ps[::-1], method=method)
    c = aggregate([ps[i] for i in (2, 5, 0, 3, 1, 4)], method=method)
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[n], c[n], rtol=1e-5, atol=1e-6)


def test_weights_are_normalised():
    ps = make_payloads(4, seed=6)
    a = aggregate(ps, weights=[1, 2, 3, 4])
    b = aggregate(ps, weights=[10, 20, 30, 40])
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-6, atol=1e-7)
    assert np.isclose(sum(a.weights.values()), 1.0)
    assert np.allclose(list(a.weights.values()), [0.1, 0.2, 0.3, 0.4])


def test_heads_nobody_kept_keep_base():
    rng = np.random.default_rng(7)
    none_kept = {m: np.array([True, False, True, False]) for m in MODULES}
    ps = [fedsparse.pack(make_update(rng), head_mask=none_kept, metadata={"client_id": k}) for k in range(3)]
    base = make_base(ps)
    res = aggregate(ps, base=base)
    for mod in MODULES:
        name = f"{mod}.lora_B.weight" if "q_proj" in mod else f"{mod}.lora_A.weight"
        x, b = res[name], base[name]
        if "q_proj" in mod:  # head rows: heads 1 and 3 own rows [8,16) and [24,32)
            np.testing.assert_array_equal(x[8:16], b[8:16])
            np.testing.assert_array_equal(x[24:32], b[24:32])
            assert not np.allclose(x[0:8], b[0:8])
        else:  # head columns
            np.testing.assert_array_equal(x[:, 8:16], b[:, 8:16])
            np.testing.assert_array_equal(x[:, 24:32], b[:, 24:32])
        np.testing.assert_array_equal(res.head_counts[name], [3, 0, 3, 0])
        np.testing.assert_array_equal(res.head_masks[name], [True, False, True, False])
    without = aggregate(ps)  # no base: zeros
    assert not without["model.layers.0.self_attn.q_proj.lora_B.weight"][8:16].any()


@pytest.mark.parametrize("method", ["fedavg", "headwise", "median", "trimmed_mean"])
def test_one_client_returns_its_own_update(method):
    ps = make_payloads(1, seed=8, bits=8)
    base = make_base(ps)
    own = decoded(ps)[0]
    res = aggregate(ps, method=method, base=base)
    for n, x in own.tensors.items():
        sent = own.sent(n)
        np.testing.assert_allclose(res[n][sent], x[sent], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(res[n][~sent], base[n][~sent])


def test_one_client_hetero_ranks_return_its_own_update():
    ps = make_payloads(1, bits=32, masks=False, seed=12)
    own = decoded(ps)[0].tensors
    for method in ("hetlora", "flora", "flexlora"):
        res = aggregate(ps, method=method).client_update("c0")
        for mod in MODULES:
            a, b = f"{mod}.lora_A.weight", f"{mod}.lora_B.weight"
            assert res[a].shape == own[a].shape and res[b].shape == own[b].shape
            np.testing.assert_allclose(res[b] @ res[a], own[b] @ own[a], rtol=1e-4, atol=1e-4)


# -- inputs and outputs -------------------------------------------------------------------------------------

def test_accepts_packed_updates_and_generators():
    ps = make_payloads(3, seed=13)
    exp = aggregate(ps)
    for inp in ([fedsparse.unpack(p) for p in ps], (p for p in ps), [bytearray(p) for p in ps],
                [memoryview(p) for p in ps]):
        assert_close(aggregate(inp), exp)


def test_result_packs_again():
    ps = make_payloads(3, seed=14)
    res = aggregate(ps)
    again = fedsparse.unpack(fedsparse.pack(res, bits=32, metadata=res.metadata))
    assert_close(dict(again), dict(res))
    assert again.metadata["method"] == "headwise" and again.metadata["num_clients"] == 3


def test_default_client_ids_are_positions():
    ps = make_payloads(3, ids=False, seed=15)
    res = aggregate(ps)
    assert res.clients == [0, 1, 2]
    assert res.client_update(1) is res


def test_base_is_never_modified():
    ps = make_payloads(3, seed=16)
    base = make_base(ps)
    before = {n: a.copy() for n, a in base.items()}
    aggregate(ps, base=base, method="fedavg")
    aggregate(ps, base=base, method="headwise")
    for n in base:
        np.testing.assert_array_equal(base[n], before[n])


# -- heterogeneous ranks ------------------------------------------------------------------------------------

def hetero_payloads(ranks=(2, 4, 8), bits=32, seed=0):
    rng = np.random.default_rng(seed)
    ps = []
    for k, r in enumerate(ranks):
        u = {"m.q.lora_A.weight": rng.standard_normal((r, 12)).astype(np.float32),
             "m.q.lora_B.weight": rng.standard_normal((10, r)).astype(np.float32),
             "m.v.lora_A.weight": rng.standard_normal((r, 12)).astype(np.float32),
             "m.v.lora_B.weight": rng.standard_normal((6, r)).astype(np.float32),
             "cls.weight": rng.standard_normal(3).astype(np.float32)}
        ps.append(fedsparse.pack(u, bits=bits, metadata={"client_id": f"c{k}", "num_examples": 10 * (k + 1)}))
    return ps


@pytest.mark.parametrize("method", ["hetlora", "flora", "flexlora"])
@pytest.mark.parametrize("bits", [32, 8])
def test_hetero_ranks_match_reference(method, bits):
    ps = hetero_payloads(bits=bits)
    res = aggregate(ps, method=method)
    glob, per = getattr(R, method)(decoded(ps))
    assert_close(res, glob, atol=1e-5)
    for k, cid in enumerate(["c0", "c1", "c2"]):
        mine = res.client_update(cid)
        for n in per[k]:
            assert mine[n].shape == per[k][n].shape
            np.testing.assert_allclose(mine[n], per[k][n], rtol=1e-4, atol=1e-5)


def test_hetero_rank_shapes_and_exactness():
    ps = hetero_payloads()
    ups = decoded(ps)
    w = np.array([10, 20, 30]) / 60
    exact = sum(wk * (u.tensors["m.q.lora_B.weight"].astype(np.float64) @ u.tensors["m.q.lora_A.weight"])
                for wk, u in zip(w, ups))
    flora = aggregate(ps, method="flora")
    assert flora["m.q.lora_A.weight"].shape == (14, 12)
    np.testing.assert_allclose(flora["m.q.lora_B.weight"] @ flora["m.q.lora_A.weight"], exact, atol=1e-5)
    flex = aggregate(ps, method="flexlora")
    for cid, r in zip(["c0", "c1", "c2"], (2, 4, 8)):
        a, b = flex.client_update(cid)["m.q.lora_A.weight"], flex.client_update(cid)["m.q.lora_B.weight"]
        assert a.shape == (r, 12) and b.shape == (10, r)
        u, s, vt = np.linalg.svd(exact)  # the best rank-r approximation
        np.testing.assert_allclose(b @ a, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-4)
    het = aggregate(ps, method="hetlora")
    assert het["m.q.lora_A.weight"].shape == (8, 12)
    assert het.client_update("c0")["m.q.lora_B.weight"].shape == (10, 2)
    np.testing.assert_allclose(het["cls.weight"], sum(wk * u.tensors["cls.weight"] for wk, u in zip(w, ups)),
                               rtol=1e-6)


def test_hetero_rejects_mismatched_dims():
    ps = hetero_payloads()
    rng = np.random.default_rng(1)
    bad = fedsparse.pack({"m.q.lora_A.weight": rng.standard_normal((4, 13)).astype(np.float32),
                          "m.q.lora_B.weight": rng.standard_normal((10, 4)).astype(np.float32),
                          "m.v.lora_A.weight": rng.standard_normal((4, 12)).astype(np.float32),
                          "m.v.lora_B.weight": rng.standard_normal((6, 4)).astype(np.float32),
                          "cls.weight": rng.standard_normal(3).astype(np.float32)}, metadata={"client_id": "bad"})
    with pytest.raises(AggregationError, match=r"client 'bad', tensor 'm\.q\.lora_A\.weight'"):
        aggregate(ps + [bad], method="flexlora")


# -- multi-branch -------------------------------------------------------------------------------------------

def branch_payloads(seed=0, masks=True):
    rng = np.random.default_rng(seed)

    def one(branch, depth, k):
        u, mask = {}, {}
        for l in range(depth):
            u[f"enc.layers.{l}.shared.q_proj.lora_B.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
            u[f"enc.layers.{l}.shared.q_proj.lora_A.weight"] = rng.standard_normal((2, 6)).astype(np.float32)
            u[f"enc.layers.{l}.local.weight"] = rng.standard_normal((depth, 3)).astype(np.float32)
            mask[f"enc.layers.{l}.shared.q_proj"] = rng.random(4) < 0.6
        u["head.weight"] = rng.standard_normal((2, depth)).astype(np.float32)
        return fedsparse.pack(u, head_mask=mask if masks else None, bits=8,
                              metadata={"client_id": f"{branch}{k}", "branch": branch, "num_examples": 5 + k,
                                        "head_scores": rng.random((depth, 4)).astype(np.float32)})
    return [one("big", 6, 0), one("big", 6, 1), one("small", 3, 0), one("small", 3, 1), one("small", 3, 2),
            one("tiny", 2, 0)]


@pytest.mark.parametrize("inner", ["headwise", "fedavg"])
@pytest.mark.parametrize("opts", [{}, {"branch_weights": {"big": 1.0, "small": 3.0, "tiny": 0.5}},
                                  {"layer_map": {"small": {0: 0, 1: 1, 2: 5}}, "target_depth": 6},
                                  {"depths": {"tiny": 4}}])
def test_multibranch_matches_reference(inner, opts, backend):
    ps = branch_payloads()
    res = aggregate(ps, method="multibranch", inner=inner, **opts)
    glob, per = R.multibranch(decoded(ps), inner=inner, **opts)
    assert_close(res, glob)
    assert sorted(res.branches) == sorted(per)
    for br in per:
        assert_close(res.branches[br], per[br])
    assert res.client_update("small1") is res.branches["small"]
    assert res.branches["small"]["enc.layers.2.local.weight"].shape == (3, 3)


def test_multibranch_proportional_layer_matching():
    """With one client per branch and fedavg, the deep branch's layer 2l and the shallow branch's layer l
    (l -> floor(l * 6 / 3) = 2l) average; odd deep layers only see the deep branch."""
    ps = branch_payloads(masks=False)
    ps = [ps[0], ps[2]]
    res = aggregate(ps, method="multibranch", inner="fedavg", branch_weights={"big": 1, "small": 1})
    big, small = decoded(ps)
    name = "enc.layers.{}.shared.q_proj.lora_B.weight"
    for l in range(3):
        np.testing.assert_allclose(res[name.format(2 * l)],
                                   (big.tensors[name.format(2 * l)] + small.tensors[name.format(l)]) / 2, rtol=1e-6)
        np.testing.assert_allclose(res[name.format(2 * l + 1)], big.tensors[name.format(2 * l + 1)], rtol=1e-6)
        np.testing.assert_allclose(res.branches["small"][name.format(l)], res[name.format(2 * l)])
    np.testing.assert_allclose(res.branches["small"]["enc.layers.1.local.weight"],
                               small.tensors["enc.layers.1.local.weight"], rtol=1e-6)


def test_multibranch_shared_shape_mismatch():
    rng = np.random.default_rng(0)
    a = fedsparse.pack({"x.0.shared.w": rng.standard_normal(4).astype(np.float32)},
                       metadata={"client_id": "a", "branch": "A"})
    b = fedsparse.pack({"x.0.shared.w": rng.standard_normal(5).astype(np.float32)},
                       metadata={"client_id": "b", "branch": "B"})
    with pytest.raises(AggregationError, match=r"branch 'B', tensor 'x\.0\.shared\.w'"):
        aggregate([a, b], method="multibranch")


# -- bad input ----------------------------------------------------------------------------------------------

def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_empty_input():
    for method in ("fedavg", "headwise", "median", "flexlora", "multibranch"):
        with pytest.raises(AggregationError, match="at least one payload"):
            aggregate([], method=method)


def test_different_format_versions():
    ps = make_payloads(3)
    p = bytearray(ps[1][:-4])
    p[4:6] = struct.pack("<H", 2)
    with pytest.raises(PayloadError, match=r"client #1: unsupported payload version 2"):
        aggregate([ps[0], with_crc(bytes(p)), ps[2]])


def test_mismatched_names_and_shapes():
    rng = np.random.default_rng(0)
    ps = make_payloads(2)
    u = make_update(rng)
    u["model.layers.0.self_attn.q_proj.lora_A.weight"] = rng.standard_normal((RANK, D + 1)).astype(np.float32)
    bad_shape = fedsparse.pack(u, metadata={"client_id": "odd"})
    with pytest.raises(AggregationError, match=r"client 'odd', tensor 'model\.layers\.0\.self_attn\.q_proj\.lora_A"
                                               r"\.weight': shape \(8, 33\) differs"):
        aggregate(ps + [bad_shape])
    u = make_update(rng)
    del u["classifier.bias"]
    with pytest.raises(AggregationError, match=r"client 'short', tensor 'classifier\.bias': missing"):
        aggregate(ps + [fedsparse.pack(u, metadata={"client_id": "short"})], method="fedavg")
    u = make_update(rng)
    u["extra"] = np.zeros(2, np.float32)
    with pytest.raises(AggregationError, match=r"client 'long', tensor 'extra'"):
        aggregate(ps + [fedsparse.pack(u, metadata={"client_id": "long"})], method="median")


def nan_payload(cid="nan-client"):
    rng = np.random.default_rng(0)
    p = fedsparse.pack(make_update(rng), bits=32, metadata={"client_id": cid})
    e = fedsparse.unpack(p).entry("classifier.bias")
    body = bytearray(p[:-4])
    body[e.data_offset + 4:e.data_offset + 8] = struct.pack("<f", float("nan"))
    return with_crc(bytes(body))


@pytest.mark.parametrize("method", ["fedavg", "headwise", "median", "hetlora", "multibranch"])
def test_nan_in_an_update_names_client_and_tensor(method):
    ps = make_payloads(3, bits=32)
    base = make_base(ps)
    before = {n: a.copy() for n, a in base.items()}
    with pytest.raises(PayloadError, match=r"client #3: values of 'classifier\.bias' contain NaN"):
        aggregate(ps + [nan_payload()], method=method, base=None if method == "multibranch" else base)
    for n in base:
        np.testing.assert_array_equal(base[n], before[n])


def test_weight_beyond_float32_names_the_client():
    rng = np.random.default_rng(1)
    huge = fedsparse.pack(make_update(rng), bits=32, metadata={"client_id": "huge", "num_examples": 10**39})
    with pytest.raises(AggregationError, match=r"client 'huge': weight 1e\+39 times its head scores exceeds float32"):
        aggregate(make_payloads(2, bits=32) + [huge])


def test_an_earlier_batch_error_comes_first(monkeypatch):
    """A kernel error of a batch (client #1) is raised before anything of the next batch (its bad head score)."""
    ok = make_payloads(3, bits=32)
    rng = np.random.default_rng(1)
    scores = rng.random((L, H)).astype(np.float32)
    scores[0, 0] = -1.0
    bad_score = fedsparse.pack(make_update(rng), bits=32, metadata={"client_id": "bad-score", "head_scores": scores})
    with pytest.raises(AggregationError, match="bad-score"):
        aggregate([ok[0], ok[1], ok[2], bad_score], batch=2)
    native = _backend.native

    class FirstBatchFails:
        def __getattr__(self, name):
            return getattr(native, name)

        def accumulate(self, *args):
            raise ValueError("fedsparse: payload 1: plan row 0: a kernel-time error")

    monkeypatch.setattr(_backend, "native", FirstBatchFails())
    with pytest.raises(PayloadError, match=r"client 'c1': fedsparse: payload 1: plan row 0: a kernel-time error"):
        aggregate([ok[0], ok[1], ok[2], bad_score], batch=2)


def test_nan_in_dense_reference_input():
    ups = decoded(make_payloads(2, bits=32))
    ups[1].tensors["classifier.bias"][0] = np.nan
    with pytest.raises(AggregationError, match=r"client 'c1', tensor 'classifier\.bias': NaN"):
        R.headwise(ups)


def test_bad_weights_and_metadata():
    ps = make_payloads(3)
    with pytest.raises(AggregationError, match="3 weights given for more|2 weights given"):
        aggregate(ps, weights=[1, 2])
    with pytest.raises(AggregationError, match="4 weights given for 3 payloads"):
        aggregate(ps, weights=[1, 2, 3, 4])
    with pytest.raises(AggregationError, match=r"client 'c1': weight -1.0 must be finite"):
        aggregate(ps, weights=[1, -1, 1])
    with pytest.raises(AggregationError, match="sum to 0"):
        aggregate(ps, weights=[0, 0, 0])
    with pytest.raises(AggregationError, match=r"client 'c2': no weight"):
        aggregate(ps, weights={"c0": 1, "c1": 1})
    with pytest.raises(AggregationError, match=r"client 'c0' appears twice"):
        aggregate([ps[0], ps[1], ps[0]])
    rng = np.random.default_rng(0)
    bad = fedsparse.pack(make_update(rng), head_mask={m: np.ones(H, bool) for m in MODULES},
                         metadata={"client_id": "s", "head_scores": {MODULES[1]: [1.0, 2.0]}})
    with pytest.raises(AggregationError, match=r"client 's', tensor 'model\.layers\.0\.self_attn\.o_proj\.lora_A"
                                               r"\.weight': .* 2 scores for 4 heads"):
        aggregate(ps + [bad])
    neg = fedsparse.pack(make_update(rng), head_mask={m: np.ones(H, bool) for m in MODULES},
                         metadata={"client_id": "n", "head_scores": -np.ones((L, H), np.float32)})
    with pytest.raises(AggregationError, match=r"client 'n', tensor .* finite and >= 0"):
        aggregate(ps + [neg])
    zero_n = fedsparse.pack(make_update(rng), metadata={"client_id": "z", "num_examples": 0})
    with pytest.raises(AggregationError, match=r"client 'z': metadata num_examples"):
        aggregate([zero_n])
    base = make_base(ps)
    base["classifier.bias"] = np.zeros(7, np.float32)
    with pytest.raises(AggregationError, match=r"base, tensor 'classifier\.bias'"):
        aggregate(ps, base=base)


def test_malformed_payload_names_the_client():
    ps = make_payloads(2)
    with pytest.raises(PayloadError, match=r"client #1: CRC mismatch"):
        aggregate([ps[0], ps[1][:-1] + bytes([ps[1][-1] ^ 1])])
    with pytest.raises(PayloadError, match=r"client #0: payload must be bytes-like"):
        aggregate(["not bytes"])
    with pytest.raises(TypeError):
        aggregate(ps[0])


def test_errors_come_in_payload_order_across_batches():
    """A later batch's errors never overtake an earlier one's."""
    ps = make_payloads(6, seed=21)
    bad_crc = ps[5][:-1] + bytes([ps[5][-1] ^ 1])
    dup = ps[0]  # client 'c0' again, in the first batch
    with pytest.raises(AggregationError, match=r"client 'c0' appears twice"):
        aggregate([ps[0], ps[1], dup, ps[3], ps[4], bad_crc], batch=3)
    with pytest.raises(PayloadError, match=r"client #5: CRC mismatch"):
        aggregate(ps[:5] + [bad_crc], batch=3)
    with pytest.raises(PayloadError, match=r"client #4: payload must be bytes-like"):
        aggregate(ps[:4] + ["not bytes", bad_crc], batch=2)


@pytest.mark.parametrize("method", ["fedavg", "headwise"])
def test_a_flipped_byte_anywhere_is_a_crc_error(method, backend):
    """fedavg and headwise check the CRCs in the kernel's pass over the payloads, after their tables and metadata
    were read (numpy: in the parser, first): a flipped byte past the magic and version still reads as a CRC
    mismatch of its client wherever it lies (a name or client id that no longer matches, metadata or a table
    that no longer parses, a mask, a scale, a code, the CRC itself)."""
    ps = make_payloads(5, seed=31)
    size = len(ps[3])
    edges = {x for e in fedsparse.unpack(ps[3]).layout.entries
             for x in (e.mask_offset, e.data_offset, e.data_offset + 5, e.data_offset + e.data_nbytes - 1)}
    for pos in sorted({*range(6, 64), *range(64, size, 97), *edges, size - 5, size - 1}):
        bad = bytearray(ps[3])
        bad[pos] ^= 0x10
        with pytest.raises(PayloadError, match=r"^client #3: CRC mismatch"):
            aggregate(ps[:3] + [bytes(bad)] + ps[4:], method=method, batch=2)


def test_a_late_crc_check_keeps_errors_in_payload_order():
    """With the CRC checked by the kernel, errors still come as with the CRC checked first: a payload that fails
    when it is read (id, metadata, weight, tensors) raises in payload order with corrupt ones; one that fails when
    its batch is folded in (head scores) raises after any corrupt payload of its batch."""
    ps = make_payloads(6, seed=32)
    corrupt = ps[1][:-30] + bytes([ps[1][-30] ^ 1]) + ps[1][-29:]
    rng = np.random.default_rng(3)
    scores = rng.random((L, H)).astype(np.float32)
    scores[0, 0] = -1.0
    bad_score = fedsparse.pack(make_update(rng), head_mask={m: np.ones(H, bool) for m in MODULES},
                               metadata={"client_id": "bad-score", "head_scores": scores})
    for batch in (6, 2):
        with pytest.raises(PayloadError, match=r"^client #1: CRC mismatch"):
            aggregate([ps[0], corrupt, ps[2], ps[0], ps[4]], batch=batch)  # c0 twice at #3
        with pytest.raises(PayloadError, match=r"^client #1: CRC mismatch"):
            aggregate([ps[0], corrupt, bad_score, ps[3]], batch=batch)
        with pytest.raises(AggregationError, match=r"client 'c0' appears twice"):
            aggregate([ps[0], ps[0], corrupt], batch=batch)
        with pytest.raises(AggregationError if batch == 2 else PayloadError,
                           match=r"bad-score" if batch == 2 else r"^client #2: CRC mismatch"):
            aggregate([ps[0], bad_score, corrupt], batch=batch)


def test_iterator_is_read_one_batch_at_a_time(monkeypatch):
    import fedsparse.server.stream as stream
    ps = make_payloads(12, seed=22)
    expected = aggregate(ps, batch=2)
    pulled, ahead = [], []

    def gen():
        for i, p in enumerate(ps):
            pulled.append(i)
            yield p

    add = stream.Accumulator.add

    def spy(self, client, *a, **k):  # when a client is planned, how far has the iterator been read?
        ahead.append(len(pulled) - client.position)
        return add(self, client, *a, **k)

    monkeypatch.setattr(stream.Accumulator, "add", spy)
    assert_close(aggregate(gen(), batch=2), expected)
    assert len(ahead) == 12 and max(ahead) <= 2  # the client's own batch only


def _aggregate_in_child(payloads, out):
    res = aggregate(payloads, batch=2)
    out.put({n: np.asarray(res[n]) for n in res})


def test_aggregate_in_a_forked_child():
    """A child forked after the parent aggregated (a Flower server process, say) aggregates alike: nothing kept
    per process (threads, pools) is inherited broken."""
    import multiprocessing
    ps = make_payloads(6, seed=24)
    expected = aggregate(ps, batch=2)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_aggregate_in_child, args=(ps, out))
    child.start()
    try:
        got = out.get(timeout=30)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    for n in expected:
        np.testing.assert_array_equal(got[n], np.asarray(expected[n]))


def test_clipping_reads_each_tensor_table_once(monkeypatch):
    """The kernel takes each client's norm from the values it adds: clients after the first never have their
    tensor table re-read, with clipping as without; and once a table was seen, not even the first."""
    import fedsparse.server.stream as stream
    ps = make_payloads(6, seed=23)
    expected = aggregate(ps, clip_norm=3.0)
    reads = []
    layout = stream.Client.layout

    def spy(client):
        reads.append(client.position)
        return layout.fget(client)

    monkeypatch.setattr(stream.Client, "layout", property(spy))
    monkeypatch.setattr(stream, "_STARTS", {})
    assert_close(aggregate(ps, clip_norm=3.0), expected)
    assert set(reads) == {0}
    reads.clear()
    assert_close(aggregate(ps, clip_norm=3.0), expected)
    assert reads == []


def test_tensor_rows_slice_or_index():
    from types import SimpleNamespace as NS

    from fedsparse.server.stream import _tensor_rows

    def client(flags):
        return NS(layout=NS(entries=[NS(is_meta=m) for m in flags]))

    assert _tensor_rows(client([True, False, False, True])) == slice(1, 3)
    assert _tensor_rows(client([True])) == slice(0, 0)
    np.testing.assert_array_equal(_tensor_rows(client([False, True, False])), [0, 2])


def test_lists_are_cut_into_even_batches(monkeypatch):
    """A list of n is cut into round(n / batch) batches of ceil(n / that); an iterator gets `batch` as asked."""
    from fedsparse import _backend
    real, sizes = _backend.native, []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def accumulate(self, payloads, *rest):
            sizes.append(len(payloads))
            return real.accumulate(payloads, *rest)

    if real is None:
        pytest.skip("native module not built")
    ps = make_payloads(10, seed=24)
    expected = aggregate(ps, batch=1)
    monkeypatch.setattr(_backend, "native", Spy())
    for inp, batch, want in ((ps, 4, [5, 5]), (ps, 3, [4, 4, 2]), (ps, 32, [10]), (iter(ps), 4, [4, 4, 2]),
                             (ps, None, [10])):
        sizes.clear()
        assert_close(aggregate(inp, batch=batch), expected)
        assert sizes == want, (batch, sizes)
    from fedsparse.server.aggregate import _even_batch  # the defaults: 128 for a sequence, 32 from an iterator
    assert [_even_batch([0] * n, None) for n in (1, 100, 200, 300, 1000)] == [1, 100, 100, 150, 125]
    assert _even_batch(iter(ps), None) == 32


def test_bad_options():
    ps = make_payloads(2)
    with pytest.raises(ValueError, match="method must be one of"):
        aggregate(ps, method="mean")
    with pytest.raises(ValueError, match="clip_norm"):
        aggregate(ps, clip_norm=-1)
    with pytest.raises(AggregationError, match="trim"):
        aggregate(ps, method="trimmed_mean", trim=0.5)


def test_headwise_untrained_tensor_does_not_dilute():
    """A client whose tensor is all zeros (it did not train it) sends nothing of it under top-k, so headwise
    keeps the other client's values instead of halving them."""
    trained = {"a": np.arange(1, 9, dtype=np.float32).reshape(2, 4)}
    untrained = {"a": np.zeros((2, 4), np.float32)}
    ps = [fedsparse.pack(u, bits=32, topk=1.0, metadata={"client_id": i, "num_examples": 10})
          for i, u in enumerate([trained, untrained])]
    agg = fedsparse.aggregate(ps, method="headwise")
    np.testing.assert_allclose(agg["a"], trained["a"])


@pytest.mark.skipif(not fedsparse.has_native(), reason="native module not built")
@pytest.mark.parametrize("n, batch", [(6, 2), (5, 2), (3, 8)])
def test_kernel_error_of_a_batch_names_the_client(monkeypatch, n, batch):
    """A kernel error of a batch names the client, whether the batch is the last one or not."""
    from fedsparse import _backend

    real = _backend.native

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def accumulate(self, payloads, *rest):
            if len(payloads) == 2 or len(payloads) < batch:
                raise ValueError("fedsparse: payload 1: plan row 0: bad kept count")
            return real.accumulate(payloads, *rest)

    monkeypatch.setattr(_backend, "native", Failing())
    with pytest.raises(PayloadError, match=r"client 'c1': fedsparse: payload 1: plan row 0: bad kept count"):
        fedsparse.aggregate(iter(make_payloads(n)), method="headwise", batch=batch)  # iterator: batches as asked

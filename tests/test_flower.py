"""fedsparse.flower: the strategy and client helpers on Flower's in-process objects, and a real deployment.

Unit tests drive FedSparse and fedsparse_mod with Flower's Message/RecordDict objects through a grid that
serializes every message the way Flower does (deflate to objects, inflate back). The integration test
(marked slow) starts flower-superlink + 3 flower-supernode on 127.0.0.1, runs 2 rounds of the demo app
(tiny random-init BERT + LoRA), and checks that every process is gone afterwards, whatever happened.
Skipped when Flower is not installed (`pip install 'fedsparse[flower]'`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType,  # noqa: E402
                      MetricRecord, RecordDict)
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import fedsparse  # noqa: E402
from fedsparse import pack, unpack  # noqa: E402
from fedsparse.flower import _records as R  # noqa: E402
from fedsparse.flower import client as C  # noqa: E402
from fedsparse.flower import deploy as D  # noqa: E402
from fedsparse.flower.client import apply_update, fedsparse_mod, global_update, train_reply  # noqa: E402
from fedsparse.flower.strategy import FedSparse  # noqa: E402
from fedsparse.server import aggregate  # noqa: E402

H, HD, RANK, LAYERS = 4, 3, 2, 2  # heads, head dim, LoRA rank, layers of the synthetic adapter


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps new messages with the process's task identity; a ServerApp process has one, tests not."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def wire(msg: Message) -> tuple[Message, int]:
    """msg as the other side sees it (Flower's object encoding, there and back) and its encoded bytes."""
    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    nbytes = sum(len(c) for c in contents.values())
    return inflate_object_from_contents(msg.object_id, contents), nbytes


class LocalGrid(Grid):
    """A Grid whose nodes are in-process ClientApp callables: (msg, context) -> reply."""

    def __init__(self, nodes: dict, handler, run_config=None):
        self.nodes, self.handler, self.run_config = nodes, handler, dict(run_config or {})
        self.sent, self.bytes_down, self.bytes_up = [], 0, 0

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            got, n = wire(m)
            got.metadata.__dict__["_message_id"] = m.object_id
            self.sent.append(got)
            self.bytes_down += n
            nid = m.metadata.dst_node_id
            ctx = Context(run_id=7, node_id=nid, node_config=self.nodes[nid], state=RecordDict(),
                          run_config=self.run_config)
            try:
                reply = self.handler(got, ctx)
            except Exception as exc:  # what a SuperNode reports for a ClientApp that raised
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=got)
            back, n = wire(reply)
            self.bytes_up += n
            replies.append(back)
        return replies


# -- a synthetic LoRA client --------------------------------------------------------------------------------

def module(l: int) -> str:
    return f"model.layers.{l}.attn.q"


def init_state() -> dict:
    rng = np.random.default_rng(0)
    s = {}
    for l in range(LAYERS):
        s[f"{module(l)}.lora_A.weight"] = rng.normal(size=(RANK, H * HD)).astype(np.float32)
        s[f"{module(l)}.lora_B.weight"] = np.zeros((H * HD, RANK), np.float32)
    s["classifier.weight"] = rng.normal(size=(3, H * HD)).astype(np.float32)
    return s


def client_delta(node: int, rnd: int, state: dict) -> tuple[dict, dict, np.ndarray]:
    """(delta, module -> kept heads, head scores [L, H]) of one client's 'training' from state."""
    rng = np.random.default_rng([node, rnd])
    delta = {n: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for n, v in state.items()}
    masks = {}
    for l in range(LAYERS):
        keep = np.zeros(H, bool)
        keep[[(node + l) % H, (node + l + 1) % H]] = True
        masks[module(l)] = keep
        rows = np.repeat(keep, HD)
        delta[f"{module(l)}.lora_B.weight"][~rows] = 0.0
    scores = rng.uniform(0.2, 1.0, size=(LAYERS, H)).astype(np.float32)
    return delta, masks, scores


def helper_client(bits=32, losses=True):
    """A ClientApp body that uses the helpers: global_update -> train -> pack -> train_reply."""
    def handle(msg: Message, ctx: Context) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        start = apply_update(init_state(), global_update(msg))
        delta, masks, scores = client_delta(ctx.node_id, rnd, start)
        n = 10 + ctx.node_id
        payload = pack(delta, head_mask=masks, bits=bits,
                       metadata={"client_id": ctx.node_id, "round": rnd, "num_examples": n, "head_scores": scores})
        kw = {"global_loss": 1.0 + 0.1 * ctx.node_id, "local_loss": 0.5} if losses else {}
        return train_reply(msg, payload, num_examples=n, **kw)
    return handle


def run_rounds(strategy, grid, rounds):
    return strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=rounds,
                          train_config=ConfigRecord({"lr": 0.1}))


# -- records ----------------------------------------------------------------------------------------------

def test_payload_array_carries_bytes_untouched():
    p = pack({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, bits=8)
    a = R.payload_array(p)
    assert a.stype == R.STYPE and a.dtype == "uint8" and a.shape == (len(p),)
    assert R.array_payload(a) == p
    got, _ = wire(Message(RecordDict({"x": ArrayRecord({"p": a})}), dst_node_id=1, message_type=MessageType.TRAIN))
    assert R.array_payload(got.content["x"]["p"]) == p
    with pytest.raises(ValueError, match="not a fedsparse payload"):
        R.array_payload(Array(np.zeros(3)))
    with pytest.raises(TypeError):
        a.numpy()  # not a numpy serialization: nobody decodes it by accident


# -- the strategy -----------------------------------------------------------------------------------------

def test_round_aggregates_packed_payloads_headwise():
    nodes = {n: {} for n in (1, 2, 3, 4)}
    grid = LocalGrid(nodes, helper_client(bits=32))
    strategy = FedSparse(clients_per_round=3, selection="random", bits=32, fraction_evaluate=0.0, seed=5)
    result = run_rounds(strategy, grid, 1)
    (row,) = strategy.history
    assert len(row["selected"]) == 3 and set(row["selected"]) <= set(nodes)
    assert len(grid.sent) == 3 and {m.metadata.dst_node_id for m in grid.sent} == set(row["selected"])
    for m in grid.sent:
        assert m.content["config"]["server-round"] == 1 and m.content["config"]["lr"] == 0.1
        assert len(global_update(m)) == 0  # nothing moved yet: the round-1 broadcast carries no tensor
    # The same payloads through fedsparse.server.aggregate give the strategy's state.
    payloads = [pack(d, head_mask=m, bits=32, metadata=meta) for d, m, meta in
                (client_delta_packed(n) for n in row["selected"])]
    expect = aggregate(payloads, method="headwise", weights=[10 + n for n in row["selected"]])
    got = strategy.global_update()
    assert set(got) == set(expect)
    for name in expect:
        np.testing.assert_allclose(got[name], expect[name], rtol=1e-6, atol=1e-7)
    assert row["upload_bytes"] == sum(map(len, payloads))
    assert row["failures"] == 0
    assert result.train_metrics_clientapp[1]["upload-bytes"] == row["upload_bytes"]
    # Heads that no client kept keep their global value (a zero delta).
    kept = np.zeros((LAYERS, H), bool)
    for n in row["selected"]:
        for l, m in enumerate(client_delta(n, 1, init_state())[1].values()):
            kept[l] |= m
    for l in range(LAYERS):
        b = got[f"{module(l)}.lora_B.weight"].reshape(H, -1)
        assert np.all(np.any(b != 0, axis=1) == kept[l])


def client_delta_packed(node):
    delta, masks, scores = client_delta(node, 1, init_state())
    return delta, masks, {"client_id": node, "round": 1, "num_examples": 10 + node, "head_scores": scores}


def test_broadcast_sends_only_moved_heads_and_round_trips():
    grid = LocalGrid({n: {} for n in (1, 2)}, helper_client(bits=32))
    strategy = FedSparse(clients_per_round=1, selection="random", bits=32, fraction_evaluate=0.0)
    run_rounds(strategy, grid, 2)
    second = grid.sent[-1]
    got = global_update(second)
    assert second.content["config"]["server-round"] == 2
    # Round 2's broadcast is the state after round 1, exactly (bits=32); pruned heads did not travel.
    sent1 = strategy.history[0]["selected"][0]
    _, masks, _ = client_delta(sent1, 1, init_state())
    for l in range(LAYERS):
        name = f"{module(l)}.lora_B.weight"
        assert np.array_equal(got.head_masks[name], masks[module(l)])
    assert strategy.history[1]["download_bytes"] == len(C.global_payload(second))
    # The dense tensors and the kept heads equal round 1's client delta: one client, weight 1.
    d1, _, _ = client_delta(sent1, 1, init_state())
    for name in d1:
        np.testing.assert_allclose(got[name], d1[name], atol=1e-7)


def test_quantized_broadcast_is_smaller_and_close():
    grid = LocalGrid({n: {} for n in (1, 2, 3)}, helper_client(bits=8))
    strategy = FedSparse(clients_per_round=2, selection="random", bits=8, fraction_evaluate=0.0)
    run_rounds(strategy, grid, 1)
    state = strategy.global_update()
    p8 = strategy.downlink_payload("default", 2)
    strategy.bits = 32
    p32 = strategy.downlink_payload("default", 2)
    assert len(p8) < 0.6 * len(p32)  # tiny tensors: the table and scales are a good part of it
    got8, got32 = unpack(p8), unpack(p32)
    assert set(got8) == set(got32) == set(state)
    for name, x in state.items():
        np.testing.assert_array_equal(got32[name], x)
        np.testing.assert_allclose(got8[name], x, atol=float(np.abs(x).max()) / 100)


def test_loss_gap_selection_uses_reported_losses():
    strategy = FedSparse(clients_per_round=2, explore=0.0, fraction_evaluate=0.0)
    strategy.stats = {1: {"global_loss": 1.0, "local_loss": 0.9}, 2: {"global_loss": 2.0, "local_loss": 0.5},
                      3: {"global_loss": 1.5, "local_loss": 1.0}}
    assert strategy.select(4, [1, 2, 3]) == [2, 3]
    # An unseen client has the prior gap: tried first.
    assert strategy.select(4, [1, 2, 3, 9])[0] == 9
    # Deterministic for a seed.
    s2 = FedSparse(clients_per_round=2, explore=0.5, fraction_evaluate=0.0, seed=3)
    s2.stats = dict(strategy.stats)
    assert s2.select(7, [1, 2, 3]) == s2.select(7, [3, 2, 1])


def test_losses_recorded_from_replies():
    grid = LocalGrid({n: {} for n in (1, 2, 3)}, helper_client())
    strategy = FedSparse(clients_per_round=3, fraction_evaluate=0.0)
    run_rounds(strategy, grid, 1)
    assert strategy.stats[2] == {"num_examples": 12.0, "last_round": 1, "global_loss": pytest.approx(1.2),
                                 "local_loss": 0.5}


def test_failed_client_is_skipped():
    ok = helper_client()

    def handler(msg, ctx):
        if ctx.node_id == 2:
            raise RuntimeError("out of memory")
        return ok(msg, ctx)

    grid = LocalGrid({n: {} for n in (1, 2, 3)}, handler)
    strategy = FedSparse(clients_per_round=3, fraction_evaluate=0.0)
    run_rounds(strategy, grid, 1)
    row = strategy.history[0]
    assert row["failures"] == 1 and sorted(row["clients"]) == [1, 3]
    assert strategy.global_update()


def test_malformed_payload_costs_its_sender_the_round():
    ok = helper_client()

    def handler(msg, ctx):
        reply = ok(msg, ctx)
        if ctx.node_id == 3:  # flip a byte: the CRC no longer matches
            p = bytearray(R.update_payload(reply.content))
            p[len(p) // 2] ^= 0xFF
            reply.content[R.RECORD_KEY] = ArrayRecord({R.UPDATE_KEY: R.payload_array(bytes(p))})
        return reply

    grid = LocalGrid({n: {} for n in (1, 2, 3)}, handler)
    strategy = FedSparse(clients_per_round=3, fraction_evaluate=0.0)
    run_rounds(strategy, grid, 1)
    row = strategy.history[0]
    assert row["failures"] == 1 and sorted(row["clients"]) == [1, 2]


def test_multibranch_keeps_a_state_per_branch():
    branch = {1: "big", 2: "big", 3: "small", 4: "small"}

    def handler(msg, ctx):
        b = branch[ctx.node_id]
        width = 6 if b == "big" else 4
        rnd = int(msg.content["config"]["server-round"])
        got = global_update(msg, branch=b)
        assert not got or {n for n in got if n.startswith("local")} <= {f"local.{b}"}
        rng = np.random.default_rng([ctx.node_id, rnd])
        delta = {f"local.{b}": rng.normal(size=(width,)).astype(np.float32),
                 "encoder.0.shared.w": rng.normal(size=(3,)).astype(np.float32)}
        payload = pack(delta, bits=32, metadata={"client_id": ctx.node_id, "branch": b, "num_examples": 1})
        return train_reply(msg, payload, num_examples=1, global_loss=1.0, local_loss=0.5)

    grid = LocalGrid({n: {} for n in branch}, handler)
    strategy = FedSparse(clients_per_round=4, method="multibranch", selection="all", bits=32,
                         fraction_evaluate=0.0, aggregate_options={"inner": "fedavg"})
    run_rounds(strategy, grid, 2)
    assert sorted(strategy.state) == ["big", "small"]
    assert set(strategy.global_update("big")) == {"local.big", "encoder.0.shared.w"}
    np.testing.assert_allclose(strategy.global_update("big")["encoder.0.shared.w"],
                               strategy.global_update("small")["encoder.0.shared.w"], atol=1e-6)
    # Round 2: each client got exactly its own branch's payload.
    for m in grid.sent[4:]:
        (b,) = R.global_payloads(m.content[R.RECORD_KEY])
        assert b == branch[m.metadata.dst_node_id]
    # A client of unknown branch gets every branch's payload and picks its own.
    assert strategy.branches_for(99) == ["big", "small"]
    with pytest.raises(ValueError, match="several branches"):
        strategy.global_update()


def test_bad_options_rejected():
    with pytest.raises(ValueError, match="method"):
        FedSparse(method="flora")
    with pytest.raises(ValueError, match="selection"):
        FedSparse(selection="best")
    with pytest.raises(fedsparse.PackError):
        FedSparse(bits=5)
    with pytest.raises(ValueError, match="aggregate_options"):
        FedSparse(aggregate_options={"weights": [1]})


# -- the client Mod ---------------------------------------------------------------------------------------

def server_message(state: dict | None = None, rnd: int = 3, branches=("default",)) -> Message:
    payloads = {b: pack(state or {}, bits=32, metadata={"round": rnd}) for b in branches}
    content = RecordDict({R.RECORD_KEY: R.global_record(payloads), "config": ConfigRecord({"server-round": rnd})})
    msg = Message(content=content, dst_node_id=42, message_type=MessageType.TRAIN)
    got, _ = wire(msg)
    return got


def test_mod_unpacks_in_and_packs_out():
    state = {"model.layers.0.attn.q.lora_B.weight": np.ones((H * HD, RANK), np.float32),
             "classifier.weight": np.full((3, 4), 0.5, np.float32)}
    seen = {}
    delta, masks, scores = client_delta(42, 3, init_state())

    def train(msg, ctx):
        seen.update({n: a.numpy() for n, a in msg.content["arrays"].items()})
        assert R.RECORD_KEY not in msg.content  # the train function never sees the payload
        content = RecordDict({
            "arrays": ArrayRecord({n: Array(v) for n, v in delta.items()}),
            "metrics": MetricRecord({"num-examples": 17, "global-loss": 1.5, "local-loss": 0.7}),
            C.HEADS_KEY: ArrayRecord({m: Array(v) for m, v in masks.items()}),
            C.SCORES_KEY: ArrayRecord({"head_scores": Array(scores)}),
            "extra": ConfigRecord({"note": "kept"}),
        })
        return Message(content=content, reply_to=msg)

    msg = server_message(state)
    ctx = Context(run_id=7, node_id=42, node_config={}, state=RecordDict(), run_config={})
    reply = fedsparse_mod(bits=8)(msg, ctx, train)
    assert set(seen) == set(state) and all(np.array_equal(seen[n], state[n]) for n in state)
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.dst_node_id == msg.metadata.src_node_id
    assert set(reply.content.array_records) == {R.RECORD_KEY}
    assert reply.content["metrics"]["num-examples"] == 17 and reply.content["extra"]["note"] == "kept"
    got = unpack(R.update_payload(reply.content))
    assert got.metadata["client_id"] == 42 and got.metadata["round"] == 3 and got.metadata["num_examples"] == 17
    np.testing.assert_array_equal(got.metadata["head_scores"], scores)
    assert set(got) == set(delta)
    for l in range(LAYERS):
        name = f"{module(l)}.lora_B.weight"
        assert np.array_equal(got.head_masks[name], masks[module(l)])
        rows = np.repeat(masks[module(l)], HD)
        assert not got[name][~rows].any()  # pruned heads did not travel
        np.testing.assert_allclose(got[name][rows], delta[name][rows], atol=2e-3)
    # What the strategy reads from such a reply: the payload and the metrics.
    back, _ = wire(reply)
    assert R.update_payload(back.content) == R.update_payload(reply.content)


def test_mod_passes_other_messages_and_errors_through():
    plain = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2))})}), dst_node_id=1,
                    message_type=MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    echo = fedsparse_mod()(plain, ctx, lambda m, c: Message(m.content, reply_to=m))
    assert "arrays" in echo.content.array_records  # FedAvg-style traffic is left alone

    msg = server_message()
    err = fedsparse_mod()(msg, ctx, lambda m, c: Message(Error(code=1, reason="boom"), reply_to=m))
    assert err.has_error() and err.error.reason == "boom"
    assert err.metadata.reply_to_message_id == msg.metadata.message_id


def test_mod_picks_the_branch():
    state_a = {"a": np.ones(2, np.float32)}
    payloads = {"a": pack(state_a, bits=32), "b": pack({"b": np.ones(3, np.float32)}, bits=32)}
    content = RecordDict({R.RECORD_KEY: R.global_record(payloads), "config": ConfigRecord({"server-round": 1})})
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    assert set(global_update(msg, branch="a")) == {"a"}
    with pytest.raises(KeyError, match="branches"):
        global_update(msg)
    ctx = Context(run_id=7, node_id=1, node_config={"branch": "b"}, state=RecordDict(), run_config={})
    seen = []
    fedsparse_mod()(msg, ctx, lambda m, c: seen.append(set(m.content["arrays"].keys())) or
                    Message(Error(code=0, reason="x"), reply_to=m))
    assert seen == [{"b"}]


def test_apply_update():
    init = {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)}
    out = apply_update(init, {"b": np.full((2, 2), 2.0, np.float32)})
    assert np.array_equal(out["a"], init["a"]) and np.array_equal(out["b"], np.full((2, 2), 2.0))
    out["a"][0] = 5
    assert init["a"][0] == 1
    with pytest.raises(KeyError, match="does not have"):
        apply_update(init, {"c": np.ones(1)})


# -- the demo app in process (tiny BERT + LoRA, real fedsparse client path) ---------------------------------

def test_demo_app_in_process(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from fedsparse.flower import demo_app

    results = {}
    for strategy in ("fedsparse", "fedavg"):
        rc = {**demo_app.DEFAULTS, "strategy": strategy, "result-path": str(tmp_path / f"{strategy}.json")}
        grid = LocalGrid({11: {"partition-id": 0}, 22: {"partition-id": 1}, 33: {"partition-id": 2}},
                         demo_app.client_app, rc)
        ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
        demo_app.server_app(grid, ctx)
        results[strategy] = (json.loads((tmp_path / f"{strategy}.json").read_text()), grid)
    fs, fs_grid = results["fedsparse"]
    fa, fa_grid = results["fedavg"]
    assert [h["round"] for h in fs["history"]] == [1, 2]
    assert all(len(h["selected"]) == 2 for h in fs["history"])
    assert set(fs["evaluate"]) == {"0", "1", "2"}
    assert 0.0 <= fs["evaluate"]["2"]["accuracy"] <= 1.0
    # Half the heads kept, 8-bit: both directions cost a fraction of FedAvg's fp32 adapter.
    assert fs_grid.bytes_up < 0.5 * fa_grid.bytes_up
    assert fs_grid.bytes_down < 0.5 * fa_grid.bytes_down


# -- deployment helpers -----------------------------------------------------------------------------------

def test_write_app_is_a_valid_flower_app(tmp_path):
    from flwr.common.config import validate_config

    app = D.write_app(tmp_path / "app", "fedsparse.flower.demo_app", config={"num-rounds": 3, "model": "tiny",
                                                                            "lr": 0.5, "flag": True})
    import tomllib

    config = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"] == {"num-rounds": 3, "model": "tiny", "lr": 0.5, "flag": True}


def test_stop_ends_detached_descendants(tmp_path):
    """stop() ends what a component spawned in a new session (as Flower does with SuperExec), by marker."""
    script = tmp_path / "spawner.py"
    pidfile = tmp_path / "grandchild.pid"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(120)
    """))
    dep = D.LocalDeployment(1, workdir=tmp_path / "dep", stop_timeout=2.0)
    dep._started = True
    (dep.workdir / "logs").mkdir(parents=True)
    try:
        child = dep._spawn("spawner", [sys.executable, str(script)])
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the spawner did not start its grandchild"
            time.sleep(0.05)
        grandchild = int(pidfile.read_text())
        if sys.platform.startswith("linux"):
            assert grandchild in D.marked_pids(dep.token)
        assert os.getpgid(grandchild) != os.getpgid(child.pid)  # out of the group we would kill
    finally:
        dep.stop()
    assert child.poll() is not None
    if sys.platform.startswith("linux"):
        assert not _running(grandchild)
    assert dep.alive() == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has ended; only its parent's bookkeeping is left
    except OSError:
        return False


def _flower_binaries() -> bool:
    try:
        for name in ("flower-superlink", "flower-supernode", "flwr"):
            D._executable(name)
    except D.DeploymentError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _flower_binaries(), reason="Flower's command-line tools are not installed")
def test_deployment_superlink_and_three_supernodes(tmp_path):
    """SuperLink + 3 SuperNodes on 127.0.0.1, the demo app for 2 rounds; every process stopped afterwards,
    also after a run that fails. Bounded: 150 s per run, 5 s from SIGTERM to SIGKILL."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    t0 = time.monotonic()
    dep = D.LocalDeployment(3, workdir=tmp_path / "deployment", env={"OMP_NUM_THREADS": "1"})
    try:
        with dep:
            app = D.write_app(dep.workdir / "app", "fedsparse.flower.demo_app")
            bad = dep.run(app, {"strategy": "nonesuch"}, timeout=150)
            assert not bad.ok and bad.status.startswith("finished")  # a failing ServerApp ends its run
            result_path = tmp_path / "result.json"
            run = dep.run(app, {"num-rounds": 2, "clients-per-round": 3, "result-path": str(result_path)},
                          timeout=150)
            assert run.ok, run.output[-3000:]
            assert len(dep.alive()) >= 4  # superlink + 3 supernodes (+ their SuperExecs)
        out = json.loads(result_path.read_text())
        assert [h["round"] for h in out["history"]] == [1, 2]
        assert all(len(h["selected"]) == 3 and h["failures"] == 0 for h in out["history"])
        assert set(out["evaluate"]) == {"0", "1", "2"}
        payload_bytes = sum(h["upload_bytes"] + h["download_bytes"] for h in out["history"])
        # Flower's own count of what crossed its Fleet API covers our payloads plus its envelopes.
        assert run.traffic["total"] > payload_bytes > 0
    finally:
        dep.stop()
        leftovers = D.marked_pids(dep.token)
        assert leftovers == [], f"processes left running: {leftovers}"
    assert time.monotonic() - t0 < 300


def test_deploy_main_writes_app(tmp_path, capsys):
    assert D.main(["--write-app", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "pyproject.toml").exists()
    assert "a" in capsys.readouterr().out


def test_executable_errors_clearly(monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)
    monkeypatch.setattr(D.sys, "executable", "/nonexistent/python")
    with pytest.raises(D.DeploymentError, match="install Flower"):
        D._executable("flower-superlink")


def test_package_exports_lazily_and_says_what_to_install():
    """fedsparse.flower resolves its names on first use; without Flower it says what to install."""
    init = os.path.join(os.path.dirname(D.__file__), "__init__.py")
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("fedsparse.flower", {init!r},
                                                      submodule_search_locations=[{os.path.dirname(init)!r}])
        f = importlib.util.module_from_spec(spec)
        sys.modules["fedsparse.flower"] = f
        spec.loader.exec_module(f)
        assert f.FedSparse.__name__ == "FedSparse" and callable(f.run_experiment)
        for name in list(sys.modules):
            if name == "flwr" or name.startswith(("flwr.", "fedsparse.flower.")):
                del sys.modules[name]
        sys.modules["flwr"] = None  # as if Flower were not installed
        try:
            f.fedsparse_mod
        except ImportError as e:
            print("OK" if "fedsparse[flower]" in str(e) else e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "OK", out.stderr[-2000:]

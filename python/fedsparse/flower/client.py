"""The client side of fedsparse on Flower: unpack the incoming global update, pack the outgoing one.

Two ways to use it:

1. The Mod. A train function written for Flower's FedAvg (receive "arrays", train, reply "arrays" and
   "metrics") becomes a fedsparse client by adding `mods=[fedsparse_mod(bits=4)]` and two conventions:
   the "arrays" it receives are the global *update* (the delta from the shared-seed init, see
   fedsparse.flower.strategy), and the "arrays" it replies are *its* update (trained - start). To send only
   kept heads it adds an ArrayRecord "fedsparse.heads" (LoRA module name -> bool [H], e.g. the second result
   of fedsparse.peft_tools.extract_update) and, for head-wise weighting, an ArrayRecord "fedsparse.scores"
   ("head_scores" -> float [layers, heads], or "head_scores/<module>" -> float [H]).

       app = ClientApp()

       @app.train(mods=[fedsparse_mod(bits=4)])
       def train(msg, context):
           start = apply_update(init, {n: a.numpy() for n, a in msg.content["arrays"].items()})
           ...                                                       # train from start (see demo_app.py)
           return Message(RecordDict({"arrays": ArrayRecord(delta), "metrics": MetricRecord({...}),
                                      "fedsparse.heads": ArrayRecord(masks)}), reply_to=msg)

2. The helpers, for code that packs by itself (fedsparse.pack with metadata): `global_update(msg)` returns
   the received PackedUpdate, `train_reply(msg, payload, num_examples=...)` builds the reply.

The payload metadata the server reads (docs/aggregation.md) is filled in by the Mod: client_id (the node id,
or config "fedsparse.client-id"), round, num_examples, head_scores, and branch / num_layers when given.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from .. import pack, unpack
from ..unpack import PackedUpdate
from ._records import (DEFAULT_BRANCH, GLOBAL_LOSS, LOCAL_LOSS, NUM_EXAMPLES, RECORD_KEY, UPDATE_KEY,
                       global_payloads, payload_array)

HEADS_KEY = "fedsparse.heads"
SCORES_KEY = "fedsparse.scores"
CLIENT_ID_KEY = "fedsparse.client-id"


def global_payload(msg: Message, *, branch: str | None = None) -> bytes:
    """The packed global update a server message carries for this client (its branch's, or the only one)."""
    if RECORD_KEY not in msg.content.array_records:
        raise KeyError(f"message has no {RECORD_KEY!r} ArrayRecord (is the server using fedsparse.flower?)")
    payloads = global_payloads(msg.content.array_records[RECORD_KEY])
    if branch is not None and str(branch) in payloads:
        return payloads[str(branch)]
    if len(payloads) == 1:
        return next(iter(payloads.values()))
    if branch is None and DEFAULT_BRANCH in payloads:
        return payloads[DEFAULT_BRANCH]
    raise KeyError(f"message carries the branches {sorted(payloads)}; this client's branch is {branch!r}")


def global_update(msg: Message, *, branch: str | None = None) -> PackedUpdate:
    """The global update (name -> float32 delta from the shared init; tensors absent were never updated)."""
    return unpack(global_payload(msg, branch=branch))


def apply_update(init: Mapping, update: Mapping) -> dict:
    """init + update, name by name (names missing from update stay at init): the client's start state.
    Values are numpy arrays (torch tensors in init are converted)."""
    out = {}
    for name, value in init.items():
        x = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
        out[name] = x + np.asarray(update[name], np.float32).reshape(x.shape) if name in update else x.copy()
    unknown = [n for n in update if n not in init]
    if unknown:
        raise KeyError(f"global update has tensors this client does not have: {unknown[:3]}")
    return out


def client_id(msg: Message, context: Context):
    """This client's id: config "fedsparse.client-id" when the server runs virtual clients, else the node id."""
    cfg = msg.content.config_records.get("config")
    if cfg is not None and CLIENT_ID_KEY in cfg:
        return cfg[CLIENT_ID_KEY]
    return context.node_id


def server_round(msg: Message) -> int | None:
    cfg = msg.content.config_records.get("config")
    return int(cfg["server-round"]) if cfg is not None and "server-round" in cfg else None


def train_reply(msg: Message, payload: bytes, *, num_examples: float, global_loss: float | None = None,
                local_loss: float | None = None, metrics: Mapping | None = None,
                extra: Mapping | None = None) -> Message:
    """The reply to a training message: the payload in ArrayRecord "fedsparse", and a MetricRecord "metrics"
    with num-examples (the aggregation weight), global-loss and local-loss (for loss-gap selection) and
    `metrics`. extra: more records (name -> ConfigRecord/MetricRecord) to add."""
    m = MetricRecord({NUM_EXAMPLES: float(num_examples) if not isinstance(num_examples, int) else num_examples})
    if global_loss is not None:
        m[GLOBAL_LOSS] = float(global_loss)
    if local_loss is not None:
        m[LOCAL_LOSS] = float(local_loss)
    for k, v in (metrics or {}).items():
        m[k] = v
    content = RecordDict({RECORD_KEY: ArrayRecord({UPDATE_KEY: payload_array(payload)}), "metrics": m})
    for k, v in (extra or {}).items():
        content[k] = v
    return Message(content=content, reply_to=msg)


def fedsparse_mod(*, bits: int = 8, group_size: int = 64, rounding: str = "nearest", topk: float | None = None,
                  branch: str | None = None, num_layers: int | None = None, arrays_key: str = "arrays",
                  metrics_key: str = "metrics"):
    """A Flower Mod: the train (and evaluate) function sees and returns plain ArrayRecords; the wire carries
    fedsparse payloads.

    In:  the "fedsparse" ArrayRecord of the server's message -> ArrayRecord `arrays_key` of numpy arrays (the
         global update of this client's branch: `branch`, else node config "branch", else the only one).
    Out: ArrayRecord `arrays_key` (the client's update) + optional "fedsparse.heads" / "fedsparse.scores" ->
         one payload, fedsparse.pack(bits, group_size, rounding, topk), with metadata client_id, round,
         num_examples (from the MetricRecord's "num-examples"), head_scores, branch and num_layers.
    Messages without a fedsparse record, and error replies, pass through untouched.
    """
    pack({}, bits=bits, group_size=group_size, rounding=rounding)  # bad settings fail at app load

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.has_error() or RECORD_KEY not in msg.content.array_records:
            return call_next(msg, context)
        my_branch = branch if branch is not None else context.node_config.get("branch")
        update = global_update(msg, branch=my_branch)
        content = RecordDict({k: v for k, v in msg.content.items() if k != RECORD_KEY})
        content[arrays_key] = ArrayRecord({n: Array(update[n]) for n in update})
        inner = Message(content=content, metadata=copy.deepcopy(msg.metadata))
        reply = call_next(inner, context)
        if reply.has_error() or arrays_key not in reply.content.array_records:
            return _rewire(reply, msg)
        return _pack_reply(reply, msg, context, bits=bits, group_size=group_size, rounding=rounding, topk=topk,
                           branch=my_branch, num_layers=num_layers, arrays_key=arrays_key, metrics_key=metrics_key)

    return mod


def _rewire(reply: Message, original: Message) -> Message:
    """The same reply, addressed as a reply to the original message (the one Flower delivered)."""
    if reply.has_error():
        return Message(reply.error, reply_to=original)
    return Message(content=reply.content, reply_to=original)


def _pack_reply(reply: Message, original: Message, context: Context, *, bits, group_size, rounding, topk,
                branch, num_layers, arrays_key, metrics_key) -> Message:
    content = reply.content
    update = {n: a.numpy() for n, a in content.array_records[arrays_key].items()}
    head_mask = None
    if HEADS_KEY in content.array_records:
        head_mask = {m: a.numpy().astype(bool) for m, a in content.array_records[HEADS_KEY].items()}
    metrics = content.metric_records.get(metrics_key)
    meta: dict = {"client_id": _json_id(client_id(original, context))}
    rnd = server_round(original)
    if rnd is not None:
        meta["round"] = rnd
    if metrics is not None and NUM_EXAMPLES in metrics:
        meta["num_examples"] = metrics[NUM_EXAMPLES]
    if branch is not None:
        meta["branch"] = str(branch)
    if num_layers is not None:
        meta["num_layers"] = int(num_layers)
    if SCORES_KEY in content.array_records:
        for k, a in content.array_records[SCORES_KEY].items():
            meta[k] = np.asarray(a.numpy(), np.float32)
    payload = pack(update, head_mask=head_mask, bits=bits, group_size=group_size, rounding=rounding,
                   seed=int(rnd or 0), topk=topk, metadata=meta)
    out = RecordDict({RECORD_KEY: ArrayRecord({UPDATE_KEY: payload_array(payload)})})
    for k, v in content.items():
        if k not in (arrays_key, HEADS_KEY, SCORES_KEY):
            out[k] = v
    return Message(content=out, reply_to=original)


def _json_id(cid):
    """Client ids travel in JSON metadata: ints stay ints, anything else becomes a string."""
    return int(cid) if isinstance(cid, (int, np.integer)) and not isinstance(cid, bool) else str(cid)

"""FedSparse: a Strategy for Flower's Message API (a FedAvg subclass) that moves packed fedsparse payloads.

Each round it
  1. selects clients with fedsparse.server.select_clients (loss gap by default: the clients whose data the
     global model fits worst, with exploration and a fairness bound) instead of sampling uniformly,
  2. broadcasts the global update packed by fedsparse.pack: only tensors and heads that ever moved travel,
     quantized to `bits`, one payload per branch (architecture family),
  3. aggregates the clients' packed payloads with fedsparse.server.aggregate (head-wise by default, or
     multi-branch for heterogeneous clients) in one streaming pass, without decoding any client densely.

Protocol (what the client helpers in fedsparse.flower.client implement): every client builds the same
initial adapter (same seed); the server's global update is the delta from that init; a client uploads
`trained - start` (its delta against the state it started from), with its head mask, head scores and
num_examples in the payload. Server state is numpy only: this module never imports torch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from .. import pack, unpack
from ..server import aggregate, select_clients
from ..sparsity import KIND_HEAD_COLS, KIND_HEAD_ROWS, matrix_view
from ._records import (DEFAULT_BRANCH, GLOBAL_LOSS, LOCAL_LOSS, NUM_EXAMPLES, RECORD_KEY, global_record,
                       update_payload)

# Methods whose result is an update to add to the global state (delta protocol). The hetero-rank ones
# (hetlora, flora, flexlora) give every client its own rank and do not fit one global state per branch.
ADDITIVE_METHODS = ("headwise", "fedavg", "median", "trimmed_mean", "multibranch")
SELECTIONS = ("loss_gap", "random", "all")


class FedSparse(FedAvg):
    """Federated fine-tuning with packed, head-sparse LoRA updates on Flower's Message API.

    Selection
        clients_per_round: k clients per round (None: FedAvg's rule, max(int(fraction_train * n),
            min_train_nodes)).
        selection: "loss_gap" (default), "random" or "all" (fedsparse.server.select_clients).
        explore, max_skip, candidates: as in select_clients (share of slots explored at random; a client is
            never skipped more than max_skip rounds in a row when that is possible; Power-of-Choice candidate
            set size). seed: selection is a function of (seed, round) and the clients' statistics.
        prior_gap: the loss gap assumed for a client never seen (large: unseen clients are tried first).
    Aggregation
        method: "headwise" (default: each head averaged over the clients that kept it, weighted by data size
            and head score), "fedavg", "median", "trimmed_mean", or "multibranch" (clients of several
            architectures: payload metadata "branch"; shared tensors bridged across branches).
        aggregate_options: more keyword arguments of fedsparse.server.aggregate (clip_norm, trim, shared,
            branch_weights, layer_map, depths, target_depth, inner, batch).
    Broadcast
        bits, group_size: quantization of the broadcast global update (32 = lossless float32).
        branch_of: client id -> branch, when known up front (else learned from the clients' payloads; a client
            of unknown branch gets every branch's payload).
    Everything else (fraction_train, min_*_nodes, fraction_evaluate, weighted_by_key, metric aggregation) is
    FedAvg's; arrayrecord_key names the record the packed globals travel in (the client helpers read
    "fedsparse": leave it). Replies must carry the metric `weighted_by_key` ("num-examples"); for selection="loss_gap" also
    "global-loss" (the received global model's loss on the client's data) and "local-loss" (after training).

    After each round `history` gets a dict (round, selected, upload_bytes, download_bytes, ...) and
    `global_update(branch)` is the current global delta (name -> float32 array).
    """

    def __init__(
        self,
        *,
        clients_per_round: int | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        fraction_evaluate: float = 1.0,
        min_evaluate_nodes: int = 2,
        selection: str = "loss_gap",
        explore: float = 0.1,
        max_skip: int | None = None,
        candidates: int | None = None,
        seed: int = 0,
        prior_gap: float = 1e6,
        method: str = "headwise",
        aggregate_options: Mapping | None = None,
        bits: int = 8,
        group_size: int = 64,
        branch_of: Mapping | Callable | None = None,
        weighted_by_key: str = NUM_EXAMPLES,
        arrayrecord_key: str = RECORD_KEY,
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable | None = None,
        evaluate_metrics_aggr_fn: Callable | None = None,
    ) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
                         arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
                         train_metrics_aggr_fn=train_metrics_aggr_fn,
                         evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if method not in ADDITIVE_METHODS:
            raise ValueError(f"method must be one of {ADDITIVE_METHODS}, got {method!r}")
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if not math.isfinite(prior_gap):
            raise ValueError(f"prior_gap must be finite, got {prior_gap}")
        pack({}, bits=bits, group_size=group_size)  # raises PackError now for bad bits / group_size
        opts = dict(aggregate_options or {})
        for reserved in ("method", "weights", "base"):
            if reserved in opts:
                raise ValueError(f"aggregate_options cannot set {reserved!r} (the strategy sets it)")
        self.clients_per_round = clients_per_round
        self.selection = selection
        self.explore = explore
        self.max_skip = max_skip
        self.candidates = candidates
        self.seed = seed
        self.prior_gap = float(prior_gap)
        self.method = method
        self.aggregate_options = opts
        self.bits = bits
        self.group_size = group_size
        self.branch_of = branch_of
        self.stats: dict = {}            # client id -> select_clients statistics
        self.client_branch: dict = {}    # client id -> branch, learned from payload metadata
        self.state: dict = {}            # branch -> {name: float32 delta from the shared init}
        self.head_kinds: dict = {}       # tensor name -> (kind, n_heads) of head-sparse tensors seen
        self.history: list = []
        self._downlinks: dict = {}       # (branch, round) -> packed global update
        self._round: dict = {}

    # -- what the base class and users call -----------------------------------------------------------------

    def initial_arrays(self) -> ArrayRecord:
        """The ArrayRecord to pass as Strategy.start(initial_arrays=...): the empty global update."""
        return global_record({b: self.downlink_payload(b, 0) for b in (self.state or {DEFAULT_BRANCH: {}})})

    def global_update(self, branch: str | None = None) -> dict:
        """The current global update of a branch (name -> float32 array, the delta from the shared init)."""
        if branch is None:
            if len(self.state) > 1:
                raise ValueError(f"several branches {sorted(self.state)}: name one")
            branch = next(iter(self.state), DEFAULT_BRANCH)
        return {n: v.copy() for n, v in self.state.get(branch, {}).items()}

    def summary(self) -> None:
        log(INFO, "\t├──> fedsparse:")
        log(INFO, "\t│\t├──Selection: %s (clients/round %s, explore %.2f, max_skip %s, seed %s)", self.selection,
            self.clients_per_round or "FedAvg rule", self.explore, self.max_skip, self.seed)
        log(INFO, "\t│\t├──Aggregation: %s %s", self.method, self.aggregate_options or "")
        log(INFO, "\t│\t└──Broadcast: %s-bit, group %d", self.bits, self.group_size)
        super().summary()

    # -- training round ----------------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Select clients with select_clients and send each its branch's packed global update."""
        if self.fraction_train == 0.0:
            return []
        nodes = self.client_nodes(grid)
        selected = self.select(server_round, sorted(nodes))
        log(INFO, "configure_train: selected %d clients (out of %d) by %s", len(selected), len(nodes),
            self.selection)
        self._downlinks = {k: v for k, v in self._downlinks.items() if k[1] >= server_round}
        messages, down = [], 0
        for cid in selected:
            payloads = {b: self._downlink(b, server_round) for b in self.branches_for(cid)}
            cfg = ConfigRecord(dict(config))
            cfg["server-round"] = server_round
            for key, value in self.message_config(cid, server_round).items():
                cfg[key] = value
            content = RecordDict({self.arrayrecord_key: global_record(payloads), self.configrecord_key: cfg})
            down += sum(len(p) for p in payloads.values())
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nodes[cid]))
        self._round = {"round": server_round, "selected": list(selected), "download_bytes": int(down)}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' packed payloads with fedsparse.server.aggregate; return the packed globals."""
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        row = {**self._round, "round": server_round, "failures": len(errors)}
        if not valid:
            row.update(upload_bytes=0, clients=[])
            self.history.append(row)
            return None, None
        kept, cids, payloads, parsed = [], [], [], []
        for m in valid:
            try:  # a malformed or hostile payload costs its sender the round, not the whole run
                payload = update_payload(m.content)
                pu = unpack(payload)
            except (KeyError, ValueError) as exc:
                log(WARNING, "\t> Dropped the reply of node %d: %s", m.metadata.src_node_id, exc)
                row["failures"] += 1
                continue
            kept.append(m)
            cids.append(self.reply_client(m))
            payloads.append(payload)
            parsed.append(pu)
        valid = kept
        if not valid:
            row.update(upload_bytes=0, clients=[])
            self.history.append(row)
            return None, None
        metrics = [next(iter(m.content.metric_records.values())) for m in valid]
        self.record_stats(server_round, cids, metrics)
        self.fold(server_round, cids, payloads, metrics, parsed=parsed)
        agg_metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        up = sum(len(p) for p in payloads)
        agg_metrics["upload-bytes"] = int(up)
        agg_metrics["download-bytes"] = int(row.get("download_bytes", 0))
        row.update(upload_bytes=int(up), clients=cids, upload_by_client=[len(p) for p in payloads])
        self.history.append(row)
        return self.global_arrays(server_round), agg_metrics

    # -- the steps, each overridable ---------------------------------------------------------------------------

    def client_nodes(self, grid: Grid) -> dict:
        """client id -> node id of the clients available now (waits for min_available_nodes, like FedAvg).
        Here a client is a node; override to run several virtual clients per node."""
        need = max(self.min_available_nodes, self.clients_per_round or self.min_train_nodes)
        return {n: n for n in self.wait_for_nodes(grid, need)}

    @staticmethod
    def wait_for_nodes(grid: Grid, need: int) -> list:
        """The connected node ids, once there are at least `need` of them."""
        while len(nodes := list(grid.get_node_ids())) < need:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), need)
            time.sleep(1)
        return nodes

    def round_size(self, n_available: int) -> int:
        if self.clients_per_round is not None:
            return min(self.clients_per_round, n_available)
        return min(max(int(n_available * self.fraction_train), self.min_train_nodes), n_available)

    def select(self, server_round: int, clients: list) -> list:
        """The clients of this round, by select_clients over what the clients reported so far."""
        stats = {}
        for cid in clients:
            s = self.stats.get(cid)
            if s is None:
                s = {"global_loss": self.prior_gap, "local_loss": 0.0}
            stats[cid] = dict(s)
        k = self.round_size(len(clients))
        return list(select_clients(stats, k, strategy=self.selection, explore=self.explore,
                                   seed=[int(self.seed), int(server_round)], round=server_round,
                                   max_skip=self.max_skip, candidates=self.candidates))

    def branches_for(self, cid) -> list:
        """The branches whose payload client cid gets: its own if known, else every known branch."""
        branch = self._known_branch(cid)
        if branch is not None:
            return [branch]
        return sorted(self.state) or [DEFAULT_BRANCH]

    def message_config(self, cid, server_round: int) -> dict:
        """Extra ConfigRecord entries of client cid's training message (none here)."""
        return {}

    def reply_client(self, msg: Message):
        """The client id a reply comes from (here: its node)."""
        return msg.metadata.src_node_id

    def record_stats(self, server_round: int, cids: list, metrics: list) -> None:
        for cid, m in zip(cids, metrics):
            s = {"num_examples": float(m[self.weighted_by_key]), "last_round": server_round}
            if GLOBAL_LOSS in m and LOCAL_LOSS in m:
                s.update(global_loss=float(m[GLOBAL_LOSS]), local_loss=float(m[LOCAL_LOSS]))
            else:  # no loss statistics: no gap (selection="loss_gap" then favours unseen clients only)
                s.update(global_loss=0.0, local_loss=0.0)
            self.stats[cid] = s

    def fold(self, server_round: int, cids: list, payloads: list, metrics: list, *, parsed: list) -> None:
        """Aggregate the round's payloads (bytes, and parsed: their PackedUpdates) and add the result to the
        global state of each branch."""
        branches = []
        for cid, pu in zip(cids, parsed):
            b = str(pu.metadata.get("branch", self._known_branch(cid) or DEFAULT_BRANCH))
            self.client_branch[cid] = b
            branches.append(b)
            for name in pu:
                e = pu.entry(name)
                if e.kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS):
                    self.head_kinds[name] = (e.kind, e.n_heads)
        weights = [float(m[self.weighted_by_key]) for m in metrics]
        result = aggregate(parsed, method=self.method, weights=weights, **self.aggregate_options)
        if self.method == "multibranch":
            for b, res in result.branches.items():
                self._add(b, res)
            return
        if len(set(branches)) > 1:
            raise ValueError(f"clients of several branches {sorted(set(branches))} need method='multibranch'")
        self._add(branches[0], result)

    def global_arrays(self, server_round: int) -> ArrayRecord:
        """The packed global update of every branch (what aggregate_train returns to Strategy.start)."""
        return global_record({b: self._downlink(b, server_round + 1) for b in sorted(self.state)})

    def downlink_payload(self, branch: str, server_round: int) -> bytes:
        """pack() of a branch's global update: tensors that are not all zero, and of head-sparse tensors
        only the heads that moved (the client's shared init has the rest)."""
        state = self.state.get(branch, {})
        update, head_mask = {}, {}
        for name, x in state.items():
            if not np.any(x):
                continue
            update[name] = x
            if name in self.head_kinds:
                kind, n_heads = self.head_kinds[name]
                head_mask[_module_of(name)] = _moved_heads(x, kind, n_heads)
        return pack(update, head_mask=head_mask or None, bits=self.bits, group_size=self.group_size,
                    metadata={"round": int(server_round), "branch": branch})

    # -- internals ---------------------------------------------------------------------------------------------

    def _downlink(self, branch: str, server_round: int) -> bytes:
        key = (branch, server_round)
        if key not in self._downlinks:
            self._downlinks[key] = self.downlink_payload(branch, server_round)
        return self._downlinks[key]

    def _known_branch(self, cid):
        if cid in self.client_branch:
            return self.client_branch[cid]
        if self.branch_of is None:
            return None
        if callable(self.branch_of):
            return self.branch_of(cid)
        return self.branch_of.get(cid)

    def _add(self, branch: str, update: Mapping) -> None:
        state = self.state.setdefault(branch, {})
        for name in update:
            x = np.asarray(update[name], dtype=np.float32)
            if name in state:
                if state[name].shape != x.shape:
                    log(WARNING, "branch %s: %s changed shape %s -> %s; restarting it", branch, name,
                        state[name].shape, x.shape)
                    state[name] = x.copy()
                else:
                    state[name] = state[name] + x
            else:
                state[name] = x.copy()


def _module_of(name: str) -> str:
    """'...query.lora_B.default.weight' -> '...query' (the module pack's head_mask is keyed by)."""
    for tag in (".lora_A", ".lora_B"):
        if tag in name:
            return name.split(tag)[0]
    return name


def _moved_heads(x: np.ndarray, kind: int, n_heads: int) -> np.ndarray:
    """bool[n_heads]: the heads whose slice of x (rows or columns, as pack splits them) is not all zero."""
    rows, cols = matrix_view(x.shape, kind)
    m = x.reshape(rows, cols)
    if kind == KIND_HEAD_ROWS:
        return np.any(m.reshape(n_heads, -1) != 0, axis=1)
    return np.any(m.reshape(rows, n_heads, -1) != 0, axis=(0, 2))

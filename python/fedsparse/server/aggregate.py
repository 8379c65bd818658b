"""aggregate(): packed client updates -> the next global update, in one streaming pass, without torch.

docs/aggregation.md has the rules, the metadata the server reads and the guarantees; reference.py is the
numpy spec every method is tested against.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .. import _backend
from ..errors import PayloadError
from ..wire import DEFAULT_MAX_ELEMENTS
from .hetero import HETERO_METHODS, HeteroAccumulator
from .meta import AggregationError, branch_of, client_label, layer_index, num_examples, replace_layer
from .reference import is_shared_fn, layer_mapper
from .robust import robust_aggregate
from .stream import Accumulator, client_from, clip_factor, verify_chunk

METHODS = ("fedavg", "headwise", "median", "trimmed_mean", "multibranch") + HETERO_METHODS


class AggregateResult(Mapping):
    """The aggregate: a read-only mapping of tensor name -> float32 numpy array (pack it with fedsparse.pack
    to broadcast it), plus what the server learned:

    method, clients (ids in input order), weights (client id -> normalised weight, summing to 1),
    head_counts (name -> int32[H]: how many clients sent each head), head_weights (name -> float32[H]: the
    normalised weight those clients carried), head_masks (name -> bool[H]: heads that got an update; pass
    per module as pack(head_mask=...) to send only those), metadata (JSON-ready: method, round,
    num_clients, num_examples), dtypes (the clients' original dtypes), per_client (hetero-rank methods:
    client id -> that client's own-rank update), branches (multibranch: branch -> AggregateResult of that
    branch's tensors, shared ones mapped back; the mapping itself is then the global shared space).
    """

    def __init__(self, tensors: dict, *, method: str, clients: list, weights: dict, head_counts=None,
                 head_weights=None, metadata=None, dtypes=None, per_client=None, branches=None, client_branch=None):
        self._tensors = tensors
        self.method = method
        self.clients = clients
        self.weights = weights
        self.head_counts = head_counts or {}
        self.head_weights = head_weights or {}
        self.metadata = metadata or {}
        self.dtypes = dtypes or {}
        self.per_client = per_client
        self.branches = branches
        self._client_branch = client_branch or {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def head_masks(self) -> dict:
        return {n: c > 0 for n, c in self.head_counts.items()}

    def client_update(self, cid) -> Mapping:
        """What to send back to client cid: its own-rank update (hetero ranks), its branch's update
        (multibranch), or the aggregate itself."""
        if self.per_client is not None:
            return self.per_client[cid]
        if self.branches is not None:
            return self.branches[self._client_branch[cid]]
        if cid not in self.weights:
            raise KeyError(f"{client_label(cid)} took no part in this aggregate")
        return self

    def __repr__(self) -> str:
        n = sum(a.size for a in self._tensors.values())
        return (f"AggregateResult(method={self.method!r}, {len(self)} tensors, {n} values, "
                f"{len(self.clients)} clients)")


class _Weights:
    """Per-client raw weights: given (sequence by position, or mapping by client id) or num_examples."""

    def __init__(self, weights):
        if weights is not None and not isinstance(weights, (Mapping, Sequence, np.ndarray)):
            raise TypeError(f"weights must be a sequence or a mapping of client ids, got {type(weights).__name__}")
        self.given = weights
        self.seen = 0

    def __call__(self, client) -> float:
        w = self.given
        self.seen += 1
        if w is None:
            return num_examples(client.metadata, client.cid)
        if isinstance(w, Mapping):
            if client.cid not in w:
                raise AggregationError(f"{client_label(client.cid)}: no weight given for it", client=client.cid)
            v = w[client.cid]
        else:
            if client.position >= len(w):
                raise AggregationError(f"{len(w)} weights given for more payloads", client=client.cid)
            v = w[client.position]
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise AggregationError(f"{client_label(client.cid)}: weight {v!r} is not a number",
                                   client=client.cid) from None
        if not (math.isfinite(v) and v >= 0):
            raise AggregationError(f"{client_label(client.cid)}: weight {v} must be finite and >= 0",
                                   client=client.cid)
        return v

    def check_count(self) -> None:
        w = self.given
        if w is not None and not isinstance(w, Mapping) and len(w) != self.seen:
            raise AggregationError(f"{len(w)} weights given for {self.seen} payloads")


def _round_meta(clients_meta: list) -> object:
    rounds = sorted({m["round"] for m in clients_meta if isinstance(m.get("round"), int)})
    return rounds[0] if len(rounds) == 1 else (rounds or None)


def _summary(method, ids, metas, raw_weights) -> dict:
    meta = {"method": method, "num_clients": len(ids)}
    r = _round_meta(metas)
    if r is not None:
        meta["round"] = r
    n = [m.get("num_examples") for m in metas]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in n):
        meta["num_examples"] = sum(n)
    return meta


def aggregate(
    payloads: Iterable,
    *,
    weights=None,
    method: str = "headwise",
    base: Mapping | None = None,
    clip_norm: float | None = None,
    trim: float = 0.1,
    shared=None,
    branch_weights: Mapping | None = None,
    layer_map: Mapping | None = None,
    depths: Mapping | None = None,
    target_depth: int | None = None,
    inner: str = "headwise",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    batch: int | None = None,
) -> AggregateResult:
    """Aggregate packed client updates (bytes from fedsparse.pack, or PackedUpdate) in one pass.

    method:
        "fedavg"      θ = Σ_k w_k θ_k / Σ_k w_k; what a client did not send counts as base (0 without base).
        "headwise"    per head h: Σ_k m_kh s_kh w_k θ_kh / Σ_k m_kh s_kh w_k (m: the client sent head h,
                      s: metadata head_scores, default 1); a head no client sent keeps base (0 without).
                      Per element for top-k tensors, per tensor for dense ones.
        "median", "trimmed_mean"   coordinate-wise over the clients that sent each coordinate (unweighted;
                      trim: the fraction cut at each end).
        "hetlora", "flora", "flexlora"   heterogeneous LoRA ranks; result.per_client[cid] has the update of
                      the client's own rank (see hetero.py).
        "multibranch" HeteroTune / FedAdapter: metadata "branch" picks the branch; branch-local tensors are
                      aggregated within it (with `inner`: "headwise" or "fedavg"), shared tensors (`shared`: a
                      regex, list of regexes or predicate on names; default names with a "shared" path
                      component) across branches with branch_weights (default: the branches' total weight),
                      layers matched as l -> floor(l L' / L) (depths: branch -> L, else metadata num_layers, else
                      inferred; target_depth L', default the deepest) or by layer_map (branch -> {l: l'} or a
                      callable). base: branch -> mapping.
    weights: per payload (sequence) or per client id (mapping); default metadata num_examples (else 1).
        Normalised: any positive scaling gives the same result.
    base: the previous global state (name -> array), for what nobody sent. Never modified.
    clip_norm: scale each client's update to L2 norm <= clip_norm first.
    batch: about how many parsed payloads the native kernel folds in per call (it blocks the output across
        them, so it stays in cache; each call costs ~0.3 ms more); a list of n is cut into round(n / batch)
        batches of equal size (the last may be smaller). From an iterator, one batch of payloads is held at a
        time. Default: 128 for a sequence (its payloads are in memory already), 32 from an iterator.
    max_elements: per-payload cap on declared tensor elements (fedsparse.unpack's).

    Errors (nothing is returned, nothing given is modified): no payloads, different format versions,
    tensors whose names or shapes differ, bad weights or metadata -> AggregationError; malformed payloads
    (including NaN/Inf values) -> fedsparse.PayloadError. Both name the client (client_id, else #position)
    and, where one is at fault, the tensor.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if inner not in ("headwise", "fedavg"):
        raise ValueError(f"inner must be 'headwise' or 'fedavg', got {inner!r}")
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be None or an integer >= 1, got {batch!r}")
    if isinstance(payloads, (bytes, bytearray, memoryview)):
        raise TypeError("payloads must be an iterable of payloads, not a single payload")
    batch = _even_batch(payloads, batch)
    wfn = _Weights(weights)
    ids, metas, raw = [], [], []
    seen = set()
    # fedavg and headwise check the CRCs in the kernel's pass over the payloads, not in a pass of their own
    lazy_crc = method in ("fedavg", "headwise") and _backend.native is not None
    reading = [0, [], -1]  # the chunk being read (start, buffers) and the position reached in it

    def clients():
        for start, bufs, parsed in _parsed_chunks(payloads, batch, max_elements, not lazy_crc):
            reading[:2] = start, bufs
            for i in range(len(bufs)):
                reading[2] = start + i
                c = client_from(bufs[i], parsed.get(i), start + i, max_elements)
                if c.cid in seen:
                    raise AggregationError(f"{client_label(c.cid)} appears twice", client=c.cid)
                seen.add(c.cid)
                w = wfn(c)
                ids.append(c.cid)
                metas.append(c.metadata)
                raw.append(w)
                yield c, w

    if method in ("median", "trimmed_mean"):
        cl = list(clients())
        _finish_weights(wfn, ids, raw)
        scales = [clip_factor(acc_probe(c), clip_norm) if clip_norm else 1.0 for c, _ in cl]
        acc, head_counts = robust_aggregate([c for c, _ in cl], method, trim=trim, base=base, scales=scales)
        tensors = {n: acc.acc[acc.tensors[n].acc_off:acc.tensors[n].acc_off + acc.tensors[n].numel]
                   .reshape(acc.tensors[n].shape) for n in acc.order}
        return AggregateResult(tensors, method=method, clients=ids, weights=_normalised(ids, raw),
                               head_counts=head_counts, metadata=_summary(method, ids, metas, raw), dtypes=acc.dtypes())

    if method in HETERO_METHODS:
        h = HeteroAccumulator(method)
        for c, w in clients():
            h.add(c, w, clip_factor(acc_probe(c), clip_norm) if clip_norm else 1.0)
        _finish_weights(wfn, ids, raw)
        glob, per = h.finish()
        return AggregateResult(glob, method=method, clients=ids, weights=_normalised(ids, raw),
                               metadata=_summary(method, ids, metas, raw), dtypes=h.dtypes, per_client=per)

    if method == "multibranch":
        return _multibranch(clients(), wfn, ids, metas, raw, base=base, clip_norm=clip_norm, shared=shared,
                            branch_weights=branch_weights, layer_map=layer_map, depths=depths,
                            target_depth=target_depth, inner=inner, batch=batch)

    acc = Accumulator(track_sums=method == "headwise" or base is not None, use_scores=method == "headwise",
                      batch=batch, clip_norm=clip_norm, check_crc=lazy_crc)
    try:
        for c, w in clients():
            if acc.acc is None and base is not None:
                acc._start(c)
                acc.check_base(base)
            acc.add(c, w)
        _finish_weights(wfn, ids, raw)
        tensors, _, head_counts, head_weights = acc.finish(method, base)
    except (PayloadError, AggregationError):
        # The batches before this chunk were folded in, so their CRCs matched: the first corrupt payload of this
        # chunk up to the one being read (the batch flushed with it ends there) comes first, as with the CRC first.
        corrupt = _first_corrupt(*reading, max_elements) if lazy_crc else None
        if corrupt is not None:
            raise corrupt from None
        raise
    return AggregateResult(tensors, method=method, clients=ids, weights=_normalised(ids, raw),
                           head_counts=head_counts, head_weights=head_weights,
                           metadata=_summary(method, ids, metas, raw), dtypes=acc.dtypes())


def _chunks(items: Iterable, n: int):
    """(position of the first, list of up to n items) over any iterable, holding one chunk at a time."""
    it = iter(items)
    start = 0
    while chunk := list(itertools.islice(it, n)):
        yield start, chunk
        start += len(chunk)


SEQUENCE_BATCH, ITERATOR_BATCH = 128, 32


def _even_batch(payloads, batch: int | None) -> int:
    """With a known count n, ceil(n / k) for k = round(n / batch) batches: no batch of a few payloads at the
    end (each kernel call costs a fixed ~0.3 ms). 100 payloads at 32 -> 34 (34 + 34 + 32): 11.8-13.1 ms against
    13.9-15.4 ms for 32 + 32 + 32 + 4 (measured when batches still overlapped on helper threads); at the
    default 128 for a list, one batch of 100: 7.7-7.9 ms against 8.3-8.6 ms for 34 + 34 + 32."""
    try:
        n = len(payloads)
    except TypeError:  # an iterator: as asked
        return ITERATOR_BATCH if batch is None else batch
    batch = SEQUENCE_BATCH if batch is None else batch
    return -(-n // max(1, round(n / batch))) if n else batch


def _parsed_chunks(payloads: Iterable, n: int, max_elements: int, crc: bool = True):
    """(start, buffers, parsed) per chunk of _chunks, for client_from: each chunk parsed (native, in parallel,
    without the GIL) when the one before it has been folded in. crc=False: not its CRC (the kernel checks it)."""
    for start, chunk in _chunks(payloads, n):
        yield (start,) + verify_chunk(chunk, start, max_elements, crc)


def _first_corrupt(start: int, bufs: list, upto: int, max_elements: int):
    """PayloadError for the first of bufs (positions start.. upto) whose CRC does not match, else None: with the
    CRC checked late (by the kernel), an error of a later stage must not hide an earlier payload's corruption,
    nor its own (a flipped bit in a tensor name reads as a missing tensor)."""
    native = _backend.native
    for i, buf in enumerate(bufs[:upto - start + 1]):
        if not isinstance(buf, (bytes, memoryview)):
            continue
        try:
            native.parse_payload(buf, max_elements, verify=True, compact=True)
        except ValueError as exc:
            if str(exc).startswith("CRC mismatch"):
                return PayloadError(f"client #{start + i}: {exc}")
    return None


def acc_probe(c) -> float:
    """||update||^2 of one client, with no accumulator."""
    return Accumulator(track_sums=False, use_scores=False).sum_squares(c)


def _finish_weights(wfn, ids, raw) -> None:
    if not ids:
        raise AggregationError("aggregate() needs at least one payload")
    wfn.check_count()
    if sum(raw) <= 0:
        raise AggregationError("the clients' weights sum to 0")


def _normalised(ids, raw) -> dict:
    total = float(sum(raw))
    return {cid: w / total for cid, w in zip(ids, raw)}


def _multibranch(clients, wfn, ids, metas, raw, *, base, clip_norm, shared, branch_weights, layer_map, depths,
                 target_depth, inner, batch) -> AggregateResult:
    is_shared = is_shared_fn(shared)
    accs: dict = {}
    members: dict = {}
    declared: dict = {}
    for c, w in clients:
        br = branch_of(c.metadata, c.cid)
        acc = accs.get(br)
        if acc is None:
            acc = accs[br] = Accumulator(track_sums=True, use_scores=inner == "headwise", label=f" in branch {br!r}",
                                         batch=batch, clip_norm=clip_norm)
        if "num_layers" in c.metadata:
            L = c.metadata["num_layers"]
            if declared.setdefault(br, L) != L:
                raise AggregationError(f"{client_label(c.cid)}: num_layers {L} differs from {declared[br]} of its "
                                       f"branch {br!r}", client=c.cid)
        acc.add(c, w)
        members.setdefault(br, []).append((c.cid, w))
    _finish_weights(wfn, ids, raw)
    if branch_weights is not None:
        missing = [b for b in accs if b not in branch_weights]
        if missing:
            raise AggregationError(f"branch_weights has no weight for branch {missing[0]!r}")
    for br, acc in accs.items():
        acc.check_base(None if base is None else base.get(br))

    results = {}
    for br, acc in accs.items():
        results[br] = acc.finish(inner, None if base is None else base.get(br), want_covered=True)
    depth = {}
    for br, acc in accs.items():
        if depths is not None and br in depths:
            depth[br] = int(depths[br])
        elif br in declared:
            depth[br] = int(declared[br])
        else:
            depth[br] = 1 + max((layer_index(n) for n in acc.order if is_shared(n) and layer_index(n) is not None),
                                default=0)
    tdepth = target_depth or max(depth.values())
    beta = {br: float(branch_weights[br]) if branch_weights is not None else float(sum(w for _, w in members[br]))
            for br in accs}
    num, den, gname, gshape, gfrom = {}, {}, {}, {}, {}
    for br, acc in accs.items():
        mp = layer_mapper(br, depth[br], tdepth, layer_map)
        tensors, covered, _, _ = results[br]
        for n in acc.order:
            if not is_shared(n):
                continue
            li = layer_index(n)
            g = n if li is None else replace_layer(n, int(mp(li)))
            shape = tensors[n].shape
            if gshape.setdefault(g, shape) != shape:
                raise AggregationError(f"branch {br!r}, tensor {n!r}: shared tensor maps to {g!r} with shape {shape}, "
                                       f"but branch {gfrom[g]!r} gives it shape {gshape[g]}", tensor=n)
            gfrom.setdefault(g, br)
            gname[(br, n)] = g
            c = covered[n].astype(np.float64) * beta[br]
            num[g] = num.get(g, 0) + c * tensors[n].reshape(-1)
            den[g] = den.get(g, 0) + c
    glob = {}
    for g in num:
        with np.errstate(invalid="ignore", divide="ignore"):
            glob[g] = np.where(den[g] > 0, num[g] / np.where(den[g] > 0, den[g], 1), 0).astype(np.float32)
    branches, client_branch = {}, {}
    for br, acc in accs.items():
        tensors, covered, counts, hw = results[br]
        bbase = None if base is None else base.get(br)
        for n in acc.order:
            if (br, n) in gname:
                g = gname[(br, n)]
                own = tensors[n].reshape(-1)
                b = np.asarray(bbase[n], np.float32).reshape(-1) if bbase is not None and n in bbase else 0
                own[:] = np.where(den[g] > 0, glob[g], b)
        bids = [cid for cid, _ in members[br]]
        braw = [w for _, w in members[br]]
        bmetas = [m for m, cid in zip(metas, ids) if cid in set(bids)]
        branches[br] = AggregateResult(tensors, method=inner, clients=bids, weights=_normalised(bids, braw),
                                       head_counts=counts, head_weights=hw,
                                       metadata={**_summary(inner, bids, bmetas, braw), "branch": br},
                                       dtypes=acc.dtypes())
        for cid in bids:
            client_branch[cid] = br
    glob = {g: v.reshape(gshape[g]) for g, v in glob.items()}
    meta = _summary("multibranch", ids, metas, raw)
    meta["branches"] = sorted(accs)
    return AggregateResult(glob, method="multibranch", clients=ids, weights=_normalised(ids, raw), metadata=meta,
                           branches=branches, client_branch=client_branch)

"""The streaming accumulator behind aggregate(): one payload at a time into float32 accumulators.

A payload is parsed (bounds, CRC), checked against the tensors seen so far, and handed to the native
kernel _C.accumulate with a plan (one int64 row per tensor: where its bytes are, where its values go),
which adds w * dequantize(values) at the right places and w to per-head weight sums. Nothing of a
client's dense update is ever materialised, so memory is the output plus small per-head sums.

Weight-sum granularity per tensor ("units") is the coarsest that every client so far allows: one sum for
a tensor all clients sent dense, one per head when some client sent it head-sparse (a dense entry then
counts as every head kept), one per element once some client sent it element-sparse (top-k). A payload
that needs a finer granularity upgrades the sums by broadcasting them.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _backend
from ..errors import PayloadError
from ..sparsity import KIND_DENSE, KIND_ELEMENTS, KIND_HEAD_COLS, KIND_HEAD_ROWS, matrix_view, unpack_bitmap
from ..unpack import decode_entry, entries_from_native, parse_layout, read_metadata
from ..wire import DEFAULT_MAX_ELEMENTS, Layout
from .meta import AggregationError, client_id, client_label, head_scores

# Plan columns (csrc/aggregate.cpp).
(C_KIND, C_ROWS, C_COLS, C_HEADS, C_MASK, C_KEPT, C_BITS, C_DATA, C_NBYTES, C_ACC, C_W, C_WSUM,
 C_MODE) = range(13)
N_COLS = 13
PER_TENSOR, PER_HEAD, PER_ELEMENT = 0, 1, 2
_HEAD_KINDS = (KIND_HEAD_ROWS, KIND_HEAD_COLS)


_SPAN = slice(C_MASK, C_NBYTES + 1)  # the columns of Client.spans: mask_offset .. data_nbytes, in order


class Client:
    """One verified payload: buffer, metadata, id, position; version and group_size; `table`, the bytes of its
    tensor table (names, order, dtypes, kinds, head counts, shapes: equal tables mean one plan) and `spans`,
    int64 [n_entries, 5] of (mask_offset, n_kept, bits, data_offset, data_nbytes). `layout` and `tensors`
    (Entry objects) are built on first use: a server that has seen the table before never needs them."""

    __slots__ = ("buffer", "metadata", "cid", "position", "version", "group_size", "table", "spans", "_layout",
                 "_max_elements")

    def __init__(self, buffer, version, group_size, table, spans, layout, max_elements):
        self.buffer, self.version, self.group_size, self.table, self.spans = buffer, version, group_size, table, spans
        self._layout, self._max_elements = layout, max_elements
        self.metadata, self.cid, self.position = {}, None, 0

    @classmethod
    def from_layout(cls, buffer, layout, max_elements) -> "Client":
        start = layout.meta_offset + layout.meta_len
        end = layout.entries[0].mask_offset if layout.entries else start
        spans = np.array([(e.mask_offset, e.n_kept, e.bits, e.data_offset, e.data_nbytes) for e in layout.entries],
                         np.int64).reshape(-1, 5)
        return cls(buffer, layout.version, layout.group_size, bytes(memoryview(buffer)[start:end]), spans, layout,
                   max_elements)

    @property
    def layout(self):
        if self._layout is None:  # verified when read: re-read the table only (no CRC, no value checks)
            version, gs, mo, ml, raw = _backend.native.parse_payload(self.buffer, self._max_elements, verify=False)
            self._layout = Layout(version, gs, mo, ml, entries_from_native(raw))
            _check_names(self._layout, self.cid)
        return self._layout

    @property
    def tensors(self) -> list:
        return [e for e in self.layout.entries if not e.is_meta]


def _check_names(layout, cid) -> None:
    names = [e.name for e in layout.entries]
    if len(set(names)) != len(names):
        raise PayloadError(f"{client_label(cid)}: duplicate tensor names in payload")


def read_client(payload, position: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Client:
    """Parse and verify one payload (bytes-like or a PackedUpdate); errors name the client."""
    return read_clients([payload], position, max_elements)[0]


def read_clients(payloads, start: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> list:
    """read_client of payloads at positions start, start + 1, ...; the native parser verifies the raw ones in
    parallel. The first bad payload (in order) raises."""
    return clients_from(*verify_chunk(payloads, start, max_elements), start, max_elements)


def verify_chunk(payloads, start: int, max_elements: int = DEFAULT_MAX_ELEMENTS, crc: bool = True) -> tuple:
    """The native half of read_clients (type checks, then CRC and structure, without the GIL for the bulk):
    -> (buffers, {index: parsed or error text}) for clients_from. Safe to run on another thread. crc=False:
    everything but the CRC, which the caller then checks (Accumulator(check_crc=True))."""
    native = _backend.native
    raw = []
    for i, p in enumerate(payloads):
        if not (getattr(p, "layout", None) is not None and hasattr(p, "buffer")):
            if not isinstance(p, (bytes, bytearray, memoryview)):
                raise PayloadError(f"client #{start + i}: payload must be bytes-like or a PackedUpdate, got "
                                   f"{type(p).__name__}")
            raw.append(i)
    bufs = [bytes(p) if isinstance(p, bytearray) else p for p in payloads]
    parsed = dict(zip(raw, native.parse_payloads([bufs[i] for i in raw], max_elements, crc))) if native and raw else {}
    return bufs, parsed


def clients_from(bufs, parsed, start: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> list:
    """The Python half of read_clients: metadata and ids; raises for the first bad payload."""
    return [client_from(bufs[i], parsed.get(i), start + i, max_elements) for i in range(len(bufs))]


def client_from(payload, parsed, position: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Client:
    """One payload's Python half: its buffer and verify_chunk's result for it (None: a PackedUpdate, or no
    native module) -> Client; errors name it by position."""
    try:
        if parsed is None:
            if hasattr(payload, "layout"):  # a PackedUpdate: already parsed
                layout, buf = payload.layout, payload.buffer
            else:  # no native module
                layout, buf = parse_layout(payload, max_elements), payload
            client = Client.from_layout(buf, layout, max_elements)
            meta_entries = [e for e in layout.entries if e.is_meta]
        else:
            if isinstance(parsed, str):
                raise PayloadError(parsed)
            version, gs, mo, ml, table_end, spans, metas = parsed
            meta_entries = entries_from_native([t for _, t in metas])
            layout = Layout(version, gs, mo, ml, None)  # entries read on demand
            client = Client(payload, version, gs, bytes(memoryview(payload)[mo + ml:table_end]), spans, None,
                            max_elements)
        client.metadata = read_metadata(client.buffer, layout, meta_entries)
    except PayloadError as exc:
        raise PayloadError(f"client #{position}: {exc}") from None
    client.position = position
    client.cid = client_id(client.metadata, position)
    if client._layout is not None:
        _check_names(client._layout, client.cid)
    return client


def clip_factor(sumsq: float, clip_norm: float) -> float:
    """Norm clipping: min(1, clip_norm / ||x||) from ||x||^2, 1 for a zero update (csrc clip_factor too)."""
    norm = math.sqrt(sumsq)
    return min(1.0, clip_norm / norm) if norm > 0 else 1.0


class _Tensor:
    """Where one tensor's accumulator lives and how its weight sums are kept."""

    __slots__ = ("name", "shape", "numel", "acc_off", "mode", "hkind", "H", "wsum_off", "n_units", "dtype")

    def __init__(self, entry, acc_off):
        self.name, self.shape, self.dtype = entry.name, tuple(entry.shape), entry.dtype
        self.numel = math.prod(self.shape)
        self.acc_off = acc_off
        self.mode, self.hkind, self.H = PER_TENSOR, KIND_DENSE, 0
        self.wsum_off, self.n_units = 0, 1
        self.want(entry)

    def copy(self) -> "_Tensor":
        t = _Tensor.__new__(_Tensor)
        for name in _Tensor.__slots__:
            setattr(t, name, getattr(self, name))
        return t

    def want(self, e) -> bool:
        """Upgrade the granularity so entry e fits; True if it changed."""
        if e.kind == KIND_DENSE or self.mode == PER_ELEMENT:
            return False
        if e.kind == KIND_ELEMENTS or (self.mode == PER_HEAD and (e.kind, e.n_heads) != (self.hkind, self.H)):
            self.mode = PER_ELEMENT
            return True
        if self.mode == PER_TENSOR:
            self.mode, self.hkind, self.H = PER_HEAD, e.kind, e.n_heads
            return True
        return False

    def units(self) -> int:
        return {PER_TENSOR: 1, PER_HEAD: self.H, PER_ELEMENT: self.numel}[self.mode]

    def expand(self, v: np.ndarray, mode=None, hkind=None, H=None) -> np.ndarray:
        """Per-unit values (in granularity `mode`, default this tensor's) broadcast to a per-element array of
        the matrix view of the head kind (or flat)."""
        mode = self.mode if mode is None else mode
        hkind = self.hkind if hkind is None else hkind
        H = self.H if H is None else H
        if mode == PER_ELEMENT:
            return v.reshape(-1)
        if mode == PER_TENSOR:
            return np.full(self.numel, v[0], dtype=v.dtype)
        r, c = matrix_view(self.shape, hkind)
        if hkind == KIND_HEAD_ROWS:
            return np.broadcast_to(v.reshape(H, 1), (H, r // H * c)).reshape(-1)
        return np.broadcast_to(v.reshape(1, H, 1), (r, H, c // H)).reshape(-1)


# What an accumulator builds from its first client, by (tensor table, track_sums): its tensors (offsets,
# granularities) and that table's plan with its head-score index. Every accumulator that starts from the same
# table builds the same, so a server aggregating round after round builds them once (~1 ms for 80 tensors).
# The oldest goes when full.
_STARTS: dict = {}
_MAX_STARTS = 32


class Accumulator:
    """Accumulates clients of one structure (every client must send the same tensor names and shapes).

    track_sums: keep per-unit weight sums (needed by headwise, and by fedavg with a base).
    use_scores: weight heads by the clients' head_scores metadata (headwise).
    clip_norm: scale each client's update to L2 norm <= clip_norm (the kernel takes the norms, in parallel,
        from the values it is about to add).
    check_crc: the clients were read with verify_chunk(crc=False); the kernel checks their CRCs as it adds them.
    """

    def __init__(self, *, track_sums: bool, use_scores: bool, label: str = "", batch: int = 32,
                 clip_norm: float | None = None, check_crc: bool = False):
        self.track, self.use_scores, self.label = track_sums, use_scores, label
        self.check_crc = check_crc
        self.clip_norm = clip_norm
        self.batch = max(1, int(batch))
        self._pending: list = []
        self.tensors: dict = {}
        self.order: list = []
        self.acc = None
        self.wsum = np.zeros(0, np.float32)
        self.counts = np.zeros(0, np.float32)
        self.total_weight = 0.0
        self.n_clients = 0
        self.version = None
        self.first_cid = None
        self._plans: dict = {}
        self._unit_rows = None  # _normalise's rows for the current granularities

    # -- structure --------------------------------------------------------------------------------------
    def _start(self, client: Client) -> None:
        self.version = client.version
        self.first_cid = client.cid
        key = (client.table, self.track)
        start = _STARTS.get(key)
        if start is not None:  # an accumulator that started from this table before: the same tensors and plan
            tensors, hit = start
            self.tensors = {t.name: t.copy() for t in tensors}
            self.order = list(self.tensors)
            self.acc = np.zeros(sum(t.numel for t in tensors), np.float32)
            self._relayout_sums()
            self._plans[client.table] = hit
            return
        off = 0
        for e in client.tensors:
            t = _Tensor(e, off)
            self.tensors[e.name] = t
            self.order.append(e.name)
            off += t.numel
        self.acc = np.zeros(off, np.float32)
        self._relayout_sums()
        hit = self._plan_for(client)
        if len(_STARTS) >= _MAX_STARTS:
            del _STARTS[next(iter(_STARTS))]  # the oldest
        _STARTS[key] = (tuple(self.tensors[n].copy() for n in self.order), hit)

    def _relayout_sums(self, old=None) -> None:
        """Reallocate wsum/counts for the tensors' current granularities, carrying old values over."""
        off = 0
        sizes = []
        for n in self.order:
            t = self.tensors[n]
            sizes.append((t, off))
            off += t.units() if self.track else 0
        wsum, counts = np.zeros(off, np.float32), np.zeros(off, np.float32)
        if old is not None and self.track:
            for (t, o), (mode, hkind, H, oo, nu) in zip(sizes, old):
                if nu and (mode, hkind, H) != (t.mode, t.hkind, t.H):
                    # coarse -> fine: broadcast to elements, then take this granularity (only fine targets)
                    wsum[o:o + t.units()] = t.expand(self.wsum[oo:oo + nu], mode, hkind, H)[:t.units()] \
                        if t.mode == PER_ELEMENT else np.repeat(self.wsum[oo:oo + nu], t.units())
                    counts[o:o + t.units()] = t.expand(self.counts[oo:oo + nu], mode, hkind, H)[:t.units()] \
                        if t.mode == PER_ELEMENT else np.repeat(self.counts[oo:oo + nu], t.units())
                elif nu:
                    wsum[o:o + nu] = self.wsum[oo:oo + nu]
                    counts[o:o + nu] = self.counts[oo:oo + nu]
        for t, o in sizes:
            t.wsum_off, t.n_units = o, t.units()
        self.wsum, self.counts = wsum, counts
        self._plans.clear()
        self._unit_rows = None

    def _check(self, client: Client) -> None:
        cid = client.cid
        if client.version != self.version:
            raise AggregationError(f"{client_label(cid)}: payload format version {client.version} differs "
                                   f"from version {self.version} of {client_label(self.first_cid)}", client=cid)
        seen = set()
        for e in client.tensors:
            t = self.tensors.get(e.name)
            if t is None:
                raise AggregationError(f"{client_label(cid)}, tensor {e.name!r}: not sent by "
                                       f"{client_label(self.first_cid)}{self.label}", client=cid, tensor=e.name)
            if tuple(e.shape) != t.shape:
                raise AggregationError(f"{client_label(cid)}, tensor {e.name!r}: shape {tuple(e.shape)} differs from "
                                       f"{t.shape} of {client_label(self.first_cid)}{self.label}", client=cid,
                                       tensor=e.name)
            seen.add(e.name)
        missing = [n for n in self.order if n not in seen]
        if missing:
            raise AggregationError(f"{client_label(cid)}, tensor {missing[0]!r}: missing (sent by "
                                   f"{client_label(self.first_cid)}){self.label}", client=cid, tensor=missing[0])

    def _plan_for(self, client: Client):
        """(static plan rows, weight-slot layout) for this client's entry structure; cached."""
        key = client.table
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        self._check(client)
        old = [(t.mode, t.hkind, t.H, t.wsum_off, t.n_units if self.track else 0)
               for t in (self.tensors[n] for n in self.order)]
        if any([self.tensors[e.name].want(e) for e in client.tensors]):
            self.flush()  # pending plans point at the old sums
            self._relayout_sums(old)
        rows = np.zeros((len(client.tensors), N_COLS), np.int64)
        slots = []  # per entry: (name, kind, n_heads, slot offset, n slots)
        w_off = 0
        all_kept = np.zeros(len(client.tensors), bool)
        for i, e in enumerate(client.tensors):
            t = self.tensors[e.name]
            kind, H = e.kind, e.n_heads
            if kind == KIND_DENSE and t.mode == PER_HEAD:  # dense sent: every head kept
                kind, H = t.hkind, t.H
                all_kept[i] = True
            r, c = matrix_view(t.shape, kind)
            nw = H if kind in _HEAD_KINDS else 1
            mode = t.mode if kind != KIND_DENSE else PER_TENSOR
            if t.mode == PER_ELEMENT:
                mode = PER_ELEMENT
            rows[i, [C_KIND, C_ROWS, C_COLS, C_HEADS, C_ACC, C_W, C_WSUM, C_MODE]] = (
                kind, r, c, H, t.acc_off, w_off, t.wsum_off if self.track else -1, mode)
            slots.append((e.name, kind, H, w_off, nw))
            w_off += nw
        hit = (rows, slots, w_off, np.flatnonzero(all_kept), {}, _tensor_rows(client))
        self._plans[key] = hit
        return hit

    # -- weights ----------------------------------------------------------------------------------------
    def _batch_weights(self, clients: list, weights: np.ndarray, hit) -> np.ndarray:
        """float32 [len(clients), n_slots]: each client's weight times its head scores (1 where it sent none),
        for clients of one plan; a score signature's index into the flat scores is built once and cached."""
        with np.errstate(over="ignore"):  # a weight beyond float32 is named below
            out = self._scored_weights(clients, weights, hit)
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if bad.size:
            c = clients[int(bad[0])]
            raise AggregationError(f"{client_label(c.cid)}: weight {weights[bad[0]]:g} times its head scores exceeds "
                                   f"float32", client=c.cid)
        return out

    def _scored_weights(self, clients: list, weights: np.ndarray, hit) -> np.ndarray:
        _, slots, n_slots, _, cache, _ = hit
        out = np.repeat(weights.astype(np.float32)[:, None], n_slots, 1)
        if not self.use_scores:
            return out
        by_sig: dict = {}
        for i, c in enumerate(clients):
            sig = _score_signature(c.metadata)
            if sig is not None:
                by_sig.setdefault(sig, []).append(i)
        for sig, rows in by_sig.items():
            first = clients[rows[0]]
            flat = _score_matrix([clients[i].metadata for i in rows], sig)  # the scores, then 1.0 for "no score"
            cols = cache.get(sig)
            if cols is None:
                idx = np.full(n_slots, flat.shape[1] - 1, np.int64)
                for name, kind, H, off, nw in slots:
                    if kind in _HEAD_KINDS and head_scores(first.metadata, first.cid, name, H) is not None:
                        idx[off:off + nw] = _locate(first.metadata, sig, name, H)  # validated just above
                cols = cache[sig] = np.unique(idx, return_inverse=True)  # the scores read; each slot's among them
            used, slot_of = cols
            vals = flat[:, used]  # checked and weighted once each, then spread to the slots
            ok = (vals.min(axis=1, initial=0.0) >= 0) & np.isfinite(vals.max(axis=1, initial=0.0))  # NaN fails
            for j in np.flatnonzero(~ok):  # name the client and tensor
                bad = clients[rows[j]]
                for name, kind, H, off, nw in slots:
                    if kind in _HEAD_KINDS:
                        head_scores(bad.metadata, bad.cid, name, H)
            out[rows] = (vals * weights[rows, None])[:, slot_of]
        return out

    def _batch_plans(self, batch: list) -> tuple:
        """Plans (int64 [n, 13] each) and unit weights of pending (client, cached plan, weight, scale) entries, built
        a plan at a time: the template rows with every client's spans, and _batch_weights."""
        plans, ws = [None] * len(batch), [None] * len(batch)
        by_plan: dict = {}
        for i, (_, hit, _, _) in enumerate(batch):
            by_plan.setdefault(id(hit), []).append(i)
        for rows_of in by_plan.values():
            hit = batch[rows_of[0]][1]
            rows, _, _, all_kept, _, tensor_rows = hit
            clients = [batch[i][0] for i in rows_of]
            p = np.empty((len(rows_of),) + rows.shape, np.int64)
            p[:] = rows
            p[:, :, _SPAN] = np.stack([c.spans[tensor_rows] for c in clients])
            if all_kept.size:
                p[:, all_kept, C_MASK] = -1
            w = self._batch_weights(clients, np.array([batch[i][2] for i in rows_of], np.float64), hit)
            for j, i in enumerate(rows_of):
                plans[i], ws[i] = p[j], w[j]
        return plans, ws

    # -- the hot path -----------------------------------------------------------------------------------
    def add(self, client: Client, weight: float, scale: float = 1.0) -> None:
        """acc += scale * clip_k * weight * s_kh * update_k, clip_k from clip_norm (weight sums see neither).
        With the native module, clients are folded in a batch at a time (flush); their head scores are checked
        then."""
        if self.acc is None:
            self._start(client)
        elif client.version != self.version:
            self._check(client)
        entry = (client, self._plan_for(client), float(weight), float(scale))
        if _backend.native is None:
            (plan,), (w,) = self._batch_plans([entry])
            if self.clip_norm:
                scale *= clip_factor(self.sum_squares(client), self.clip_norm)
            self._add_numpy(client, plan, w, scale)
        else:
            self._pending.append(entry)
            if len(self._pending) >= self.batch:
                self.flush()
        self.total_weight += weight
        self.n_clients += 1

    def flush(self) -> None:
        """Fold the pending payloads in: one native call (the kernel blocks the output across them, and checks
        their CRCs with check_crc). A kernel error names its client; after a CRC mismatch the sums are invalid
        (the batch was added before its CRCs were known), so the caller must discard this accumulator."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        plans, ws = self._batch_plans(batch)
        try:
            _backend.native.accumulate([c.buffer for c, *_ in batch], plans, ws, [s for *_, s in batch],
                                       [c.group_size for c, *_ in batch], self.acc, self.wsum, self.counts,
                                       float(self.clip_norm or 0.0), 2, self.check_crc)
        except ValueError as exc:  # "fedsparse: payload <index in batch>: ..."
            msg = str(exc)
            index, _, detail = msg.removeprefix("fedsparse: payload ").partition(": ")
            if not (msg.startswith("fedsparse: payload ") and index.isdigit() and int(index) < len(batch)):
                raise PayloadError(f"a client of the batch: {msg}") from None
            client = batch[int(index)][0]
            if detail.startswith("CRC mismatch"):  # worded as the parser words it
                raise PayloadError(f"client #{client.position}: {detail}") from None
            raise PayloadError(f"{client_label(client.cid)}: {msg}") from None

    def _add_numpy(self, client: Client, plan, w, scale) -> None:
        """The same as the kernel, through the reference decoder (no native module)."""
        updates = []
        for e, row in zip(client.tensors, plan):
            x = decode_entry(client.buffer, e, client.group_size).reshape(-1)
            t = self.tensors[e.name]
            kind, H = int(row[C_KIND]), int(row[C_HEADS])
            if row[C_MASK] == -1:
                units = np.ones(H if kind in _HEAD_KINDS else t.numel, bool)
            elif e.kind == KIND_DENSE:
                units = np.ones(1, bool)
            else:
                units = unpack_bitmap(memoryview(client.buffer)[e.mask_offset:e.mask_offset + -(-e.mask_nbits // 8)],
                                      e.mask_nbits)
            wu = w[row[C_W]:row[C_W] + (H if kind in _HEAD_KINDS else 1)].astype(np.float32)
            if kind in _HEAD_KINDS:
                wel = t.expand(wu, PER_HEAD, kind, H)
                sent = t.expand(units, PER_HEAD, kind, H)
            else:
                wel = np.full(t.numel, wu[0], np.float32)
                sent = units if kind == KIND_ELEMENTS else np.ones(t.numel, bool)
            updates.append((t, row, x, wel, sent, units, wu))
        for t, row, x, wel, sent, units, wu in updates:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is named by finish, as the kernel's
                self.acc[t.acc_off:t.acc_off + t.numel] += np.where(sent, x * (wel * np.float32(scale)), 0)
            if row[C_WSUM] < 0:
                continue
            o = int(row[C_WSUM])
            mode = int(row[C_MODE])
            if mode == PER_TENSOR:
                self.wsum[o] += wu[0]
                self.counts[o] += 1
            elif mode == PER_HEAD:
                self.wsum[o:o + t.H] += np.where(units, wu, 0)
                self.counts[o:o + t.H] += units
            else:
                self.wsum[o:o + t.numel] += np.where(sent, wel, 0)
                self.counts[o:o + t.numel] += sent

    def sum_squares(self, client: Client) -> float:
        """||update||^2 of a client (norm clipping where the kernel does not take it: robust and heterogeneous-
        rank methods, which decode every tensor anyway, and the numpy fallback)."""
        native = _backend.native
        if native is not None:
            plan = np.zeros((len(client.tensors), N_COLS), np.int64)
            for i, e in enumerate(client.tensors):
                r, c = matrix_view(e.shape, e.kind)
                plan[i, [C_KIND, C_ROWS, C_COLS, C_HEADS, C_MASK, C_KEPT, C_BITS, C_DATA, C_NBYTES, C_WSUM]] = (
                    e.kind, r, c, e.n_heads, e.mask_offset, e.n_kept, e.bits, e.data_offset, e.data_nbytes, -1)
            try:
                return float(native.sum_squares(client.buffer, plan, client.group_size))
            except ValueError as exc:
                raise PayloadError(f"{client_label(client.cid)}: {exc}") from None
        return float(sum(np.square(decode_entry(client.buffer, e, client.group_size).astype(np.float64)).sum()
                         for e in client.tensors))

    # -- the end --------------------------------------------------------------------------------------
    def check_base(self, base) -> None:
        """base must have the accumulated tensors' shapes and be finite (checked before finishing)."""
        if base is None:
            return
        for n in self.order:
            if n in base:
                b = np.asarray(base[n])
                t = self.tensors[n]
                if b.size != t.numel:
                    raise AggregationError(f"base, tensor {n!r}: shape {b.shape} differs from the clients' {t.shape}",
                                           tensor=n)
                if not np.isfinite(b).all():
                    raise AggregationError(f"base, tensor {n!r}: NaN or Inf", tensor=n)

    def finish(self, method: str, base, want_covered: bool = False) -> tuple:
        """Normalise in place. Returns (tensors, covered, head_counts, head_weights), all name -> array;
        covered (only with want_covered, else empty): bool per element (flat) where some client sent the
        element with weight > 0."""
        self.flush()
        self.check_base(base)
        total = self.total_weight
        headwise = method == "headwise"
        tensors, covered, head_counts, head_weights = {}, {}, {}, {}
        if self.track:  # every tensor's sums at once; the loop below takes slices
            counts_all = np.rint(self.counts).astype(np.int32)
            share_all = self.wsum / np.float32(total)
        if headwise:  # per unit: divided by its weight sum (0 where nobody sent it)
            factors = np.divide(np.float32(1), self.wsum, out=np.zeros_like(self.wsum), where=self.wsum > 0)
        else:  # fedavg: what a client did not send counts as base (0 without base)
            factors = np.array([1 / total], np.float32)
        self._normalise(factors, headwise)
        for n in self.order:
            t = self.tensors[n]
            a = self.acc[t.acc_off:t.acc_off + t.numel]
            units = slice(t.wsum_off, t.wsum_off + t.n_units)
            if self.track and t.mode == PER_HEAD:
                head_counts[n] = counts_all[units]
                head_weights[n] = share_all[units]
            b = np.asarray(base[n], dtype=np.float32).reshape(-1) if base is not None and n in base else None
            if headwise:
                if b is not None or want_covered:
                    pos = t.expand(self.wsum[units]) > 0
                    if b is not None and not pos.all():
                        a[~pos] = b[~pos]
                    if want_covered:
                        covered[n] = pos
            else:
                if b is not None and self.track:  # exact base where nobody sent, no base where all did
                    a += b * (np.float32(1) - t.expand(self.wsum[units]) * np.float32(1 / total))
                    if not np.isfinite(a).all():
                        raise _overflow(n)
                if want_covered:
                    covered[n] = np.ones(t.numel, bool)
            tensors[n] = a.reshape(t.shape)
        return tensors, covered, head_counts, head_weights

    def _normalise(self, factors: np.ndarray, per_unit: bool) -> None:
        """per_unit: acc *= factors[wsum_off + unit] per head or tensor, and a tensor with a weight sum per element
        divided by it where it is > 0 (a reciprocal per element would save nothing and round twice); else
        acc *= factors[0]. Raises for the first tensor whose result is not finite."""
        if self._unit_rows is None:  # one row per tensor, in self.order
            self._unit_rows = np.array([(t.acc_off,) + (matrix_view(t.shape, t.hkind) if t.mode == PER_HEAD
                                                          else (1, t.numel)) + (t.H, t.mode, t.hkind, t.wsum_off)
                                        for t in (self.tensors[n] for n in self.order)], np.int64).reshape(-1, 7)
        rows, bad = self._unit_rows, []
        if not per_unit:
            rows = rows.copy()
            rows[:, 4:7:2] = (PER_TENSOR, 0)  # mode, factor offset: factors[0] everywhere
        by_unit = np.flatnonzero(rows[:, 4] != PER_ELEMENT)  # indices into self.order
        for i in np.flatnonzero(rows[:, 4] == PER_ELEMENT).tolist():
            t = self.tensors[self.order[i]]
            a, ws = self.acc[t.acc_off:t.acc_off + t.numel], self.wsum[t.wsum_off:t.wsum_off + t.numel]
            with np.errstate(over="ignore"):  # named below
                np.divide(a, ws, out=a, where=ws > 0)
            if not np.isfinite(a).all():
                bad.append(i)
                break
        native = _backend.native
        j = (native.scale_units if native is not None else scale_units_numpy)(self.acc, factors, rows[by_unit])
        if j >= 0:
            bad.append(int(by_unit[j]))
        if bad:
            raise _overflow(self.order[min(bad)])

    def dtypes(self) -> dict:
        return {n: self.tensors[n].dtype for n in self.order}


def _tensor_rows(client: Client):
    """Which rows of client.spans are tensors (not metadata): a slice when they are consecutive (the usual
    case: a view, no gather per payload), else an index array."""
    rows = [i for i, e in enumerate(client.layout.entries) if not e.is_meta]
    if not rows:
        return slice(0, 0)
    if rows[-1] - rows[0] + 1 == len(rows):  # ascending and distinct: consecutive
        return slice(rows[0], rows[-1] + 1)
    return np.array(rows, np.int64)


def scale_units_numpy(acc: np.ndarray, factors: np.ndarray, rows: np.ndarray) -> int:
    """_C.scale_units in numpy: acc (float32 [n]) *= factors (float32) per head or tensor; rows int64 [k, 7] of
    (acc_offset, rows, cols, n_heads, mode 0 tensor / 1 head, head kind, factor_offset). Returns the first row
    left with a value that is not finite, else -1."""
    bad = -1
    for i, (off, r, c, h, mode, hkind, f0) in enumerate(rows.tolist()):
        a = acc[off:off + r * c]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the return value
            if mode == PER_TENSOR:
                a *= factors[f0]
            elif hkind == KIND_HEAD_ROWS:  # per-head multiply without a full-size temporary
                a.reshape(h, -1)[...] *= factors[f0:f0 + h, None]
            else:
                a.reshape(r, h, c // h)[...] *= factors[f0:f0 + h, None]
        if bad < 0 and not np.isfinite(a).all():
            bad = i
    return bad


def _overflow(name: str) -> AggregationError:
    return AggregationError(f"tensor {name!r}: the aggregate overflowed float32 (weights or values too large)",
                            tensor=name)


# -- head scores: a flat vector per client plus a cached index, so the per-payload cost is one gather --------

def _score_signature(meta: dict):
    mods = tuple(sorted(k for k in meta if k.startswith("head_scores/")))
    hs = meta.get("head_scores")
    if hs is None:
        main = None
    elif isinstance(hs, dict):
        lengths = tuple(len(v) if hasattr(v, "__len__") else -1 for _, v in sorted(hs.items()))
        main = ("dict", tuple(sorted(hs)), lengths)
    else:
        arr = np.asarray(hs)
        main = ("array", arr.shape)
    if not mods and main is None:
        return None
    return (mods, tuple(np.asarray(meta[k]).size for k in mods), main)


def _score_flat(meta: dict, sig) -> np.ndarray:
    """Every score of the metadata in one float64 vector (in _locate's order), then a trailing 1.0."""
    mods, _, main = sig
    parts = [np.asarray(meta[k], dtype=np.float64).reshape(-1) for k in mods]
    hs = meta.get("head_scores")
    if main is not None and main[0] == "dict":
        parts += [np.asarray(hs[k], dtype=np.float64).reshape(-1) for k in main[1]]
    elif main is not None:
        parts.append(np.asarray(hs, dtype=np.float64).reshape(-1))
    try:
        return np.concatenate(parts + [_ONE])
    except (TypeError, ValueError):
        return np.append(np.full(sum(p.size for p in parts), np.nan), 1.0)


_ONE = np.ones(1)


def _score_matrix(metas: list, sig) -> np.ndarray:
    """float64 [len(metas), n]: _score_flat of each metadata (all of signature sig), one row each; the usual form
    (one head_scores array each) in one stack."""
    mods, _, main = sig
    if not mods and main[0] == "array":
        try:
            scores = np.stack([np.asarray(m["head_scores"]) for m in metas]).reshape(len(metas), -1)
            out = np.ones((len(metas), scores.shape[1] + 1))
            out[:, :-1] = scores
            return out
        except (TypeError, ValueError):  # not numbers: _score_flat gives NaN, which the caller names
            pass
    return np.stack([_score_flat(m, sig) for m in metas])


def _locate(meta: dict, sig, name: str, H: int) -> np.ndarray:
    """Indices into _score_flat of the H scores head_scores(meta, name) resolves to (same precedence)."""
    mods, sizes, main = sig
    from .meta import _prefix_match, layer_index
    offs = np.cumsum((0,) + sizes)
    key = _prefix_match([k[len("head_scores/"):] for k in mods], name)
    if key is not None:
        i = mods.index("head_scores/" + key)
        return np.arange(offs[i], offs[i] + H)
    base = int(offs[-1])
    if main[0] == "dict":
        key = _prefix_match(list(main[1]), name)
        i = main[1].index(key)
        start = base + sum(main[2][:i])
        return np.arange(start, start + H)
    shape = main[1]
    if len(shape) == 1:
        return np.arange(base, base + H)
    layer = layer_index(name)
    return np.arange(base + layer * shape[1], base + layer * shape[1] + H)

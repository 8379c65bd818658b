"""The numpy reference of every aggregation rule: readable, slow, the spec the streaming path must match.

Each function takes decoded client updates (ClientUpdate: dense float32 arrays with zeros where nothing
travelled, plus the mask bits that say what travelled) and returns name -> float32 array. Weights are
normalised here, so any positive scaling of them gives the same result. See docs/aggregation.md.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..sparsity import KIND_DENSE, KIND_HEAD_COLS, KIND_HEAD_ROWS, element_mask, matrix_view
from .meta import (AggregationError, branch_of, client_id, client_label, head_scores, layer_index, num_examples,
                   replace_layer)

_LORA_A = re.compile(r"(^|\.)lora_A(\.|$)")
DEFAULT_SHARED = r"(^|\.)shared(_[A-Za-z0-9]+)?(\.|$)"


@dataclass
class ClientUpdate:
    """One client's decoded update.

    tensors: name -> float32 array of the full shape, zeros where nothing travelled.
    masks: name -> bool mask bits of a sparse tensor (head kinds: [H]; element kind: [numel]).
    kinds: name -> sparsity kind (fedsparse.sparsity.KIND_*); a name absent from kinds is dense.
    metadata: the payload metadata (docs/aggregation.md).
    """

    tensors: dict
    masks: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_packed(cls, packed) -> "ClientUpdate":
        """From a fedsparse.PackedUpdate (fedsparse.unpack(payload))."""
        kinds, masks = {}, {}
        for name in packed:
            e = packed.entry(name)
            if e.kind != KIND_DENSE:
                kinds[name] = e.kind
        masks.update(packed.head_masks)
        masks.update(packed.element_masks)
        return cls({n: packed[n] for n in packed}, masks, kinds, dict(packed.metadata))

    def sent(self, name: str) -> np.ndarray:
        """bool array of the tensor's shape: which elements travelled."""
        x = self.tensors[name]
        kind = self.kinds.get(name, KIND_DENSE)
        return element_mask(x.shape, kind, self.masks.get(name)).reshape(x.shape)

    def scores(self, name: str, cid) -> np.ndarray:
        """float64 array of the tensor's shape: the head score s_kh of each element's head (1 if none)."""
        x = self.tensors[name]
        kind = self.kinds.get(name, KIND_DENSE)
        if kind not in (KIND_HEAD_ROWS, KIND_HEAD_COLS):
            return np.ones(x.shape)
        n_heads = len(self.masks[name])
        s = head_scores(self.metadata, cid, name, n_heads)
        if s is None:
            return np.ones(x.shape)
        r, c = matrix_view(x.shape, kind)
        if kind == KIND_HEAD_ROWS:
            full = np.repeat(s, r // n_heads)[:, None].repeat(c, axis=1)
        else:
            full = np.repeat(s, c // n_heads)[None, :].repeat(r, axis=0)
        return full.reshape(x.shape)


def _ids(updates) -> list:
    return [client_id(u.metadata, i) for i, u in enumerate(updates)]


def client_weights(updates, weights=None) -> np.ndarray:
    """float64[K]: the clients' weights normalised to sum 1 (default: num_examples)."""
    ids = _ids(updates)
    if weights is None:
        raw = np.array([num_examples(u.metadata, cid) for u, cid in zip(updates, ids)])
    else:
        if isinstance(weights, Mapping):
            raw = np.array([float(weights[cid]) for cid in ids])
        else:
            raw = np.asarray(weights, dtype=np.float64).reshape(-1)
        if not (np.isfinite(raw).all() and (raw >= 0).all() and raw.sum() > 0):
            raise AggregationError("weights must be finite, >= 0 and not all 0")
    return raw / raw.sum()


def _check_same(updates) -> list:
    names = list(updates[0].tensors)
    ids = _ids(updates)
    for u, cid in zip(updates, ids):
        if sorted(u.tensors) != sorted(names):
            raise AggregationError(f"{client_label(cid)}: tensor names differ from {client_label(ids[0])}",
                                   client=cid)
        for n in names:
            if u.tensors[n].shape != updates[0].tensors[n].shape:
                raise AggregationError(f"{client_label(cid)}, tensor {n!r}: shape {u.tensors[n].shape} differs "
                                       f"from {updates[0].tensors[n].shape}", client=cid, tensor=n)
            if not np.isfinite(u.tensors[n]).all():
                raise AggregationError(f"{client_label(cid)}, tensor {n!r}: NaN or Inf in the update",
                                       client=cid, tensor=n)
    return names


def _base(base, name, shape) -> np.ndarray:
    if base is None or name not in base:
        return np.zeros(shape)
    return np.asarray(base[name], dtype=np.float64).reshape(shape)


def clip(updates, max_norm: float) -> list:
    """Each update scaled by min(1, max_norm / ||update||_2) (the norm over every transmitted value)."""
    out = []
    for u in updates:
        norm = np.sqrt(sum(float(np.square(x.astype(np.float64)).sum()) for x in u.tensors.values()))
        f = min(1.0, max_norm / norm) if norm > 0 else 1.0
        out.append(ClientUpdate({n: (x * f).astype(np.float32) for n, x in u.tensors.items()}, u.masks, u.kinds,
                                u.metadata))
    return out


def fedavg(updates, weights=None, base=None) -> dict:
    """θ = Σ_k w_k θ_k, where θ_k takes base's value (0 without base) for what client k did not send."""
    names = _check_same(updates)
    w = client_weights(updates, weights)
    out = {}
    for n in names:
        shape = updates[0].tensors[n].shape
        b = _base(base, n, shape)
        acc = np.zeros(shape)
        for wk, u in zip(w, updates):
            acc += wk * np.where(u.sent(n), u.tensors[n], b)
        out[n] = acc.astype(np.float32)
    return out


def headwise(updates, weights=None, base=None) -> dict:
    """θ_h = Σ_k m_kh s_kh n_k θ_kh / Σ_k m_kh s_kh n_k per head (per element for element masks, per tensor
    for dense tensors); what no client sent (or only with weight 0) keeps base (0 without base)."""
    names = _check_same(updates)
    w = client_weights(updates, weights)
    ids = _ids(updates)
    out = {}
    for n in names:
        shape = updates[0].tensors[n].shape
        num, den = np.zeros(shape), np.zeros(shape)
        for wk, u, cid in zip(w, updates, ids):
            wel = wk * u.scores(n, cid) * u.sent(n)
            num += wel * u.tensors[n]
            den += wel
        with np.errstate(invalid="ignore", divide="ignore"):
            out[n] = np.where(den > 0, num / np.where(den > 0, den, 1), _base(base, n, shape)).astype(np.float32)
    return out


def _stack_sent(updates, n):
    vals = np.stack([np.where(u.sent(n), u.tensors[n].astype(np.float64), np.nan) for u in updates])
    return np.sort(vals, axis=0), (~np.isnan(vals)).sum(axis=0)


def median(updates, base=None) -> dict:
    """Coordinate-wise median over the clients that sent each coordinate (unweighted); none: base."""
    names = _check_same(updates)
    out = {}
    for n in names:
        shape = updates[0].tensors[n].shape
        s, cnt = _stack_sent(updates, n)
        lo = np.take_along_axis(s, np.maximum((cnt - 1) // 2, 0)[None], 0)[0]
        hi = np.take_along_axis(s, np.maximum(cnt // 2, 0)[None], 0)[0]
        out[n] = np.where(cnt > 0, (lo + hi) / 2, _base(base, n, shape)).astype(np.float32)
    return out


def trimmed_mean(updates, trim: float = 0.1, base=None) -> dict:
    """Coordinate-wise mean after dropping the floor(trim * c) largest and smallest of the c clients that sent
    each coordinate (unweighted); none: base."""
    names = _check_same(updates)
    out = {}
    for n in names:
        shape = updates[0].tensors[n].shape
        s, cnt = _stack_sent(updates, n)
        t = np.floor(trim * cnt).astype(np.int64)
        acc, kept = np.zeros(shape), np.zeros(shape)
        for i in range(len(updates)):
            use = (i >= t) & (i < cnt - t)
            acc += np.where(use, np.nan_to_num(s[i]), 0)
            kept += use
        with np.errstate(invalid="ignore", divide="ignore"):
            out[n] = np.where(kept > 0, acc / np.where(kept > 0, kept, 1), _base(base, n, shape)).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------
# Heterogeneous LoRA ranks. A LoRA pair is (…lora_A…: [r, d_in], …lora_B…: [d_out, r]); every other tensor
# must have the same shape at every client and is averaged as in fedavg.


def lora_pairs(names) -> list:
    """[(name_A, name_B)] for every lora_A tensor whose lora_B twin is in names."""
    names = set(names)
    pairs = []
    for a in sorted(names):
        if _LORA_A.search(a):
            b = _LORA_A.sub(lambda m: m.group(1) + "lora_B" + m.group(2), a, count=1)
            if b in names:
                pairs.append((a, b))
    return pairs


def _hetero_prepare(updates, weights):
    ids = _ids(updates)
    w = client_weights(updates, weights)
    names = sorted(updates[0].tensors)
    for u, cid in zip(updates, ids):
        if sorted(u.tensors) != names:
            raise AggregationError(f"{client_label(cid)}: tensor names differ from {client_label(ids[0])}", client=cid)
    pairs = lora_pairs(names)
    in_pair = {n for p in pairs for n in p}
    for u, cid in zip(updates, ids):
        for a, b in pairs:
            A, B = u.tensors[a], u.tensors[b]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise AggregationError(f"{client_label(cid)}, tensor {a!r}: LoRA factors {A.shape} and {B.shape} "
                                       "are not [r, d_in] and [d_out, r]", client=cid, tensor=a)
            A0, B0 = updates[0].tensors[a], updates[0].tensors[b]
            if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0]:
                raise AggregationError(f"{client_label(cid)}, tensor {a!r}: d_in/d_out differ from "
                                       f"{client_label(ids[0])}", client=cid, tensor=a)
    others = [n for n in names if n not in in_pair]
    plain = fedavg([ClientUpdate({n: u.tensors[n] for n in others}, u.masks, u.kinds, u.metadata) for u in updates],
                   w) if others else {}
    return ids, w, pairs, plain


def hetlora(updates, weights=None):
    """HetLoRA: zero-pad every A to [r_max, d_in] and B to [d_out, r_max], average with the weights;
    client k gets back the first r_k rows of A and columns of B. Returns (global, [per-client])."""
    ids, w, pairs, plain = _hetero_prepare(updates, weights)
    glob = dict(plain)
    per = [dict(plain) for _ in updates]
    for a, b in pairs:
        r_max = max(u.tensors[a].shape[0] for u in updates)
        A = np.zeros((r_max, updates[0].tensors[a].shape[1]))
        B = np.zeros((updates[0].tensors[b].shape[0], r_max))
        for wk, u in zip(w, updates):
            r = u.tensors[a].shape[0]
            A[:r] += wk * u.tensors[a]
            B[:, :r] += wk * u.tensors[b]
        glob[a], glob[b] = A.astype(np.float32), B.astype(np.float32)
        for p, u in zip(per, updates):
            r = u.tensors[a].shape[0]
            p[a], p[b] = glob[a][:r].copy(), glob[b][:, :r].copy()
    return glob, per


def flora(updates, weights=None):
    """FLoRA: stack w_k A_k (rows) and B_k (columns) in client-id order, so B A = Σ_k w_k B_k A_k exactly.
    Every client gets the stacked factors (rank Σ r_k) to merge into its frozen weights."""
    ids, w, pairs, plain = _hetero_prepare(updates, weights)
    order = sorted(range(len(updates)), key=lambda i: (type(ids[i]).__name__, ids[i]))
    glob = dict(plain)
    for a, b in pairs:
        glob[a] = np.concatenate([w[i] * updates[i].tensors[a].astype(np.float64) for i in order]).astype(np.float32)
        glob[b] = np.concatenate([updates[i].tensors[b] for i in order], axis=1).astype(np.float32)
    return glob, [dict(glob) for _ in updates]


def svd_factors(delta: np.ndarray, r: int):
    """(A [r, d_in], B [d_out, r]) with B A the best rank-r approximation of delta; sqrt(S) on each side."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    r_eff = min(r, s.size)
    root = np.sqrt(s[:r_eff])
    A = np.zeros((r, delta.shape[1]))
    B = np.zeros((delta.shape[0], r))
    A[:r_eff] = root[:, None] * vt[:r_eff]
    B[:, :r_eff] = u[:, :r_eff] * root[None, :]
    return A.astype(np.float32), B.astype(np.float32)


def flexlora(updates, weights=None):
    """FlexLoRA: ΔW = Σ_k w_k B_k A_k, then a truncated SVD back to each client's rank (the global result at
    the largest rank)."""
    ids, w, pairs, plain = _hetero_prepare(updates, weights)
    glob = dict(plain)
    per = [dict(plain) for _ in updates]
    for a, b in pairs:
        delta = sum(wk * (u.tensors[b].astype(np.float64) @ u.tensors[a].astype(np.float64))
                    for wk, u in zip(w, updates))
        r_max = max(u.tensors[a].shape[0] for u in updates)
        glob[a], glob[b] = svd_factors(delta, r_max)
        for p, u in zip(per, updates):
            p[a], p[b] = svd_factors(delta, u.tensors[a].shape[0])
    return glob, per


# ---------------------------------------------------------------------------------------------------------
# Multi-branch (HeteroTune / FedAdapter)


def is_shared_fn(shared) -> Callable[[str], bool]:
    """shared: None (names with a "shared" path component), a regex string, a list of regexes, or a callable."""
    if callable(shared):
        return shared
    if shared is None:
        shared = DEFAULT_SHARED
    pats = [re.compile(shared)] if isinstance(shared, str) else [re.compile(p) for p in shared]
    return lambda name: any(p.search(name) for p in pats)


def layer_mapper(branch: str, depth: int, target_depth: int, layer_map) -> Callable[[int], int]:
    """l -> global layer: floor(l * target_depth / depth), or the explicit layer_map[branch] (dict or callable)."""
    if layer_map is not None and branch in layer_map:
        m = layer_map[branch]
        return m if callable(m) else (lambda l, m=m: int(m[l]))
    return lambda l: (l * target_depth) // depth


def multibranch(updates, weights=None, base=None, *, shared=None, branch_weights=None, layer_map=None,
                depths=None, target_depth=None, inner="headwise"):
    """Aggregate each branch with `inner` (fedavg/headwise); then shared tensors across branches.

    A shared tensor of layer l in a branch of depth L maps to global layer j = floor(l L' / L) (or
    layer_map); the global value is Σ β_b c_b θ_b / Σ β_b c_b over every (branch, layer) mapped to it, with
    β_b the branch weight (default Σ num_examples of the branch) and c_b = 1 where the branch covered the
    element (some client of it sent it with weight > 0). Every branch gets back its branch-local tensors and
    its shared tensors read from the global layer they map to (its own base / 0 where nothing covered).
    Returns (global shared dict, {branch: dict}).
    """
    ids = _ids(updates)
    is_shared = is_shared_fn(shared)
    groups: dict = {}
    for u, cid in zip(updates, ids):
        groups.setdefault(branch_of(u.metadata, cid), []).append(u)
    wmap = None
    if weights is not None:
        raw = client_weights(updates, weights)
        wmap = dict(zip(ids, raw))
    beta, results, cover = {}, {}, {}
    for br, ups in groups.items():
        bids = _ids(ups)
        bw = [wmap[c] for c in bids] if wmap is not None else None
        bbase = None if base is None else base.get(br)
        fn = headwise if inner == "headwise" else fedavg
        results[br] = fn(ups, bw, bbase)
        wk = client_weights(ups, bw)
        names = list(ups[0].tensors)
        cover[br] = {}
        for n in names:
            if inner == "headwise":
                den = sum(wk[i] * ups[i].scores(n, bids[i]) * ups[i].sent(n) for i in range(len(ups)))
                cover[br][n] = den > 0
            else:
                cover[br][n] = np.ones(ups[0].tensors[n].shape, bool)
        if branch_weights is not None:
            beta[br] = float(branch_weights[br])
        elif wmap is not None:
            beta[br] = float(sum(wmap[c] for c in bids))
        else:
            beta[br] = float(sum(num_examples(u.metadata, c) for u, c in zip(ups, bids)))
    depth = {}
    for br, ups in groups.items():
        sh = [n for n in ups[0].tensors if is_shared(n) and layer_index(n) is not None]
        if depths is not None and br in depths:
            depth[br] = int(depths[br])
        elif "num_layers" in ups[0].metadata:
            depth[br] = int(ups[0].metadata["num_layers"])
        else:
            depth[br] = 1 + max((layer_index(n) for n in sh), default=0)
    tdepth = target_depth or max(depth.values())
    num, den, gname = {}, {}, {}
    for br in groups:
        mp = layer_mapper(br, depth[br], tdepth, layer_map)
        for n, x in results[br].items():
            if not is_shared(n):
                continue
            li = layer_index(n)
            g = n if li is None else replace_layer(n, mp(li))
            gname[(br, n)] = g
            c = cover[br][n] * beta[br]
            num[g] = num.get(g, 0) + c * x.astype(np.float64)
            den[g] = den.get(g, 0) + c
    glob = {}
    for g in num:
        with np.errstate(invalid="ignore", divide="ignore"):
            glob[g] = np.where(den[g] > 0, num[g] / np.where(den[g] > 0, den[g], 1), 0).astype(np.float32)
    out = {}
    for br in groups:
        res = dict(results[br])
        bbase = None if base is None else base.get(br)
        for n in res:
            if (br, n) in gname:
                g = gname[(br, n)]
                res[n] = np.where(den[g] > 0, glob[g], _base(bbase, n, res[n].shape)).astype(np.float32)
        out[br] = res
    return glob, out

"""Heterogeneous LoRA ranks, streamed: HetLoRA (zero-pad), FLoRA (stack), FlexLoRA (SVD redistribution).

A LoRA pair is (...lora_A...: [r_k, d_in], ...lora_B...: [d_out, r_k]); r_k may differ per client, d_in and
d_out may not. Clients are folded in one at a time (each decoded alone), into:
    HetLoRA   A_sum [r_max, d_in], B_sum [d_out, r_max] (grown when a larger rank arrives);
    FLoRA     the list of (w_k A_k, B_k): the stacked result is that big anyway;
    FlexLoRA  ΔW_sum [d_out, d_in] = Σ w_k B_k A_k (float64), one SVD per pair at the end.
Every client gets back factors of its own rank r_k (FLoRA: the stacked factors of rank Σ r_k, which it
merges into its frozen weights before restarting its own rank-r_k adapter, as in the FLoRA paper).
Tensors outside pairs must have one shape everywhere and are averaged as in fedavg (unsent = 0).
reference.py has the same rules written on whole lists.
"""
from __future__ import annotations

import numpy as np

from ..unpack import decode_entry
from .meta import AggregationError, client_label
from .reference import lora_pairs, svd_factors
from .stream import Client

HETERO_METHODS = ("hetlora", "flora", "flexlora")


class HeteroAccumulator:
    def __init__(self, method: str):
        self.method = method
        self.names = None
        self.pairs = None
        self.first = None
        self.plain: dict = {}
        self.shapes: dict = {}
        self.dtypes: dict = {}
        self.sums: dict = {}      # pair name_A -> (A_sum, B_sum) | ΔW_sum | [(cid, w, A, B)]
        self.ranks: dict = {}     # cid -> {name_A: r}
        self.total = 0.0
        self.clip_scale = {}

    def add(self, c: Client, weight: float, scale: float = 1.0) -> None:
        x = {e.name: decode_entry(c.buffer, e, c.layout.group_size) for e in c.tensors}
        if scale != 1.0:
            x = {n: v * np.float32(scale) for n, v in x.items()}
        cid = c.cid
        if self.names is None:
            self.names = sorted(x)
            self.first = cid
            self.pairs = lora_pairs(self.names)
            self.dtypes = {e.name: e.dtype for e in c.tensors}
        if sorted(x) != self.names:
            extra = sorted(set(x) ^ set(self.names))
            raise AggregationError(f"{client_label(cid)}, tensor {extra[0]!r}: tensor names differ from "
                                   f"{client_label(self.first)}", client=cid, tensor=extra[0])
        in_pair = set()
        ranks = {}
        for a, b in self.pairs:
            A, B = x[a], x[b]
            in_pair.update((a, b))
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise AggregationError(f"{client_label(cid)}, tensor {a!r}: LoRA factors {A.shape} and {B.shape} are "
                                       "not [r, d_in] and [d_out, r]", client=cid, tensor=a)
            io = self.shapes.setdefault(a, (A.shape[1], B.shape[0]))
            if (A.shape[1], B.shape[0]) != io:
                raise AggregationError(f"{client_label(cid)}, tensor {a!r}: d_in, d_out = {(A.shape[1], B.shape[0])} "
                                       f"differ from {io} of {client_label(self.first)}", client=cid, tensor=a)
            ranks[a] = A.shape[0]
        for n in self.names:
            if n in in_pair:
                continue
            shape = self.shapes.setdefault(n, x[n].shape)
            if x[n].shape != shape:
                raise AggregationError(f"{client_label(cid)}, tensor {n!r}: shape {x[n].shape} differs from {shape} "
                                       f"of {client_label(self.first)}", client=cid, tensor=n)
        # Everything checked: fold in.
        for n in self.names:
            if n not in in_pair:
                self.plain[n] = self.plain.get(n, 0) + weight * x[n].astype(np.float64)
        for a, b in self.pairs:
            A, B = x[a].astype(np.float64), x[b].astype(np.float64)
            r = A.shape[0]
            if self.method == "hetlora":
                As, Bs = self.sums.get(a, (np.zeros((0, A.shape[1])), np.zeros((B.shape[0], 0))))
                if r > As.shape[0]:
                    As = np.pad(As, ((0, r - As.shape[0]), (0, 0)))
                    Bs = np.pad(Bs, ((0, 0), (0, r - Bs.shape[1])))
                As[:r] += weight * A
                Bs[:, :r] += weight * B
                self.sums[a] = (As, Bs)
            elif self.method == "flora":
                self.sums.setdefault(a, []).append((cid, weight, A, B))
            else:
                self.sums[a] = self.sums.get(a, 0) + weight * (B @ A)
        self.ranks[cid] = ranks
        self.total += weight

    def finish(self) -> tuple:
        """(global name -> array, {cid: name -> array of the client's own rank})."""
        W = self.total
        glob = {n: (v / W).astype(np.float32) for n, v in self.plain.items()}
        per = {cid: dict(glob) for cid in self.ranks}
        for a, b in self.pairs:
            if self.method == "hetlora":
                As, Bs = self.sums[a]
                glob[a], glob[b] = (As / W).astype(np.float32), (Bs / W).astype(np.float32)
                for cid, rk in self.ranks.items():
                    r = rk[a]
                    per[cid][a], per[cid][b] = glob[a][:r].copy(), glob[b][:, :r].copy()
            elif self.method == "flora":
                items = sorted(self.sums[a], key=lambda t: (type(t[0]).__name__, t[0]))
                glob[a] = np.concatenate([w / W * A for _, w, A, _ in items]).astype(np.float32)
                glob[b] = np.concatenate([B for *_, B in items], axis=1).astype(np.float32)
                for cid in per:
                    per[cid][a], per[cid][b] = glob[a], glob[b]
            else:
                delta = self.sums[a] / W
                r_max = max(rk[a] for rk in self.ranks.values())
                glob[a], glob[b] = svd_factors(delta, r_max)
                for cid, rk in self.ranks.items():  # the SVD once; each rank is a truncation of it
                    r = rk[a]
                    per[cid][a], per[cid][b] = glob[a][:r].copy(), glob[b][:, :r].copy()
        return glob, per

"""Measured OPs of a forward (+ backward) pass, broken down by what the work is for.

    ops = fedsparse.opcount.count_ops(model, batch)          # runs model(**batch) and loss.backward()
    print(ops)                                                 # a table: category x forward / backward
    ops.total, ops.forward["attention"], ops.backward["lora"]

Built on torch.utils.flop_counter.FlopCounterMode: every op that torch has a FLOP formula for (matmuls,
convolutions, SDPA) is counted from the shapes it actually ran with, plus formulas for fedsparse's own
attention ops (kept heads only). OPs are FLOPs: a multiply-add counts 2. Elementwise work (softmax, norms,
activations) is not counted, as in FlopCounterMode.

Categories:
    attention     the attention core: q k^T, softmax . v (and their backward), inside attention modules
    projections   the query/key/value/output projections (the frozen base weights of LoRA layers included)
    feed_forward  the MLP of each block (BERT intermediate/output, Llama mlp, T5 DenseReluDense)
    lora          the LoRA factors (lora_A, lora_B) of any module
    other         everything else (embeddings, poolers, heads, ...)
Forward ops are attributed to the module that runs them; backward ops to the module whose forward created
the autograd node that runs them (each node is tagged while the forward runs), so the breakdown holds for
the backward too.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten

CATEGORIES = ("attention", "projections", "feed_forward", "lora", "other")
_FFN = re.compile(r"(^|\.)(intermediate|mlp|feed_forward|ffn|DenseReluDense|layer\.\d+\.output)$")
_LORA = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)(\.|$)")


@dataclass
class OpCount:
    """OPs (FLOPs) per category, forward and backward."""

    forward: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    backward: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> int:
        return sum(self.backward.values())

    @property
    def total(self) -> int:
        return self.forward_total + self.backward_total

    @property
    def breakdown(self) -> dict:
        """category -> forward + backward OPs."""
        return {c: self.category(c) for c in CATEGORIES}

    def category(self, name: str) -> int:
        """Forward + backward OPs of one category."""
        return self.forward[name] + self.backward[name]

    def to_dict(self) -> dict:
        return {"forward": dict(self.forward), "backward": dict(self.backward), "forward_total": self.forward_total,
                "backward_total": self.backward_total, "total": self.total}

    def table(self, unit: float = 1e9, unit_name: str = "GOP") -> str:
        rows = [f"{'category':<13} {'forward':>10} {'backward':>10} {'total':>10}  ({unit_name})"]
        for c in CATEGORIES:
            rows.append(f"{c:<13} {self.forward[c] / unit:>10.3f} {self.backward[c] / unit:>10.3f} "
                        f"{self.category(c) / unit:>10.3f}")
        rows.append(f"{'total':<13} {self.forward_total / unit:>10.3f} {self.backward_total / unit:>10.3f} "
                    f"{self.total / unit:>10.3f}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _categories(model: nn.Module) -> dict:
    """module -> category, for the modules whose ops get a category of their own (inner modules win)."""
    from . import hf

    cats = {}
    for name, m in model.named_modules():
        if _LORA.search(name) and not isinstance(m, nn.ModuleDict):
            cats[m] = "lora"
        elif _FFN.search(name):
            cats[m] = "feed_forward"
    for layer in hf.attention_layers(model):
        cats.setdefault(layer.module, "attention")
        for role in "qkvo":
            cats[layer.modules[role]] = "projections"
    return cats


# -- FLOP formulas of fedsparse's custom ops (the kept (batch, head) pairs only) -----------------------------
def _kept_pairs(keep: torch.Tensor, b: int, h: int) -> int:
    keep = keep.detach()
    n = int((keep != 0).sum())
    return n * b if keep.dim() == 1 else n


def _pruned_attention_flop(q, k, v, keep, attn_mask, is_causal, scale, with_conf, *args, out_val=None, **kwargs):
    b, h, sq, d = q.shape
    sk, dv = k.shape[2], v.shape[3]
    n = _kept_pairs(keep, b, h)
    flops = n * (2 * sq * sk * d + 2 * sq * sk * dv)
    if with_conf and q.device.type == "cpu":
        flops += n * 2 * sq * sk * d  # the CPU path finds the row max in one more pass over q k^T
    return flops


def _pruned_attention_backward_flop(grad_out, q, k, v, out, lse, keep, *args, out_val=None, **kwargs):
    b, h, sq, d = q.shape
    sk, dv = k.shape[2], v.shape[3]
    # as torch's sdpa_backward_flop_count for flash-style kernels (which this op's CPU and GPU paths are):
    # recompute S = q k^T, then dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q
    return _kept_pairs(keep, b, h) * (2 * sq * sk * d + 4 * sq * sk * dv + 4 * sq * sk * d)


def _head_confidence_flop(q, k, *args, out_val=None, **kwargs):
    b, h, sq, d = q.shape
    return b * h * 2 * sq * k.shape[2] * d


def _cpu_flash_flop(query, key, value, *args, out_val=None, **kwargs):
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_flash_backward_flop(grad_out, query, key, value, *args, out_val=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _extra_formulas() -> dict:
    """Formulas FlopCounterMode lacks: ATen's CPU flash attention (what SDPA runs on the CPU without dropout;
    uncounted, it would read as 0) and fedsparse's custom ops."""
    formulas = {}
    aten = torch.ops.aten
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flop),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_flop)):
        packet = getattr(aten, name, None)
        if packet is not None and packet not in flop_counter.flop_registry:
            formulas[packet] = fn
    try:
        importlib.import_module(".ops", __package__)  # registers the custom ops
    except ImportError:
        return formulas
    for name, fn in (("pruned_attention", _pruned_attention_flop),
                     ("pruned_attention_backward", _pruned_attention_backward_flop),
                     ("head_confidence", _head_confidence_flop)):
        packet = getattr(torch.ops.fedsparse, name, None) if hasattr(torch.ops, "fedsparse") else None
        if packet is not None:
            formulas[packet] = fn
    return formulas


# -- attribution -----------------------------------------------------------------------------------------------
class _Tagger(TorchFunctionMode):
    """Tags every autograd node created during the forward with the category of the running module."""

    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            label = self.counter.current()
            nodes = self.counter.nodes
            stack = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            while stack:  # new nodes only: the walk stops at nodes tagged by earlier calls
                node = stack.pop()
                if node is None or node in nodes:
                    continue
                nodes[node] = label
                stack.extend(n for n, _ in node.next_functions if n is not None)
        return out


class _Counter:
    def __init__(self, model: nn.Module):
        self.result = OpCount()
        self.phase = "forward"
        self.stack = ["other"]
        self.nodes = {}  # autograd node -> category; holding the node keeps its Python object alive
        self.cats = _categories(model)
        self.handles = []
        for module, cat in self.cats.items():
            self.handles.append(module.register_forward_pre_hook(self._enter(cat)))
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))
        registry = {**flop_counter.flop_registry, **_extra_formulas()}
        self.mapping = {op: self._attributing(f) for op, f in registry.items()}

    def _enter(self, cat: str):
        def hook(module, args):
            self.stack.append(cat)

        return hook

    def _exit(self, module, args, output):
        self.stack.pop()

    def current(self) -> str:
        return self.stack[-1]

    def _attributing(self, formula):
        def count(*args, out_val=None, **kwargs):
            flops = formula(*args, out_val=out_val, **kwargs)
            if self.phase == "forward":
                cat = self.stack[-1]
            else:
                cat = self.nodes.get(torch._C._current_autograd_node(), "other")
            getattr(self.result, self.phase)[cat] += int(flops)
            return flops

        count._get_raw = True  # the registered formulas take raw arguments (shape-wrapped where needed)
        return count

    def close(self):
        for h in self.handles:
            h.remove()
        self.nodes.clear()


def _default_loss(outputs) -> torch.Tensor:
    loss = getattr(outputs, "loss", None)
    if loss is not None:
        return loss
    first = outputs[0] if isinstance(outputs, (tuple, list)) or hasattr(outputs, "to_tuple") else outputs
    if not isinstance(first, torch.Tensor):
        raise TypeError("cannot find a loss in the model outputs; pass loss_fn=")
    return first.float().sum()


def count_ops(model: nn.Module, batch, *, backward: bool = True, loss_fn=None) -> OpCount:
    """Run one forward (and, by default, backward) pass and return its measured OPs by category.

    batch: a mapping of keyword arguments (model(**batch)), a tuple/list (model(*batch)) or one tensor.
    loss_fn(outputs) -> scalar; default: outputs.loss when the model computed one, else the sum of the first
    output. The model's mode (train/eval) is left as it is; gradients the pass produces are discarded (every
    parameter's .grad is put back as it was), so count_ops can run between training steps.
    """
    counter = _Counter(model)
    saved = {p: p.grad for p in model.parameters()}
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=counter.mapping):
            with _Tagger(counter):
                if isinstance(batch, Mapping):
                    outputs = model(**batch)
                elif isinstance(batch, (tuple, list)):
                    outputs = model(*batch)
                else:
                    outputs = model(batch)
                loss = loss_fn(outputs) if loss_fn is not None else (_default_loss(outputs) if backward else None)
            if backward:
                if not loss.requires_grad:
                    raise ValueError("nothing in the model requires grad: count_ops(..., backward=False) "
                                     "or make some parameters trainable")
                counter.phase = "backward"
                loss.backward()
    finally:
        counter.close()
        for p, g in saved.items():
            p.grad = g
    return counter.result

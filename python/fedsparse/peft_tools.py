"""peft integration: train only the kept heads' LoRA slices, extract the head-structured update, load one back.

    mask = fedsparse.choose_heads(scorer.scores(), 0.9)
    pruning = fedsparse.peft_tools.prune(peft_model, mask, mode="drop")      # or mode="freeze"
    optimizer = torch.optim.AdamW(p for p in peft_model.parameters() if p.requires_grad)
    pruning.attach(optimizer)                 # pruned slices stay bit-exact through momentum / weight decay
    ... train ...
    update, masks = fedsparse.peft_tools.extract_update(peft_model, mask)
    payload = fedsparse.pack(update, head_mask=masks)
    ...
    fedsparse.peft_tools.load_update(peft_model, global_update)              # the server's answer
    pruning.restore()                         # every head back in the forward pass

Modes
  "freeze": every head stays in the forward pass; gradient hooks zero the pruned heads' LoRA slices (rows of
            lora_B for query/key/value, columns of lora_A for the output projection), so they are not
            updated, and extract_update's masks keep them off the wire.
  "drop":   pruned heads leave the forward pass. The query/key/value projections (frozen base weight, bias
            and lora_B) compute only the kept heads' rows, the attention runs over the kept heads only, and
            the output projection (base weight and lora_A) reads only the kept heads' columns. A layer with
            no kept head skips its attention entirely. Parameters keep their names and full shapes (the
            forward uses row/column slices of them), so optimizers, state dicts and extract_update are
            unaffected; the frozen base slices are copied once. Needs fedsparse attention: prune() patches
            the model (fedsparse.hf.patch) if it is not already, and restore() leaves it patched. Drop mode
            is for training passes: generation with a KV cache is not supported.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import hf
from .heads import HeadMask

MODES = ("freeze", "drop")
_ROLES = ("q", "k", "v", "o")


# -- geometry ---------------------------------------------------------------------------------------------
def _as_mask(model_layers, head_mask) -> HeadMask:
    n_layers = len(model_layers)
    n_heads = model_layers[0].n_heads if model_layers else 0
    if head_mask is None:
        return HeadMask.ones(n_layers, n_heads)
    mask = HeadMask(head_mask)
    if mask.shape != (n_layers, n_heads):
        raise ValueError(f"head mask is {mask.shape[0]}x{mask.shape[1]}, the model has {n_layers} attention "
                         f"layers x {n_heads} heads (fedsparse.hf.attention_layers lists them)")
    return mask


def _kv_mask(layer: hf.AttentionLayer, row: np.ndarray) -> np.ndarray:
    """bool [Hkv]: a key/value head is needed when any query head of its group is kept."""
    group = layer.n_heads // layer.n_kv_heads
    return row.reshape(layer.n_kv_heads, group).any(axis=1)


def role_masks(layer: hf.AttentionLayer, row: np.ndarray) -> dict[str, np.ndarray]:
    """bool head mask of each projection of a layer: q and o [H], k and v [Hkv]."""
    row = np.asarray(row, dtype=bool)
    kv = _kv_mask(layer, row)
    return {"q": row, "k": kv, "v": kv, "o": row}


def _rows(mask: np.ndarray, head_dim: int) -> torch.Tensor:
    """LongTensor of the rows (or columns) owned by the kept heads."""
    heads = np.flatnonzero(mask)
    return torch.from_numpy((heads[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1).astype(np.int64))


def _lora_factors(proj: nn.Module, name: str) -> dict:
    """adapter -> (lora_A Linear, lora_B Linear) of a peft LoRA layer ({} for a plain Linear)."""
    lora_a = getattr(proj, "lora_A", None)
    if lora_a is None:
        return {}
    if getattr(proj, "merged", False):
        raise RuntimeError(f"{name}: LoRA weights are merged into the base layer; unmerge them first")
    if getattr(proj, "lora_variant", None):
        raise NotImplementedError(f"{name}: LoRA variants (DoRA, ...) are not supported")
    return {a: (lora_a[a], proj.lora_B[a]) for a in lora_a.keys()}


# -- update extraction --------------------------------------------------------------------------------------
def _peft_state_dict(model: nn.Module, adapter_name: str) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def module_head_masks(model: nn.Module, head_mask=None) -> dict[str, np.ndarray]:
    """LoRA-module name -> bool head mask, for every query/key/value/output projection of every attention
    layer (names as in peft.get_peft_model_state_dict: "base_model.model.encoder.layer.0.attention.self.query")."""
    layers = hf.attention_layers(model)
    mask = _as_mask(layers, head_mask)
    out = {}
    for layer, row in zip(layers, mask.mask):
        for role, m in role_masks(layer, row).items():
            out[getattr(layer, f"{role}_name")] = m.copy()
    return out


def extract_update(model: nn.Module, head_mask=None, *, adapter_name: str = "default"):
    """(update, head_mask_by_module) in the form fedsparse.pack(update, head_mask=...) takes.

    update: peft.get_peft_model_state_dict(model) (detached copies), LoRA factors of every module plus
        anything else peft saves (modules_to_save).
    head_mask_by_module: LoRA module name prefix -> bool [H] (query, output projection) or [Hkv] (key,
        value; a key/value head travels when any query head of its group is kept), only for modules that
        carry LoRA tensors. pack keeps the kept heads' blocks of rows of lora_B (query/key/value) or of
        columns of lora_A (output projection); the other factor travels whole.
    head_mask: the HeadMask the client trained with (None = every head).
    """
    update = {name: t.detach().clone() for name, t in _peft_state_dict(model, adapter_name).items()}
    masks = {}
    for module, m in module_head_masks(model, head_mask).items():
        if any(name.startswith(module + ".") for name in update):
            masks[module] = m
    return update, masks


def load_update(model: nn.Module, update: Mapping, *, adapter_name: str = "default", strict: bool = True) -> None:
    """Copy a received update (peft.get_peft_model_state_dict names -> torch tensors or numpy arrays, e.g.
    fedsparse.unpack(payload)) into the model's adapter weights, in place.

    Works in every mode (drop keeps full-shape parameters). strict: every name must exist in the model's
    adapter state and shapes must match; otherwise unknown names are ignored.
    """
    from peft import set_peft_model_state_dict

    current = _peft_state_dict(model, adapter_name)
    tensors = {}
    for name in update:
        if name not in current:
            if strict:
                raise KeyError(f"{name!r} is not an adapter weight of this model")
            continue
        value = update[name]
        value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        if tuple(value.shape) != tuple(current[name].shape):
            raise ValueError(f"{name!r}: update has shape {tuple(value.shape)}, the model {tuple(current[name].shape)}")
        tensors[name] = value.to(dtype=current[name].dtype, device=current[name].device)
    with torch.no_grad():
        result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise RuntimeError(f"peft did not load {unexpected[:4]}...")


# -- pruning --------------------------------------------------------------------------------------------------
class HeadPruning:
    """What prune() did to a model; restore() undoes it.

    mode, head_mask, scorer (the fedsparse.hf.HeadScorer in "drop" mode, else None);
    attach(optimizer) restores the pruned LoRA slices after every optimizer step, so optimizer state
    (momentum from earlier rounds) or decoupled weight decay cannot move them either.
    """

    def __init__(self, model, mode, head_mask, scorer):
        self.model = model
        self.mode = mode
        self.head_mask = head_mask
        self.scorer = scorer
        self._undo = []  # callables, run in reverse order by restore()
        self._frozen = []  # (param, index tensor, dim, snapshot) of pruned LoRA slices
        self._active = True

    def attach(self, optimizer: torch.optim.Optimizer):
        def restore_slices(opt, args, kwargs):
            with torch.no_grad():
                for param, index, dim, snapshot in self._frozen:
                    param.index_copy_(dim, index.to(param.device), snapshot.to(param.device))

        handle = optimizer.register_step_post_hook(restore_slices)
        self._undo.append(handle.remove)
        return handle

    def restore(self) -> None:
        if not self._active:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        self._frozen = []
        self._active = False

    def __repr__(self) -> str:
        return f"HeadPruning(mode={self.mode!r}, kept {self.head_mask.n_kept}/{self.head_mask.mask.size} heads)"


def _override_forward(pruning: HeadPruning, module: nn.Module, forward) -> None:
    if "forward" in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} already has a patched forward (pruned twice?)")
    module.forward = forward
    pruning._undo.append(lambda: module.__dict__.pop("forward", None))


def _freeze_slices(pruning: HeadPruning, param: nn.Parameter, keep: torch.Tensor, dim: int) -> None:
    """Zero the gradient of the pruned rows (dim 0) or columns (dim 1) of param."""
    shape = [1, 1]
    shape[dim] = -1
    scale = keep.to(device=param.device, dtype=param.dtype).reshape(shape)
    handle = param.register_hook(lambda g: g * scale)
    pruning._undo.append(handle.remove)
    pruned = (~keep).nonzero().squeeze(1)
    if pruned.numel():
        pruning._frozen.append((param, pruned, dim, param.detach().index_select(dim, pruned.to(param.device)).clone()))


def _slice_linear_rows(pruning, linear: nn.Linear, rows: torch.Tensor) -> None:
    """linear computes only output rows `rows` (frozen weights: sliced once; trainable: sliced per call)."""
    rows = rows.to(linear.weight.device)
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        def forward(x, linear=linear, rows=rows):
            bias = None if linear.bias is None else linear.bias.index_select(0, rows)
            return F.linear(x, linear.weight.index_select(0, rows), bias)
    else:
        weight = linear.weight.detach().index_select(0, rows)
        bias = None if linear.bias is None else linear.bias.detach().index_select(0, rows)

        def forward(x, weight=weight, bias=bias):
            return F.linear(x, weight, bias)
    _override_forward(pruning, linear, forward)


def _slice_linear_cols(pruning, linear: nn.Linear, cols: torch.Tensor) -> None:
    """linear reads only input columns `cols` (its input holds just those features)."""
    cols = cols.to(linear.weight.device)
    if linear.weight.requires_grad:
        def forward(x, linear=linear, cols=cols):
            return F.linear(x, linear.weight.index_select(1, cols), linear.bias)
    else:
        weight = linear.weight.detach().index_select(1, cols)

        def forward(x, weight=weight, linear=linear):
            return F.linear(x, weight, linear.bias)
    _override_forward(pruning, linear, forward)


def _empty_attention(layer: hf.AttentionLayer):
    """A forward for an attention module with no kept head: no projection, no attention, zero output."""
    o_module = layer.o_module
    module = layer.module

    if layer.family == "bert":
        def forward(hidden_states, *args, **kwargs):
            return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None
    elif layer.family == "llama":
        def forward(hidden_states, *args, **kwargs):
            return o_module(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None
    else:
        def forward(hidden_states, mask=None, key_value_states=None, position_bias=None, past_key_values=None,
                    **kwargs):
            if position_bias is None:  # later layers reuse the bias computed by the first one
                sq = hidden_states.shape[1]
                sk = sq if key_value_states is None else key_value_states.shape[1]
                if module.has_relative_attention_bias:
                    position_bias = module.compute_bias(sq, sk, device=hidden_states.device)
                else:
                    position_bias = hidden_states.new_zeros(1, module.n_heads, sq, sk)
            return o_module(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), position_bias, None
    return forward


def _zero_input_projection(proj: nn.Module):
    """The output projection of a layer with no kept head: its input has no feature, so it outputs its bias
    (LoRA adds B A x = 0)."""
    linear = hf._linear(proj)

    def forward(x, *args, **kwargs):
        out = x.new_zeros(*x.shape[:-1], linear.out_features)
        return out if linear.bias is None else out + linear.bias

    return forward


def _drop_layer(pruning: HeadPruning, layer: hf.AttentionLayer, row: np.ndarray) -> None:
    masks = role_masks(layer, row)
    module = layer.module
    kept = torch.from_numpy(np.flatnonzero(row).astype(np.int64))
    device = next(module.parameters()).device
    if kept.numel() == 0:  # no projection, no attention, no LoRA factor runs in this layer
        _override_forward(pruning, layer.o_module, _zero_input_projection(layer.o_module))
        _override_forward(pruning, module, _empty_attention(layer))
        return
    for role in _ROLES:
        proj = layer.modules[role]
        name = getattr(layer, f"{role}_name")
        index = _rows(masks[role], layer.head_dim)
        if role == "o":
            _slice_linear_cols(pruning, hf._linear(proj), index)
        else:
            _slice_linear_rows(pruning, hf._linear(proj), index)
        for adapter, (lora_a, lora_b) in _lora_factors(proj, name).items():
            if role == "o":
                _slice_linear_cols(pruning, lora_a, index)
                _freeze_slices(pruning, lora_a.weight, torch.from_numpy(np.repeat(masks[role], layer.head_dim)), 1)
            else:
                _slice_linear_rows(pruning, lora_b, index)
                _freeze_slices(pruning, lora_b.weight, torch.from_numpy(np.repeat(masks[role], layer.head_dim)), 0)
    module._fedsparse_kept = kept.to(device)
    if layer.n_kv_heads != layer.n_heads:
        group = layer.n_heads // layer.n_kv_heads
        kv_kept = np.flatnonzero(masks["k"])
        position = {int(j): i for i, j in enumerate(kv_kept)}
        module._fedsparse_kv_index = torch.tensor([position[int(h) // group] for h in kept], device=device)

    def undo(module=module):
        module.__dict__.pop("_fedsparse_kept", None)
        module.__dict__.pop("_fedsparse_kv_index", None)

    pruning._undo.append(undo)


def _freeze_layer(pruning: HeadPruning, layer: hf.AttentionLayer, row: np.ndarray) -> None:
    masks = role_masks(layer, row)
    for role in _ROLES:
        proj = layer.modules[role]
        keep = torch.from_numpy(np.repeat(masks[role], layer.head_dim))
        for adapter, (lora_a, lora_b) in _lora_factors(proj, getattr(layer, f"{role}_name")).items():
            if role == "o":
                _freeze_slices(pruning, lora_a.weight, keep, 1)
            else:
                _freeze_slices(pruning, lora_b.weight, keep, 0)
                if lora_b.bias is not None:
                    raise NotImplementedError("LoRA bias (lora_bias=True) is not supported")


def prune(model: nn.Module, head_mask, mode: str = "drop") -> HeadPruning:
    """Apply a HeadMask to a (peft LoRA) model in "freeze" or "drop" mode (see the module docstring).

    Returns a HeadPruning; call .restore() before pruning again with another mask.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if getattr(model, "_fedsparse_pruning", None) is not None and model._fedsparse_pruning._active:
        raise RuntimeError("the model is already pruned; call .restore() on the previous HeadPruning first")
    layers = hf.attention_layers(model)
    if not layers:
        raise ValueError(f"no supported attention module found in {type(model).__name__}")
    mask = _as_mask(layers, head_mask)
    scorer = hf.patch(model) if mode == "drop" else None
    pruning = HeadPruning(model, mode, mask, scorer)
    try:
        for layer, row in zip(layers, mask.mask):
            if row.all():  # nothing to freeze or drop
                continue
            (_drop_layer if mode == "drop" else _freeze_layer)(pruning, layer, row)
    except BaseException:
        pruning.restore()
        raise
    model._fedsparse_pruning = pruning
    pruning._undo.insert(0, lambda: model.__dict__.pop("_fedsparse_pruning", None))
    return pruning

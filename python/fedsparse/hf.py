"""transformers integration: head scoring while the model runs, and pruned heads, through AttentionInterface.

    scorer = fedsparse.hf.patch(model)           # any BERT-, Llama/Qwen- or T5-family model (or a peft model)
    for batch in batches:
        model(**batch)                           # ordinary forward passes (training or not)
    scores = scorer.scores()                     # float32 [attention layers, heads], mean head confidence
    mask = fedsparse.choose_heads(scores, 0.9)
    scorer.head_mask = mask                      # pruned heads now output zeros (and cost no attention)
    scorer.unpatch()

patch() registers the attention implementation "fedsparse" with transformers' AttentionInterface (and a mask
function with AttentionMaskInterface) and switches the model to it. Every attention call then goes through
fedsparse.ops.pruned_attention, which returns the confidence of the kept heads from the same pass (Voita et
al. 2019: over valid queries, the mean of the largest attention probability), so scoring costs nothing extra.

Rows of the score matrix and of HeadMask are the attention modules in module order (attention_layers()).

Two things the fused op does not do fall back to torch SDPA over the kept heads (pruned heads still output
zeros): attention dropout while training (set the config's attention dropout to 0 to stay on the fused op),
and an additive bias that needs a gradient (T5's relative position bias when it is trained); the confidence
then comes from fedsparse.ops.head_confidence, one more q k^T pass.

Padding: for bidirectional self-attention the padding mask reaches the op as bool [B, S], so padded queries
are left out of the confidence and their attention output rows are zero (stock SDPA computes values there
that no unmasked position ever reads); every non-padded position matches the stock attention.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .heads import HeadMask, choose_heads

IMPLEMENTATION = "fedsparse"


# -- which modules are attention layers ---------------------------------------------------------------
@dataclass
class AttentionLayer:
    """One attention module that calls transformers' attention interface, and its projections.

    Names are relative to the model given to attention_layers() (for a peft model they start with
    "base_model.model."); q/k/v/o are the projection modules (peft LoRA wrappers included).
    """

    name: str
    module: nn.Module
    family: str  # "bert" | "llama" | "t5"
    q_name: str
    k_name: str
    v_name: str
    o_name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    cross: bool
    modules: dict = field(default_factory=dict, repr=False)

    @property
    def q_module(self) -> nn.Module:
        return self.modules["q"]

    @property
    def k_module(self) -> nn.Module:
        return self.modules["k"]

    @property
    def v_module(self) -> nn.Module:
        return self.modules["v"]

    @property
    def o_module(self) -> nn.Module:
        return self.modules["o"]


def _linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear doing the projection (unwrapping a peft LoRA layer)."""
    base = getattr(module, "base_layer", module)
    while hasattr(base, "base_layer"):
        base = base.base_layer
    return base


def _family(m: nn.Module) -> str | None:
    if all(isinstance(getattr(m, a, None), nn.Module) for a in ("query", "key", "value")) and \
            hasattr(m, "num_attention_heads") and hasattr(m, "attention_head_size"):
        return "bert"
    if all(isinstance(getattr(m, a, None), nn.Module) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            hasattr(m, "head_dim"):
        return "llama"
    if all(isinstance(getattr(m, a, None), nn.Module) for a in ("q", "k", "v", "o")) and \
            hasattr(m, "n_heads") and hasattr(m, "key_value_proj_dim"):
        return "t5"
    return None


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention modules of a model, in module order, with their projections and head geometry.

    Supported: the BERT family (BertSelfAttention and look-alikes: RoBERTa, MiniLM, ...), the Llama family
    (q_proj/k_proj/v_proj/o_proj: Llama, Qwen2/3, Mistral, ...; grouped-query attention included) and T5.
    """
    modules = dict(model.named_modules())
    found = []
    for name, m in modules.items():
        family = _family(m)
        if family is None:
            continue
        pre = name + "." if name else ""
        if family == "bert":
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            o_name = (parent + "." if parent else "") + "output.dense"
            if o_name not in modules:
                continue
            names = (pre + "query", pre + "key", pre + "value", o_name)
            n_heads, head_dim = int(m.num_attention_heads), int(m.attention_head_size)
            n_kv = n_heads
            cross = "Cross" in type(m).__name__ or bool(getattr(modules.get(parent), "is_cross_attention", False))
        elif family == "llama":
            names = (pre + "q_proj", pre + "k_proj", pre + "v_proj", pre + "o_proj")
            head_dim = int(m.head_dim)
            n_heads = _linear(m.q_proj).out_features // head_dim
            n_kv = _linear(m.k_proj).out_features // head_dim
            cross = bool(getattr(m, "is_cross_attention", False))
        else:
            names = (pre + "q", pre + "k", pre + "v", pre + "o")
            n_heads, head_dim = int(m.n_heads), int(m.key_value_proj_dim)
            n_kv = n_heads
            cross = name.endswith("EncDecAttention")
        found.append(AttentionLayer(name, m, family, *names, n_heads, n_kv, head_dim, cross,
                                    modules={r: modules[n] for r, n in zip("qkvo", names)}))
    return found


def _pretrained(model: nn.Module):
    """The outermost transformers PreTrainedModel inside model (model itself, or a peft model's base)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    raise TypeError(f"{type(model).__name__} contains no transformers PreTrainedModel")


# -- the attention implementation -----------------------------------------------------------------------
@dataclass
class _LayerState:
    scorer: HeadScorer
    index: int
    cross: bool


def _select_heads(t: torch.Tensor | None, kept: torch.Tensor | None, n_heads: int) -> torch.Tensor | None:
    """Keep the kept heads of a per-head tensor [*, H, *, *] (a mask or a bias that broadcasts over heads
    passes through)."""
    if t is None or kept is None or t.dim() != 4 or t.shape[1] != n_heads:
        return t
    return t.index_select(1, kept.to(t.device))


def _combine_bias(bias: torch.Tensor, mask: torch.Tensor | None, cross: bool, sq: int, sk: int) -> torch.Tensor:
    """One additive float mask from a position bias (T5) and a bool or float attention mask."""
    if mask is None:
        return bias
    if mask.dtype != torch.bool:
        return bias + mask
    if mask.dim() == 2:  # bool [B, Sk] padding
        allowed = mask[:, None, None, :]
        if not cross and sq == sk:
            allowed = allowed & mask[:, None, :, None]
    else:
        allowed = mask
    return bias.masked_fill(~allowed, float("-inf"))


def _sdpa_kept(q, k, v, head_mask, attn_mask, is_causal, scale, dropout, cross):
    """Fallback for what the fused op does not do (attention dropout, a mask that needs a gradient):
    torch SDPA over the kept heads only, pruned heads zero."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    qvalid = None
    if attn_mask is not None and attn_mask.dtype == torch.bool and attn_mask.dim() == 2:
        if not cross and sq == sk:  # padded queries output zeros, as in the fused op; masking their rows
            qvalid = attn_mask[:, None, :, None].to(q.dtype)  # instead could give NaN on some SDPA kernels
        attn_mask = attn_mask[:, None, None, :]
    if is_causal and attn_mask is not None:  # SDPA takes one or the other
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        attn_mask = attn_mask & causal if attn_mask.dtype == torch.bool else attn_mask.masked_fill(
            ~causal, float("-inf"))
        is_causal = False
    if bool(head_mask.all()):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=scale)
        return out if qvalid is None else out * qvalid
    idx = head_mask.nonzero().squeeze(1).to(q.device)
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == h:
        attn_mask = attn_mask.index_select(1, idx)
    out = q.new_zeros(b, h, sq, v.shape[-1])
    if idx.numel():
        part = torch.nn.functional.scaled_dot_product_attention(
            q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx), attn_mask=attn_mask,
            dropout_p=dropout, is_causal=is_causal, scale=scale)
        out = out.index_copy(1, idx, part)
    return out if qvalid is None else out * qvalid


def fedsparse_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, position_bias: torch.Tensor | None = None, **kwargs):
    """The "fedsparse" AttentionInterface function: q [B, H, Sq, D], k/v [B, Hkv, Sk, D] -> ([B, Sq, H, D], None).

    Applies the scorer's head mask, records head confidence, and handles heads that
    fedsparse.peft_tools.prune(mode="drop") removed from the projections (module._fedsparse_kept).
    """
    from . import ops

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("fedsparse attention does not support softcap or attention sinks (s_aux)")
    state: _LayerState | None = getattr(module, "_fedsparse", None)
    b, h, sq, _ = query.shape
    kept = getattr(module, "_fedsparse_kept", None)  # LongTensor: this module computes only these heads
    n_full = state.scorer.n_heads if state is not None else h

    if kept is not None and key.shape[1] != h:
        # grouped-query attention with dropped heads: kept query head i reads local kv head kv_index[i]
        kv_index = module._fedsparse_kv_index.to(key.device)
        key, value = key.index_select(1, kv_index), value.index_select(1, kv_index)

    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    is_causal = bool(is_causal) and sq > 1 and attention_mask is None
    if is_causal and key.shape[2] > sq:  # as transformers' sdpa: prefill of an empty static cache
        key, value = key[:, :, :sq], value[:, :, :sq]
    sk = key.shape[2]

    cross = state.cross if state is not None else False
    mask = attention_mask
    if mask is not None and kept is not None:
        mask = _select_heads(mask, kept, n_full)
    if position_bias is not None:
        bias = position_bias if kept is None else _select_heads(position_bias, kept, n_full)
        mask = _combine_bias(bias.to(query.dtype), mask, cross, sq, sk)
    elif mask is not None and mask.dtype == torch.bool and mask.dim() == 2 and cross and sq == sk:
        mask = mask[:, None, None, :]  # a cross-attention padding mask pads keys only

    # the head mask stays on the CPU: the op reads the kept-head list without a device sync
    if kept is not None or state is None or state.scorer._rows is None:
        head_mask = torch.ones(h, dtype=torch.bool)
    else:
        head_mask = state.scorer._rows[state.index]
    scoring = state is not None and state.scorer.enabled
    training_dropout = dropout if module.training else 0.0
    mask_needs_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()

    if training_dropout > 0.0 or mask_needs_grad:
        # the fused op has neither attention dropout nor a gradient for a float mask
        out = _sdpa_kept(query, key, value, head_mask, mask, is_causal, scaling, training_dropout, cross)
        conf = None
        if scoring:
            with torch.no_grad():
                conf = ops.head_confidence(query.detach(), key.detach(),
                                           attn_mask=None if mask is None else mask.detach(),
                                           scale=scaling, is_causal=is_causal)
                conf = conf * head_mask.to(device=conf.device, dtype=conf.dtype)
    elif scoring:
        out, conf = ops.pruned_attention(query, key, value, head_mask, attn_mask=mask, is_causal=is_causal,
                                         scale=scaling, return_confidence=True)
    else:
        out = ops.pruned_attention(query, key, value, head_mask, attn_mask=mask, is_causal=is_causal,
                                   scale=scaling)
        conf = None
    if conf is not None:
        state.scorer._record(state.index, conf, head_mask, kept)
    return out.transpose(1, 2).contiguous(), None


def fedsparse_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The "fedsparse" AttentionMaskInterface function: transformers' sdpa mask (bool [B, 1, Sq, Sk], True =
    attend, or None), except that a plain bidirectional padding mask stays bool [B, Sk], so that the op can
    leave padded queries out of the head confidence."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    if (mask_function is bidirectional_mask_function and attention_mask is not None and attention_mask.dim() == 2
            and tuple(attention_mask.shape) == (batch_size, kv_length) and kv_offset == 0):
        mask = attention_mask.to(torch.bool)
        if kwargs.get("allow_is_bidirectional_skip", False) and bool(mask.all()):
            return None
        return mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


_registered = False


def register() -> str:
    """Register the "fedsparse" attention and mask functions with transformers (idempotent); returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(IMPLEMENTATION, fedsparse_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, fedsparse_mask)
        _registered = True
    return IMPLEMENTATION


# -- the scorer --------------------------------------------------------------------------------------------
class HeadScorer:
    """Per-layer, per-head confidence accumulated over the forward passes of a patched model.

    scores()        float32 [layers, heads]: mean confidence over the examples each head was computed on
                    (0 for a head never computed: pruned or dropped)
    counts()        int64 [layers, heads]: those example counts
    reset()         start over
    enabled         set False (or use `with scorer.paused():`) to stop recording
    head_mask       a HeadMask (or None): pruned heads output zeros in every forward pass
    choose(...)     fedsparse.choose_heads(self.scores(), ...)
    layer_names     the attention modules, one per row
    unpatch()       restore the model's previous attention implementation
    """

    def __init__(self, model: nn.Module, layers: list[AttentionLayer], previous: str | None):
        heads = {layer.n_heads for layer in layers}
        if len(heads) != 1:
            raise ValueError(f"attention layers have different head counts {sorted(heads)}")
        self.n_heads = heads.pop()
        self.n_layers = len(layers)
        self.layers = layers
        self.layer_names = [layer.name for layer in layers]
        self.enabled = True
        self._model = model
        self._previous = previous
        self._sums = None  # float64 [L, H] on the device of the first recorded pass
        self._counts = None
        self._mask: HeadMask | None = None
        self._rows = None

    # recording (called from the attention function; stays on device: no host sync per layer)
    def _record(self, index: int, conf: torch.Tensor, head_mask: torch.Tensor, kept: torch.Tensor | None):
        if self._sums is None or self._sums.device != conf.device:
            self._sums = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64, device=conf.device)
            self._counts = torch.zeros(self.n_layers, self.n_heads, dtype=torch.int64, device=conf.device)
        total = conf.detach().to(torch.float64).sum(0)
        n = head_mask.to(device=conf.device, dtype=torch.int64) * conf.shape[0]
        if kept is None:
            self._sums[index] += total
            self._counts[index] += n
        else:
            kept = kept.to(conf.device)
            self._sums[index].index_add_(0, kept, total)
            self._counts[index].index_add_(0, kept, n)

    def scores(self) -> torch.Tensor:
        if self._sums is None:
            return torch.zeros(self.n_layers, self.n_heads)
        return (self._sums / self._counts.clamp_min(1)).float().cpu()

    def counts(self) -> torch.Tensor:
        if self._counts is None:
            return torch.zeros(self.n_layers, self.n_heads, dtype=torch.int64)
        return self._counts.cpu()

    def reset(self) -> None:
        self._sums = self._counts = None

    @contextlib.contextmanager
    def paused(self):
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def choose(self, sparsity: float, *, scope: str = "global", min_per_layer: int = 0) -> HeadMask:
        return choose_heads(self.scores(), sparsity, scope=scope, min_per_layer=min_per_layer)

    # masking
    @property
    def head_mask(self) -> HeadMask | None:
        return self._mask

    @head_mask.setter
    def head_mask(self, mask) -> None:
        if mask is not None:
            mask = HeadMask(mask)
            if mask.shape != (self.n_layers, self.n_heads):
                raise ValueError(f"head mask is {mask.shape[0]}x{mask.shape[1]}, the model has {self.n_layers} "
                                 f"attention layers x {self.n_heads} heads")
        self._mask = mask
        self._rows = None if mask is None else torch.from_numpy(mask.mask.copy())

    def unpatch(self) -> None:
        """Give the model its previous attention implementation back and forget the per-layer state."""
        for layer in self.layers:
            if getattr(layer.module, "_fedsparse_kept", None) is not None:
                raise RuntimeError("heads are dropped (fedsparse.peft_tools.prune); restore() that first")
        for layer in self.layers:
            if getattr(layer.module, "_fedsparse", None) is not None:
                del layer.module._fedsparse
        root = self._model
        if getattr(root, "_fedsparse_scorer", None) is self:
            del root._fedsparse_scorer
        if self._previous is not None:
            _pretrained(root).set_attn_implementation(self._previous)

    def __repr__(self) -> str:
        seen = int(self.counts().max()) if self._counts is not None else 0
        return (f"HeadScorer({self.n_layers} layers x {self.n_heads} heads, up to {seen} examples per head, "
                f"mask={'none' if self._mask is None else f'{self._mask.n_kept} kept'})")


def patch(model: nn.Module, head_mask=None, *, score: bool = True) -> HeadScorer:
    """Switch model (a transformers model, or a peft model around one) to fedsparse attention.

    Returns the model's HeadScorer (the same one if it was patched already; head_mask, if given, replaces
    the current one). score=False starts with recording off (scorer.enabled).
    """
    existing = getattr(model, "_fedsparse_scorer", None)
    if existing is not None:
        if head_mask is not None:
            existing.head_mask = head_mask
        return existing
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"no supported attention module found in {type(model).__name__} "
                         "(supported: BERT family, Llama/Qwen family, T5)")
    pretrained = _pretrained(model)
    scorer = HeadScorer(model, layers, previous=pretrained.config._attn_implementation)
    scorer.head_mask = head_mask
    scorer.enabled = score
    for index, layer in enumerate(layers):
        layer.module._fedsparse = _LayerState(scorer, index, layer.cross)
    pretrained.set_attn_implementation(register())
    for layer in layers:  # set_attn_implementation skips models that cannot switch; say so instead
        config = getattr(layer.module, "config", None)
        if config is not None and config._attn_implementation != IMPLEMENTATION:
            scorer._previous = None
            scorer.unpatch()
            raise TypeError(f"{type(pretrained).__name__} did not switch to the fedsparse attention "
                            f"({layer.name} still uses {config._attn_implementation!r})")
    model._fedsparse_scorer = scorer
    return scorer

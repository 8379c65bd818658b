"""Which attention heads a client keeps: the HeadMask type, choose_heads(), and a gradient-based scorer.

A HeadMask is bool [layers, heads]; True = the head is kept (trained, uploaded, computed). Its rows are the
attention modules of a model in module order (fedsparse.hf.attention_layers(model) lists them: for T5 the
encoder self-attentions, then per decoder block its self- and cross-attention).

This module imports numpy only; torch is imported lazily by the gradient scorer, so a server can build,
read and ship head masks without torch.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable

import numpy as np

from .errors import PayloadError

_MAGIC = b"FSHM"
_VERSION = 1
_HEADER = struct.Struct("<4sBHH")  # 9 bytes: magic, version, layers, heads; then the bitmap, then crc32


class HeadMask:
    """bool [layers, heads]: the kept heads of every attention layer.

    Build from anything array-like (numpy, nested lists, a torch tensor); nonzero = kept.
        mask.mask        read-only numpy bool [L, H]
        mask.kept()      list (per layer) of the kept head indices
        mask.sparsity    fraction of heads pruned
        mask[l]          numpy bool [H] of layer l
    Serializable: to_bytes()/from_bytes() (9-byte header, bitmap, CRC32), to_json()/from_json(),
    to_list()/from_list().
    """

    __slots__ = ("_mask",)

    def __init__(self, mask):
        if isinstance(mask, HeadMask):
            arr = mask.mask
        else:
            if hasattr(mask, "detach"):  # a torch tensor, without importing torch
                mask = mask.detach().cpu().numpy()
            arr = np.asarray(mask)
            if arr.dtype != bool:
                if not np.issubdtype(arr.dtype, np.number):
                    raise TypeError(f"a head mask must be bool or numeric, got dtype {arr.dtype}")
                arr = arr != 0
        if arr.ndim != 2:
            raise ValueError(f"a head mask must be 2-D [layers, heads], got shape {arr.shape}")
        if arr.shape[1] == 0:
            raise ValueError("a head mask needs at least one head per layer")
        arr = np.array(arr, dtype=bool, copy=True)
        arr.flags.writeable = False
        self._mask = arr

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def ones(cls, n_layers: int, n_heads: int) -> HeadMask:
        """Every head kept."""
        return cls(np.ones((n_layers, n_heads), dtype=bool))

    @classmethod
    def from_kept(cls, kept: Iterable[Iterable[int]], n_heads: int) -> HeadMask:
        """From the kept head indices of every layer (the inverse of kept())."""
        rows = [list(k) for k in kept]
        arr = np.zeros((len(rows), n_heads), dtype=bool)
        for layer, heads in enumerate(rows):
            for h in heads:
                if not (isinstance(h, (int, np.integer)) and 0 <= h < n_heads):
                    raise ValueError(f"layer {layer}: head index {h!r} is not an int in [0, {n_heads})")
                arr[layer, h] = True
        return cls(arr)

    # -- views -------------------------------------------------------------------------------------
    @property
    def mask(self) -> np.ndarray:
        return self._mask

    @property
    def shape(self) -> tuple[int, int]:
        return self._mask.shape

    @property
    def n_layers(self) -> int:
        return self._mask.shape[0]

    @property
    def n_heads(self) -> int:
        return self._mask.shape[1]

    @property
    def n_kept(self) -> int:
        return int(self._mask.sum())

    @property
    def sparsity(self) -> float:
        """Fraction of heads pruned, in [0, 1]."""
        return 1.0 - self.n_kept / self._mask.size if self._mask.size else 0.0

    def kept(self) -> list[list[int]]:
        """The kept head indices of every layer, ascending."""
        return [np.flatnonzero(row).tolist() for row in self._mask]

    def __getitem__(self, layer) -> np.ndarray:
        return self._mask[layer]

    def __len__(self) -> int:
        return self.n_layers

    def __array__(self, dtype=None, copy=None):
        return self._mask if dtype is None else self._mask.astype(dtype)

    def torch(self, device=None):
        """torch.bool [L, H] on device."""
        import torch

        return torch.as_tensor(self._mask.copy(), dtype=torch.bool, device=device)

    def __eq__(self, other) -> bool:
        if not isinstance(other, HeadMask):
            return NotImplemented
        return self.shape == other.shape and bool((self._mask == other._mask).all())

    def __hash__(self) -> int:
        return hash((self.shape, self._mask.tobytes()))

    def __repr__(self) -> str:
        lines = [f"HeadMask({self.n_layers} layers x {self.n_heads} heads, kept {self.n_kept}/{self._mask.size}, "
                 f"sparsity {self.sparsity:.3f})"]
        width = len(str(self.n_layers - 1)) if self.n_layers else 1
        for layer, heads in enumerate(self.kept()):
            shown = ", ".join(map(str, heads)) if heads else "-"
            lines.append(f"  layer {layer:>{width}}: {shown}")
        return "\n".join(lines)

    # -- serialization -----------------------------------------------------------------------------
    def to_list(self) -> list[list[bool]]:
        return self._mask.tolist()

    @classmethod
    def from_list(cls, rows) -> HeadMask:
        rows = list(rows)
        if not rows or not all(isinstance(r, (list, tuple)) and all(isinstance(x, (bool, np.bool_)) for x in r)
                               for r in rows):
            raise ValueError("from_list expects a non-empty list of lists of bools")
        if len({len(r) for r in rows}) != 1:
            raise ValueError("from_list: every layer must have the same number of heads")
        return cls(np.array(rows, dtype=bool))

    def to_json(self) -> str:
        """{"layers": L, "heads": H, "kept": [[head, ...], ...]}."""
        return json.dumps({"layers": self.n_layers, "heads": self.n_heads, "kept": self.kept()},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> HeadMask:
        try:
            obj = json.loads(text)
            layers, heads, kept = obj["layers"], obj["heads"], obj["kept"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a HeadMask JSON object: {exc}") from None
        if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(kept, list)
                and len(kept) == layers and heads > 0 and all(isinstance(k, list) for k in kept)):
            raise ValueError("HeadMask JSON: 'kept' must hold one list per layer and 'heads' must be positive")
        return cls.from_kept(kept, heads)

    def to_bytes(self) -> bytes:
        """9-byte header: b"FSHM", u8 version, u16 layers, u16 heads (little-endian); the row-major bitmap
        (bit i is bit i%8 of byte i//8); u32 CRC32 of everything before it."""
        import zlib

        if self.n_layers > 0xFFFF or self.n_heads > 0xFFFF:
            raise ValueError("a HeadMask with more than 65535 layers or heads cannot be serialized")
        body = _HEADER.pack(_MAGIC, _VERSION, self.n_layers, self.n_heads)
        body += np.packbits(self._mask.reshape(-1), bitorder="little").tobytes()
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> HeadMask:
        """Parse to_bytes() output; anything malformed raises fedsparse.PayloadError."""
        import zlib

        data = bytes(data)
        if len(data) < _HEADER.size + 4:
            raise PayloadError(f"HeadMask bytes too short ({len(data)} bytes)")
        magic, version, layers, heads = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise PayloadError("not a HeadMask (bad magic)")
        if version != _VERSION:
            raise PayloadError(f"unsupported HeadMask version {version}")
        if heads == 0:
            raise PayloadError("HeadMask with zero heads per layer")
        nbits = layers * heads
        expected = _HEADER.size + (nbits + 7) // 8 + 4
        if len(data) != expected:
            raise PayloadError(f"HeadMask of {layers}x{heads} must be {expected} bytes, got {len(data)}")
        (crc,) = struct.unpack_from("<I", data, expected - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise PayloadError("HeadMask checksum mismatch")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=expected - 4 - _HEADER.size,
                                           offset=_HEADER.size), bitorder="little", count=nbits)
        return cls(bits.astype(bool).reshape(layers, heads))


def _as_scores(scores) -> np.ndarray:
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu().numpy()
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"scores must be a numeric [layers, heads] array: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty 2-D [layers, heads] array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("scores contain NaN or Inf")
    return arr


def _n_pruned(sparsity: float, n: int) -> int:
    # round() on the exact product: 90% of 20 heads prunes 18, 90% of 72 prunes 65 (64.8 -> 65).
    return min(n, int(round(sparsity * n + 1e-9)))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores; ties go to the lower index (stable, deterministic)."""
    order = np.argsort(-scores, kind="stable")
    return order[:k]


def choose_heads(scores, sparsity: float, *, scope: str = "global", min_per_layer: int = 0) -> HeadMask:
    """Keep the highest-scoring heads; prune a fraction `sparsity` of them.

    scores: [layers, heads] importance (numpy, torch or nested lists; higher = more important), finite.
    sparsity: fraction of heads to prune, in [0, 1]. The number pruned is round(sparsity * n), over all
        L*H heads (scope="global") or over the H heads of each layer (scope="layer").
    min_per_layer: every layer keeps at least this many of its best heads; with scope="global" the rest of
        the budget goes to the best remaining heads. If L * min_per_layer exceeds the budget, the minimum
        wins (fewer heads are pruned than asked).
    Ties are broken deterministically: between equal scores the lower (layer, head) index is kept.
    """
    arr = _as_scores(scores)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    sparsity = float(sparsity)
    if not (0.0 <= sparsity <= 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    n_layers, n_heads = arr.shape
    if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, (int, np.integer)):
        raise TypeError(f"min_per_layer must be an int, got {min_per_layer!r}")
    if not (0 <= min_per_layer <= n_heads):
        raise ValueError(f"min_per_layer must be in [0, {n_heads}] (heads per layer), got {min_per_layer}")

    keep = np.zeros(arr.shape, dtype=bool)
    if scope == "layer":
        k = max(n_heads - _n_pruned(sparsity, n_heads), min_per_layer)
        for layer in range(n_layers):
            keep[layer, _top(arr[layer], k)] = True
        return HeadMask(keep)

    for layer in range(n_layers):
        keep[layer, _top(arr[layer], min_per_layer)] = True
    budget = arr.size - _n_pruned(sparsity, arr.size) - int(keep.sum())
    if budget > 0:
        flat = np.where(keep.reshape(-1), -np.inf, arr.reshape(-1))
        # only heads not already kept compete; -inf ones sort last and are never taken (budget <= their count)
        keep.reshape(-1)[_top(flat, budget)] = True
    return HeadMask(keep)


class GradientImportance:
    """Head importance of Michel et al. 2019: I_h = E_x |dL(x)/d xi_h|, xi_h a gate on head h's output.

    A gate of ones is multiplied into the input of every attention output projection (the concatenated head
    outputs), so the model computes exactly what it did; the gradient of the gate is read on every backward
    pass. Use as a context manager or call remove():

        with GradientImportance(model) as imp:
            for batch in batches:
                model(**batch).loss.backward()
            scores = imp.scores()            # float32 [layers, heads]

    per_example=True (default) gates every example separately ([B, H] gates) and sums |grad| over the
    batch, which is E_x |dL(x)/dxi| for a mean-reduced loss; per_example=False gates the batch as a whole
    ([H] gates), as Michel et al.'s code does. scores() divides by the number of backward passes; with
    normalize=True each layer is divided by its L2 norm (Michel et al., section 4.2).
    Works on the full model (not on a model whose heads were dropped by fedsparse.peft_tools.prune).
    """

    def __init__(self, model, *, per_example: bool = True):
        import torch

        from .hf import attention_layers

        self._torch = torch
        self.layers = attention_layers(model)
        if not self.layers:
            raise ValueError("no attention layer found in the model (supported: BERT, Llama/Qwen, T5 families)")
        n_heads = {layer.n_heads for layer in self.layers}
        if len(n_heads) != 1:
            raise ValueError(f"attention layers have different head counts {sorted(n_heads)}")
        self.n_heads = n_heads.pop()
        self.per_example = per_example
        self._sums = torch.zeros(len(self.layers), self.n_heads, dtype=torch.float64)
        self._passes = torch.zeros(len(self.layers), dtype=torch.long)
        self._handles = []
        for index, layer in enumerate(self.layers):
            if getattr(layer.module, "_fedsparse_kept", None) is not None:
                raise ValueError(f"{layer.name}: heads were dropped; score the full model instead")
            self._handles.append(layer.o_module.register_forward_pre_hook(self._gate_hook(index, layer.head_dim)))

    def _gate_hook(self, index: int, head_dim: int):
        torch = self._torch

        def hook(module, args):
            if not torch.is_grad_enabled() or not args:
                return None
            x = args[0]
            lead = x.shape[:-1]
            if self.per_example:
                gate = torch.ones(lead[0], self.n_heads, dtype=x.dtype, device=x.device, requires_grad=True)
                g = gate.repeat_interleave(head_dim, dim=-1).reshape(lead[0], *([1] * (x.dim() - 2)), -1)
            else:
                gate = torch.ones(self.n_heads, dtype=x.dtype, device=x.device, requires_grad=True)
                g = gate.repeat_interleave(head_dim)

            def on_grad(grad, index=index):
                g_abs = grad.detach().abs().double().cpu()
                self._sums[index] += g_abs.sum(0) if g_abs.dim() == 2 else g_abs
                self._passes[index] += 1

            gate.register_hook(on_grad)
            return (x * g, *args[1:])

        return hook

    def scores(self, *, normalize: bool = False):
        """float32 [layers, heads]; zeros for layers no backward pass has reached."""
        out = self._sums / self._passes.clamp_min(1).unsqueeze(1).double()
        if normalize:
            out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return out.float()

    def reset(self) -> None:
        self._sums.zero_()
        self._passes.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

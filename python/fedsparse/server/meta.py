"""The payload metadata the server reads (docs/aggregation.md), and AggregationError.

    "client_id"     str or int       names the client in results and errors (default: its position)
    "num_examples"  number > 0       data size n_k: the default client weight (default 1)
    "round"         int              the round the update was trained in (recorded in the result)
    "branch"        str              architecture family, for method="multibranch" (default "default")
    "num_layers"    int              the client model's depth L, for proportional layer matching
                                     (default: 1 + the largest layer index among its shared tensors)
    "head_scores"   importance s_kh of each head, for method="headwise" (default 1), one of:
                    - a dict module name -> list of H floats (JSON); a tensor takes the entry of the
                      longest key that is its name or a dotted prefix of it;
                    - an array [H]: the same scores for every head-sparse tensor;
                    - an array [L, H]: row l for the tensors of layer l (the first integer path component
                      of the tensor name, e.g. "model.layers.3.self_attn.q_proj.lora_B.weight" -> 3).
    "head_scores/<module>"  array [H]: the scores of the tensors under <module> (arrays cannot nest in
                    JSON, so this is how per-module arrays travel); wins over "head_scores".
Scores must be finite and >= 0.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

_LAYER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


class AggregationError(ValueError):
    """Updates that cannot be aggregated together: mismatched tensors, bad weights or metadata, NaN.

    The message names the client (its client_id, or #position) and the tensor. Payloads that are
    malformed raise fedsparse.PayloadError instead, also naming the client.
    """

    def __init__(self, message: str, *, client=None, tensor: str | None = None):
        super().__init__(message)
        self.client = client
        self.tensor = tensor


def client_label(cid) -> str:
    return f"client {cid!r}"


def layer_index(name: str) -> int | None:
    """The first integer path component of a dotted tensor name, or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def replace_layer(name: str, new: int) -> str:
    """name with its first integer path component replaced by new."""
    m = _LAYER.search(name)
    if m is None:
        return name
    return name[:m.start(1)] + str(new) + name[m.end(1):]


def client_id(meta: Mapping, position: int):
    cid = meta.get("client_id", position)
    if isinstance(cid, np.ndarray) or not isinstance(cid, (str, int)) or isinstance(cid, bool):
        raise AggregationError(f"client #{position}: metadata client_id must be a string or an integer, "
                               f"got {cid!r}", client=position)
    return cid


def num_examples(meta: Mapping, cid) -> float:
    n = meta.get("num_examples", 1)
    if isinstance(n, np.ndarray) and n.size == 1:
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        raise AggregationError(f"{client_label(cid)}: metadata num_examples must be a finite number > 0, got {n!r}",
                               client=cid)
    return float(n)


def branch_of(meta: Mapping, cid) -> str:
    b = meta.get("branch", "default")
    if not isinstance(b, (str, int)) or isinstance(b, bool):
        raise AggregationError(f"{client_label(cid)}: metadata branch must be a string, got {b!r}", client=cid)
    return str(b)


def _prefix_match(keys, name: str):
    """The longest key that is name or a dotted prefix of it."""
    best = None
    for key in keys:
        if (name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def _check_scores(values, cid, name: str, n_heads: int, source: str) -> np.ndarray:
    try:
        s = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise AggregationError(f"{client_label(cid)}, tensor {name!r}: {source} is not an array of numbers",
                               client=cid, tensor=name) from None
    if s.size != n_heads:
        raise AggregationError(f"{client_label(cid)}, tensor {name!r}: {source} has {s.size} scores for "
                               f"{n_heads} heads", client=cid, tensor=name)
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise AggregationError(f"{client_label(cid)}, tensor {name!r}: {source} must be finite and >= 0",
                               client=cid, tensor=name)
    return s


def head_scores(meta: Mapping, cid, name: str, n_heads: int) -> np.ndarray | None:
    """float64[n_heads]: the client's importance scores of the heads of tensor `name`, or None (all 1)."""
    per_module = [k[len("head_scores/"):] for k in meta if k.startswith("head_scores/")]
    key = _prefix_match(per_module, name)
    if key is not None:
        return _check_scores(meta["head_scores/" + key], cid, name, n_heads, f"metadata 'head_scores/{key}'")
    scores = meta.get("head_scores")
    if scores is None:
        return None
    if isinstance(scores, Mapping):
        key = _prefix_match(list(scores), name)
        if key is None:
            return None
        return _check_scores(scores[key], cid, name, n_heads, f"metadata head_scores[{key!r}]")
    arr = np.asarray(scores, dtype=np.float64) if not isinstance(scores, np.ndarray) else scores
    if arr.ndim == 1:
        return _check_scores(arr, cid, name, n_heads, "metadata head_scores")
    if arr.ndim == 2:
        layer = layer_index(name)
        if layer is None:
            raise AggregationError(f"{client_label(cid)}, tensor {name!r}: head_scores is [layers, heads] but the "
                                   "tensor name has no layer index", client=cid, tensor=name)
        if layer >= arr.shape[0]:
            raise AggregationError(f"{client_label(cid)}, tensor {name!r}: layer {layer} is beyond the "
                                   f"{arr.shape[0]} rows of head_scores", client=cid, tensor=name)
        return _check_scores(arr[layer], cid, name, n_heads, f"metadata head_scores[{layer}]")
    raise AggregationError(f"{client_label(cid)}: metadata head_scores must be a dict, [H] or [layers, H], "
                           f"got an array of shape {arr.shape}", client=cid, tensor=name)

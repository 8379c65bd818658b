"""The one place the experiment reaches into the library's client and server parts.

Each function calls exactly the public API of its part. When a part is not importable, the call raises
NotImplementedError naming the missing API, so an arm that needs it stops with a clear message instead of
running on a stand-in.
"""
from __future__ import annotations

import importlib


def require(module: str, name: str):
    """fedsparse.<module>.<name>, or NotImplementedError saying which API is missing and why."""
    full = f"fedsparse.{module}"
    try:
        mod = importlib.import_module(full)
    except ImportError as exc:
        raise NotImplementedError(f"{full}.{name} is not available ({type(exc).__name__}: {exc}); "
                                  "this arm needs it") from exc
    try:
        return getattr(mod, name)
    except AttributeError:
        raise NotImplementedError(f"{full}.{name} is not available: {full} has no {name!r}; "
                                  "this arm needs it") from None


def available(module: str, name: str) -> bool:
    try:
        require(module, name)
    except NotImplementedError:
        return False
    return True


# ---- server ----------------------------------------------------------------------------------------------

def select_clients(stats, k, **kw):
    return require("server", "select_clients")(stats, k, **kw)


def aggregate(payloads, **kw):
    return require("server", "aggregate")(payloads, **kw)


# ---- client ----------------------------------------------------------------------------------------------

def patch(model, head_mask=None):
    """fedsparse.hf.patch: fedsparse attention + a HeadScorer (scores(), reset(), enabled)."""
    return require("hf", "patch")(model, head_mask=head_mask)


def choose_heads(scores, sparsity, *, scope="global"):
    return require("heads", "choose_heads")(scores, sparsity, scope=scope)


def prune(model, head_mask, mode):
    """fedsparse.peft_tools.prune -> HeadPruning (attach(optimizer), restore())."""
    return require("peft_tools", "prune")(model, head_mask, mode=mode)


def extract_update(model, head_mask):
    """fedsparse.peft_tools.extract_update -> (update, head_mask_by_module)."""
    return require("peft_tools", "extract_update")(model, head_mask)


def count_ops(model, batch):
    """fedsparse.opcount.count_ops -> OpCount (total, breakdown)."""
    return require("opcount", "count_ops")(model, batch)

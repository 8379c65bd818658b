"""fedsparse: compiled sparse adapter math for federated fine-tuning of large models.

Server side (numpy only): pack, unpack, aggregate, select_clients, choose_heads, HeadMask.
Client side (torch): fedsparse.ops, fedsparse.hf, fedsparse.peft_tools, count_ops (imported on first use).
"""
import importlib

from ._backend import has_native
from .error_feedback import ErrorFeedback
from .errors import PackError, PayloadError
from .heads import HeadMask, choose_heads
from .pack import pack
from .server import AggregateResult, AggregationError, aggregate, select_clients
from .unpack import PackedUpdate, unpack

__version__ = "0.1.0"

# Torch-dependent parts load on first use, so that `import fedsparse` works on a server without torch.
_LAZY_MODULES = {"ops", "hf", "peft_tools"}
_LAZY_NAMES = {"count_ops": "fedsparse.opcount", "OpCount": "fedsparse.opcount"}


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"fedsparse.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'fedsparse' has no attribute {name!r}")


__all__ = ["AggregateResult", "AggregationError", "ErrorFeedback", "HeadMask", "OpCount", "PackError",
           "PackedUpdate", "PayloadError", "aggregate", "choose_heads", "count_ops", "has_native", "hf", "ops",
           "pack", "peft_tools", "select_clients", "unpack", "__version__"]

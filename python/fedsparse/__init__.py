"""fedsparse: compiled sparse adapter math for federated fine-tuning of large models."""
from ._backend import has_native
from .errors import PackError, PayloadError

__version__ = "0.1.0"

__all__ = ["PackError", "PayloadError", "has_native", "__version__"]

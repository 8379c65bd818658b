"""fedsparse: compiled sparse adapter math for federated fine-tuning of large models."""
from ._backend import has_native
from .errors import PackError, PayloadError
from .error_feedback import ErrorFeedback
from .pack import pack
from .unpack import PackedUpdate, unpack

__version__ = "0.1.0"

__all__ = ["ErrorFeedback", "PackError", "PackedUpdate", "PayloadError", "has_native", "pack", "unpack",
           "__version__"]

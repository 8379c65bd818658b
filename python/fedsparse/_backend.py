"""Loads the native module fedsparse._C and says, once, why it is missing when it is.

FEDSPARSE_BACKEND=reference forces the plain numpy/torch reference path (for tests and benchmarks).
"""
from __future__ import annotations

import os
import warnings

native = None
native_error: str | None = None

if os.environ.get("FEDSPARSE_BACKEND", "").lower() == "reference":
    native_error = "disabled by FEDSPARSE_BACKEND=reference"
else:
    try:
        from . import _C as native  # noqa: F811
    except ImportError as exc:  # a source checkout without a build, or a broken wheel
        native_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"fedsparse: native kernels unavailable ({native_error}); using the slower reference path. "
            "Reinstall with `pip install fedsparse` (or `pip install .` in a checkout) to build them.",
            RuntimeWarning,
            stacklevel=2,
        )


def has_native() -> bool:
    return native is not None

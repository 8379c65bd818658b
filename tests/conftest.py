import os

# Triton runs on CPU only through its interpreter, and that must be chosen before any kernel is defined.
# On a machine with a GPU, FEDSPARSE_TRITON_REAL=1 runs the kernels for real.
if os.environ.get("FEDSPARSE_TRITON_REAL") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""The package as a user meets it: import without the native module, `fedsparse info`, the CLI."""
import subprocess
import sys
import textwrap

import fedsparse

BLOCK_NATIVE = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED:
                raise ImportError(f"blocked for the test: {name}")
    sys.meta_path.insert(0, Block())
""")


def run_python(code: str, blocked=()) -> subprocess.CompletedProcess:
    src = f"BLOCKED = {tuple(blocked)!r}\n" + BLOCK_NATIVE + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-W", "default", "-c", src], capture_output=True, text=True, timeout=120)


def test_import_falls_back_to_reference_and_says_so_once():
    proc = run_python("""
        import numpy as np
        import fedsparse, fedsparse.pack, fedsparse.unpack
        assert not fedsparse.has_native()
        x = np.arange(100, dtype=np.float32)
        p = fedsparse.pack({"w": x}, bits=8)
        assert np.abs(fedsparse.unpack(p)["w"] - x).max() < 0.5
        print(len(p))
    """, blocked=("fedsparse._C",))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("native kernels unavailable") == 1
    assert "pip install" in proc.stderr
    if fedsparse.has_native():  # the reference path writes the very same bytes
        import numpy as np
        assert int(proc.stdout) == len(fedsparse.pack({"w": np.arange(100, dtype=np.float32)}, bits=8))


def test_wire_format_needs_no_torch():
    proc = run_python("""
        import numpy as np, fedsparse, sys
        p = fedsparse.pack({"w": np.ones((4, 8), np.float32)}, head_mask=None, bits=4)
        assert fedsparse.unpack(p)["w"].shape == (4, 8)
        assert "torch" not in sys.modules
    """, blocked=("torch",))
    assert proc.returncode == 0, proc.stderr


def test_info_command_lists_backends():
    proc = subprocess.run([sys.executable, "-m", "fedsparse", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"fedsparse {fedsparse.__version__}" in out
    for backend in ("native CPU (C++)", "Triton", "CUDA C++"):
        assert backend in out
    assert "[x] native CPU" in out if fedsparse.has_native() else "[ ] native CPU" in out


def test_info_says_why_native_is_missing():
    proc = run_python("""
        import sys
        from fedsparse.cli import main
        sys.exit(main(["info"]))
    """, blocked=("fedsparse._C",))
    assert proc.returncode == 0, proc.stderr
    assert "[ ] native CPU (C++): ImportError: blocked for the test" in proc.stdout


def test_cli_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "fedsparse", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("info", "pack-demo", "run"):
        assert cmd in proc.stdout

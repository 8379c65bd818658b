#!/usr/bin/env bash
# Build a wheel from a clean clone of HEAD, install it into a fresh venv, and run an import smoke test.
# Usage: bash scripts/wheel_smoke.sh [workdir]
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=${1:-$(mktemp -d)}
rm -rf "$work/src" "$work/venv" "$work/wheelhouse"
git clone -q "$repo" "$work/src"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
( cd "$work/src" && "$work/venv/bin/pip" wheel -q . --no-deps -w "$work/wheelhouse" )
"$work/venv/bin/pip" install -q "$work"/wheelhouse/fedsparse-*.whl
cd "$work"  # away from the source tree: import the installed wheel
"$work/venv/bin/python" - <<'PY'
import numpy as np, fedsparse, fedsparse.kernels
assert fedsparse.has_native(), "the wheel's native module did not load"
x = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
p = fedsparse.pack({"m.q.lora_B.weight": x}, head_mask={"m.q": np.arange(12) < 3}, bits=4)
y = fedsparse.unpack(p)["m.q.lora_B.weight"]
assert y.shape == x.shape and not y[24:].any()
print("wheel smoke test ok:", fedsparse.__version__, len(p), "bytes;", fedsparse._C.build_info())
PY
"$work/venv/bin/fedsparse" info
ls -la "$work"/wheelhouse

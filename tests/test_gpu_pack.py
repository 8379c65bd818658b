"""The device path of pack/unpack (Triton kernels) against the native/reference bytes.

Without a GPU the same functions run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from fedsparse import gpu_pack, pack, unpack  # noqa: E402
from fedsparse.sparsity import KIND_DENSE, KIND_ELEMENTS, KIND_HEAD_COLS, KIND_HEAD_ROWS, kept_count  # noqa: E402
from fedsparse.wire import values_nbytes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    ("dense", (37, 5), KIND_DENSE, None),
    ("rows", (96, 8), KIND_HEAD_ROWS, np.isin(np.arange(12), [0, 5, 11])),
    ("cols", (8, 96), KIND_HEAD_COLS, np.isin(np.arange(12), [3])),
    ("none kept", (96, 8), KIND_HEAD_ROWS, np.zeros(12, bool)),
    ("elements", (9, 7), KIND_ELEMENTS, np.random.default_rng(0).random(63) < 0.3),
]


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_device_encode_matches_host_bytes(case, bits):
    _, shape, kind, mask = case
    x = np.random.default_rng(bits).standard_normal(shape).astype(np.float32)
    head_mask = {"m.q" if kind == KIND_HEAD_ROWS else "m.o_proj": mask} if kind in (KIND_HEAD_ROWS, KIND_HEAD_COLS) else None
    name = ("m.q.lora_B.weight" if kind == KIND_HEAD_ROWS else "m.o_proj.lora_A.weight") if head_mask else "w"
    host = pack({name: x}, bits=bits, group_size=16, head_mask=head_mask,
                topk=0.3 if kind == KIND_ELEMENTS else None)
    layout = unpack(host).layout
    e = layout.entries[0]
    if kind == KIND_ELEMENTS:
        mask = unpack(host).element_masks[name]
    out = np.empty(values_nbytes(kept_count(shape, kind, mask), bits, 16), np.uint8)
    status = gpu_pack.encode_values(torch.from_numpy(x).to(DEVICE), kind, mask, bits, 16, False, 0, False, out)
    assert status == gpu_pack.STATUS_OK
    assert out.tobytes() == bytes(host[e.data_offset:e.data_offset + e.data_nbytes])
    dec = gpu_pack.decode_entry(memoryview(host), e, 16, DEVICE)
    np.testing.assert_array_equal(dec.cpu().numpy(), unpack(host)[name])


def test_device_nonfinite_and_overflow_status():
    out = np.empty(values_nbytes(3, 8, 16), np.uint8)
    x = torch.tensor([1.0, float("nan"), 2.0], device=DEVICE)
    assert gpu_pack.encode_values(x, KIND_DENSE, None, 8, 16, False, 0, False, out) == gpu_pack.STATUS_NONFINITE
    assert gpu_pack.encode_values(x, KIND_DENSE, None, 8, 16, False, 0, True, out) == gpu_pack.STATUS_OK
    ref = pack({"w": x.cpu().numpy()}, bits=8, group_size=16, nan="zero")
    assert out.tobytes() == ref[-4 - out.size:-4]
    big = np.empty(2, np.uint8)
    assert gpu_pack.encode_values(torch.tensor([1e6], device=DEVICE), KIND_DENSE, None, 16, 16, False, 0, False,
                                  big) == gpu_pack.STATUS_F16_OVERFLOW


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pack_of_cuda_tensors_equals_pack_of_host_arrays():
    x = torch.randn(96, 8, device="cuda")
    kw = dict(bits=4, head_mask={"m.q": np.arange(12) < 4})
    assert pack({"m.q.lora_B.weight": x}, **kw) == pack({"m.q.lora_B.weight": x.cpu().numpy()}, **kw)
    u = unpack(pack({"w": x}, bits=8))
    assert torch.equal(u.torch("w", device="cuda").cpu(), torch.from_numpy(u["w"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cpp_backend_writes_the_same_bytes(monkeypatch):
    from fedsparse import _cuda

    if not _cuda.available():
        pytest.skip("CUDA C++ kernels not built or the driver is too old")
    x = torch.randn(96, 8, device="cuda")
    kw = dict(bits=4, head_mask={"m.q": np.arange(12) < 4})
    triton_bytes = pack({"m.q.lora_B.weight": x}, **kw)
    monkeypatch.setenv("FEDSPARSE_GPU_BACKEND", "cuda")
    assert gpu_pack.use_cuda_cpp()
    assert pack({"m.q.lora_B.weight": x}, **kw) == triton_bytes
    u = unpack(triton_bytes)
    assert torch.equal(u.torch("m.q.lora_B.weight", device="cuda").cpu(), torch.from_numpy(u["m.q.lora_B.weight"]))

"""The native CRC-32 (carry-less-multiply folding, and its table fallback) against zlib."""
import zlib

import numpy as np
import pytest

import fedsparse

pytestmark = pytest.mark.skipif(not fedsparse.has_native(), reason="native module not built")


@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 63, 64, 65, 79, 80, 127, 128, 129, 511, 512, 513, 767, 768, 784, 1000, 1023,
                               4096, 4111, 65537, 1 << 20])
def test_matches_zlib(n):
    from fedsparse import _C

    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert _C.crc32(data) == zlib.crc32(data)
    assert _C.crc32_portable(data) == zlib.crc32(data)


def test_offsets_and_patterns():
    from fedsparse import _C

    base = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for start in range(0, 40, 3):
        for end in (start + 64, start + 200, 5000):
            chunk = memoryview(base)[start:end]
            assert _C.crc32(chunk) == zlib.crc32(chunk)
    for pattern in (b"\0" * 4096, b"\xff" * 4096):
        assert _C.crc32(pattern) == zlib.crc32(pattern)

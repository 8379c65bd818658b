"""Error feedback: keep what quantization (and sparsification) dropped on the client, send it next round."""
from __future__ import annotations

import numpy as np

from .pack import _as_float32, pack
from .unpack import unpack


class ErrorFeedback:
    """Wraps pack(): each call adds the residual of the previous rounds, then keeps the new residual.

    >>> ef = ErrorFeedback()
    >>> payload = ef.pack(update, bits=4)      # update + residual, packed
    >>> ef.residual                            # name -> float32 array: (update + residual) - decoded

    Over rounds the sum of what was sent tracks the sum of the true updates to within one round's error.
    """

    def __init__(self):
        self.residual: dict[str, np.ndarray] = {}

    def pack(self, update, **pack_kwargs) -> bytes:
        corrected = {}
        for name, value in update.items():
            x, _ = _as_float32(name, value)
            r = self.residual.get(name)
            corrected[name] = x + r if r is not None and r.shape == x.shape else x
        payload = pack(corrected, **pack_kwargs)
        sent = unpack(payload)
        self.residual = {name: corrected[name] - sent[name] for name in corrected}
        return payload

    def reset(self) -> None:
        self.residual.clear()

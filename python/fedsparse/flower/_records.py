"""How fedsparse payloads ride in Flower's records (both directions), and the keys both sides agree on.

A payload travels as one flwr `Array` whose `data` is the payload bytes, untouched: dtype "uint8", shape
(len,), stype "fedsparse" (not "numpy.ndarray", so no .npy header is added and `Array.numpy()` refuses it).

    server -> client   RecordDict {"fedsparse": ArrayRecord {"global/<branch>": Array, ...},
                                   "config": ConfigRecord {"server-round": r, ...}}
    client -> server   RecordDict {"fedsparse": ArrayRecord {"update": Array},
                                   "metrics": MetricRecord {"num-examples": n, ["global-loss", "local-loss"], ...}}

The downlink carries one payload per branch the server knows the client is in; a client whose branch the
server does not know yet gets every branch's payload and picks its own.
"""
from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict

RECORD_KEY = "fedsparse"
UPDATE_KEY = "update"
GLOBAL_PREFIX = "global/"
DEFAULT_BRANCH = "default"
STYPE = "fedsparse"
NUM_EXAMPLES = "num-examples"
GLOBAL_LOSS = "global-loss"
LOCAL_LOSS = "local-loss"


def payload_array(payload) -> Array:
    """A flwr Array carrying the payload bytes as they are."""
    data = bytes(payload)
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def array_payload(array: Array) -> bytes:
    """The payload bytes of an Array built by payload_array (ValueError for any other Array)."""
    if not isinstance(array, Array) or array.stype != STYPE:
        kind = array.stype if isinstance(array, Array) else type(array).__name__
        raise ValueError(f"not a fedsparse payload array (stype {kind!r}, expected {STYPE!r})")
    return array.data


def global_record(payloads: dict) -> ArrayRecord:
    """branch -> payload bytes  ->  the downlink ArrayRecord."""
    return ArrayRecord({GLOBAL_PREFIX + str(b): payload_array(p) for b, p in payloads.items()})


def global_payloads(record: ArrayRecord) -> dict:
    """The downlink ArrayRecord -> branch -> payload bytes."""
    return {k[len(GLOBAL_PREFIX):]: array_payload(a) for k, a in record.items() if k.startswith(GLOBAL_PREFIX)}


def update_payload(content: RecordDict) -> bytes:
    """The uplink payload of a reply's content (KeyError naming what is missing)."""
    if RECORD_KEY not in content.array_records:
        raise KeyError(f"reply has no {RECORD_KEY!r} ArrayRecord (is the client using fedsparse.flower?)")
    record = content.array_records[RECORD_KEY]
    if UPDATE_KEY not in record:
        raise KeyError(f"reply's {RECORD_KEY!r} ArrayRecord has no {UPDATE_KEY!r} payload")
    return array_payload(record[UPDATE_KEY])


def record_nbytes(content: RecordDict) -> int:
    """Bytes of the fedsparse payloads in a message's content (what fedsparse put on the wire)."""
    if RECORD_KEY not in content.array_records:
        return 0
    return sum(len(a.data) for a in content.array_records[RECORD_KEY].values())

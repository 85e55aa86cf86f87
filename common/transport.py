"""How weights travel between the server and the sites (run-config ``transport-dtype``).

``float32``: every array as it is, both ways.

``float16`` (half the bytes on the wire): the server sends its float32 weights rounded to float16; a site
trains in float32 from those weights and sends back its *update* (trained - received) in float16; the
server adds each update to its own float32 weights before screening and aggregation. The server's weights
never pass through float16, and an update is small, so float16's 11-bit mantissa costs it little (a
relative error of 2^-11 per value). A site's integer arrays (BatchNorm's ``num_batches_tracked``) travel
as they are; the server's copy of that counter is a float after Flower's averaging, and goes out in float16
like the rest (exact up to 2048; BatchNorm with momentum, as Med3D's, never reads it). An update beyond float16's range (65504) is refused at the site with a message, never sent as inf.

Plain NumPy here; client/ and server/ wrap it around Flower's ArrayRecords. :func:`content_bytes` sizes a
message's content as Flower counts it (the sites' audit log and the server's ``received_bytes`` per round).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["to_wire", "from_wire", "encode_update", "decode_update", "FLOAT16_MAX", "record_bytes", "content_bytes"]

FLOAT16_MAX = float(np.finfo(np.float16).max)


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def to_wire(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The server's weights as sent under float16: floating arrays rounded to float16, others unchanged."""
    return {k: (v.astype(np.float16) if _floating(v) else v) for k, v in weights.items()}


def from_wire(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a site trains from: float16 arrays widened to float32, others unchanged."""
    return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in arrays.items()}


def encode_update(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's reply under float16: ``trained - received`` in float16 for floating arrays, integer arrays as
    trained. ``received`` is what the site trained from (:func:`from_wire` of the message).

    Raises:
        ValueError: an update value beyond float16's range (names the array and the fix).
    """
    out = {}
    for name, value in trained.items():
        if not _floating(value):
            out[name] = value
            continue
        delta = value.astype(np.float32) - received[name].astype(np.float32)
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        if not peak <= FLOAT16_MAX:  # also NaN
            raise ValueError(f"transport-dtype float16: the update of {name} reaches {peak:.3g}, beyond float16's "
                             f"range ({FLOAT16_MAX:.0f}); lower lr, or run with transport-dtype = 'float32'")
        out[name] = delta.astype(np.float16)
    return out


def decode_update(update: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | str:
    """The site's trained weights, rebuilt on the server: ``weights`` (the float32 weights sent this round)
    plus each float16 update, widened to float32; integer arrays as sent. Returns the reason instead when
    the reply is not a float16 update of these weights (the server then rejects it, as any bad reply);
    keys and shapes are left to the reply screening that follows.
    """
    out = {}
    for name, value in update.items():
        base = weights.get(name)
        # integer arrays are whole values: BatchNorm's counter, an int at the site even when the server's copy
        # became a float (Flower's average of an integer array is a float)
        if base is None or not _floating(base) or not _floating(value):
            out[name] = value
            continue
        if value.dtype != np.float16:
            return (f"array {name!r} came as {value.dtype}, not a float16 update (transport-dtype = 'float16'); "
                    "the site runs another fedpd version")
        if value.shape != base.shape:
            out[name] = value  # the screening names the shape
            continue
        out[name] = base.astype(np.float32) + value.astype(np.float32)
    return out


def _value_bytes(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    return 1 if isinstance(value, bool) else 8  # as Flower counts them: bool 1 byte, int/float 8


def record_bytes(record) -> int:
    """A Flower record's size as its ``count_bytes`` gives it, or counted here where that raises: Flower 1.42's
    ``ConfigRecord.count_bytes`` refuses an empty ``bytes``/``str`` value (ValueError) and an empty list
    (IndexError), which SecAgg+'s messages carry. Sizing a message must never be what fails it."""
    try:
        return record.count_bytes()
    except (ValueError, IndexError):
        return sum(len(str(k).encode("utf-8")) + _value_bytes(v) for k, v in record.items())


def content_bytes(content) -> int:
    """The bytes of a message's content (a Flower ``RecordDict``): the sum of its records' sizes."""
    return sum(record_bytes(record) for record in content.values())

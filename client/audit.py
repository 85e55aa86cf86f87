"""Audit of what a site sends: a ClientApp mod that writes one JSON line per outgoing message.

Off by default. Set ``FEDPD_AUDIT_LOG=/path/audit.jsonl`` in the environment of the SuperNode (the
ClientApp processes it starts inherit it) and every reply this site sends is described in that file:
record names and types, the bytes of the content (``content_bytes``; arrays: ``bytes``), for arrays their
keys, shapes and dtypes (never the values), for metrics and configs every key with its value type and value. A site's IT can read it to check that only model
weights and aggregate numbers leave the site (DESIGN.md, user 4).

Several ClientApp processes may append to one file: each line is written with a single ``write`` on a
file opened with ``O_APPEND``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from common.transport import content_bytes, record_bytes

__all__ = ["AUDIT_ENV", "audit_mod", "describe_message"]

AUDIT_ENV = "FEDPD_AUDIT_LOG"


def _value(value: Any) -> dict:
    """Type and value of a metric/config entry; bytes are described by their length only."""
    if isinstance(value, (bytes, bytearray)):
        return {"type": "bytes", "length": len(value)}
    if isinstance(value, list):
        items = sorted({type(v).__name__ for v in value})
        return {"type": f"list[{'|'.join(items)}]", "length": len(value),
                "value": [_value(v).get("value") for v in value]}
    if isinstance(value, float) and not math.isfinite(value):  # strict JSON has no NaN/Infinity
        return {"type": "float", "value": None, "non_finite": repr(value)}
    return {"type": type(value).__name__, "value": value}


def describe_message(msg: Message) -> dict:
    """What a message carries, as plain JSON-able data (array values left out)."""
    out: dict[str, Any] = {
        "time": time.time(),
        "message_type": msg.metadata.message_type,
        "run_id": msg.metadata.run_id,
        "src_node_id": msg.metadata.src_node_id,
        "dst_node_id": msg.metadata.dst_node_id,
        "reply_to_message_id": msg.metadata.reply_to_message_id,
    }
    if msg.has_error():
        out["error"] = {"code": msg.error.code, "reason": msg.error.reason}
        return out
    records = {}
    out["content_bytes"] = content_bytes(msg.content)
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            records[name] = {"type": "ArrayRecord", "bytes": record_bytes(record), "arrays": {
                key: {"shape": list(array.shape), "dtype": array.dtype, "stype": array.stype}
                for key, array in record.items()}}
        elif isinstance(record, MetricRecord):
            records[name] = {"type": "MetricRecord", "metrics": {key: _value(v) for key, v in record.items()}}
        elif isinstance(record, ConfigRecord):
            records[name] = {"type": "ConfigRecord", "config": {key: _value(v) for key, v in record.items()}}
        else:  # a record type this audit does not know yet: say so rather than skip it
            records[name] = {"type": type(record).__name__}
    out["records"] = records
    return out


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower ClientApp mod: pass the message on; if ``FEDPD_AUDIT_LOG`` is set, log the reply sent.

    A handler that raises is answered by Flower itself with an error reply whose reason is the exception's
    type and text (``flwr/supernode/runtime/run_clientapp.py``); that reason is logged here too, in the
    same form, and the exception is re-raised unchanged.
    """
    target = os.environ.get(AUDIT_ENV, "").strip()
    try:
        reply = call_next(msg, context)
    except Exception as ex:
        if target:
            entry = {"time": time.time(), "message_type": msg.metadata.message_type, "run_id": msg.metadata.run_id,
                     "reply_to_message_id": msg.metadata.message_id, "node_id": context.node_id,
                     "received_type": msg.metadata.message_type,
                     "error": {"raised": True, "reason": str(type(ex)) + ":<'" + str(ex) + "'>"}}
            _append_line(Path(target).expanduser(), json.dumps(entry, allow_nan=False, sort_keys=True) + "\n")
        raise
    if target:
        entry = describe_message(reply) | {"node_id": context.node_id, "received_type": msg.metadata.message_type}
        _append_line(Path(target).expanduser(), json.dumps(entry, allow_nan=False, sort_keys=True) + "\n")
    return reply

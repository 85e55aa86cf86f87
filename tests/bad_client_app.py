"""A deliberately bad ClientApp, for tests only: never part of the fedpd app or its FAB.

It runs fedpd's own ``train`` and ``evaluate`` handlers and then, on a SuperNode started with
``--node-config "... bad-update='<mode>'"``, spoils the training reply the way a broken or malicious
site could. Without that key it behaves exactly like ``client.app``. tests/test_faults.py ships it in
an app folder of its own (a copy of our packages plus this module as the ClientApp component), because
every SuperNode of a run executes the same FAB.

Modes: ``nan`` (one weight becomes NaN), ``inf`` (a whole tensor becomes +Inf), ``shape`` (one tensor
gets a wrong shape), ``keys`` (one tensor is left out), ``num-examples`` (the sample count is inflated a
thousandfold, far beyond the site's own class counts).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from client import app as fedpd_client
from common import keys

app = ClientApp()


def spoil(reply: Message, mode: str) -> Message:
    """Change a well-formed training reply in place according to ``mode``; returns it."""
    arrays = reply.content[keys.ARRAYS]
    name = next(k for k, a in arrays.items() if np.dtype(a.dtype).kind == "f")  # the first float tensor
    value = arrays[name].numpy().copy()
    if mode == "nan":
        value.flat[0] = np.nan
        arrays[name] = Array(value)
    elif mode == "inf":
        arrays[name] = Array(np.full_like(value, np.inf))
    elif mode == "shape":
        arrays[name] = Array(value.reshape(-1)[:-1].copy())
    elif mode == "keys":
        del arrays[name]
    elif mode == "num-examples":
        metrics = reply.content[keys.METRICS]
        metrics[keys.NUM_EXAMPLES] = int(metrics[keys.NUM_EXAMPLES]) * 1000
    else:
        raise ValueError(f"bad-update={mode!r}: choose nan, inf, shape, keys or num-examples")
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = fedpd_client.train(msg, context)
    mode = str(context.node_config.get("bad-update", "")).strip()
    return spoil(reply, mode) if mode else reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedpd_client.evaluate(msg, context)

"""ClientApp: local fine-tuning with class balancing, local validation. Only weights and scalars leave.

This module is the thin part a deployed ``flwr-clientapp`` process imports: Flower, numpy and fedpd's mods,
never torch or MONAI. The handlers (client/handlers.py) run in the site worker (client/worker.py) in a
deployment, in this process in a simulation or with ``site-worker='false'``.
"""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod, message_size_mod
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_RECORD
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import worker
from client.audit import audit_mod
from client.process import run_config, startup_seconds
from common import keys
from common.transport import encode_update, from_wire

# audit_mod does nothing unless FEDPD_AUDIT_LOG is set on the SuperNode (client/audit.py); size_mod and
# transport_mod (defined below) nothing unless the run-config asks for them
app = ClientApp(mods=[audit_mod])


def secure_aggregation_mod(msg: Message, context: Context, call_next):
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its stage record); any other
    message goes straight on."""
    if SECAGG_RECORD in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def size_mod(msg: Message, context: Context, call_next):
    """Flower's ``message_size_mod`` (the size of each message in and out, in the SuperNode's log) when the
    run-config asks for it (``log-message-size``). Outermost: it sees the messages as they travel."""
    if run_config(context).log_message_size:
        return message_size_mod(msg, context, call_next)
    return call_next(msg, context)


def _array_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))


def transport_mod(msg: Message, context: Context, call_next):
    """``transport-dtype = 'float16'`` (common/transport.py): the server's float16 weights are widened to
    float32 before anything else sees them, and a training reply's weights are replaced by the float16 update
    (trained - received). The DP clipping mod inside it clips the float32 update as in any other run."""
    if (run_config(context).transport_dtype == "float32"
            or keys.ARRAYS not in msg.content.array_records):
        return call_next(msg, context)
    received = from_wire({k: v.numpy() for k, v in msg.content[keys.ARRAYS].items()})
    msg.content[keys.ARRAYS] = _array_record(received)
    reply = call_next(msg, context)
    if not reply.has_error() and keys.ARRAYS in reply.content.array_records:
        trained = {k: v.numpy() for k, v in reply.content[keys.ARRAYS].items()}
        reply.content[keys.ARRAYS] = _array_record(encode_update(trained, received))
    return reply


def dp_clipping_mod(msg: Message, context: Context, call_next):
    """Flower's client-side DP clipping, when the server asked for it: ``fixedclipping_mod`` or
    ``adaptiveclipping_mod`` clip this site's update (the server's DifferentialPrivacyClientSide* wrapper puts
    the clipping norm into the train config, and adds the noise). Runs nothing extra otherwise."""
    config = msg.content.config_records.get(keys.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    cfg = run_config(context)
    clip = adaptiveclipping_mod if cfg.dp == "client-adaptive" else fixedclipping_mod
    return clip(msg, context, call_next)


@app.train(mods=[size_mod, transport_mod, secure_aggregation_mod, dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Fine-tune on this site's ``train`` rows for ``local-epochs``; reply weights + counts + loss
    (client/handlers.py ``train``, in the site worker or here)."""
    return worker.call("train", msg, context, startup_seconds())


@app.evaluate(mods=[size_mod, transport_mod])
def evaluate(msg: Message, context: Context) -> Message:
    """Aggregate metrics of the global model on this site's ``val`` rows (client/handlers.py ``evaluate``)."""
    return worker.call("evaluate", msg, context, startup_seconds())

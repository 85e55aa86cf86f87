"""The site worker: one long-lived process per deployed site that keeps torch, MONAI, the model and the
volume cache warm between the messages of a federation.

Why: Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (FLOWER.md §3). Importing torch
and MONAI alone takes ~7 s on an idle 2-core machine, twice a round (train, evaluate), more when a machine is
busy. With the worker, the ``flwr-clientapp`` process stays thin (Flower, numpy and fedpd's mods: no torch,
no MONAI) and hands each training or evaluation to the worker; the worker runs the very same handlers
(client/handlers.py) a simulation or a worker-less ClientApp runs in-process.

Lifetime. The first message of a site starts its worker (``python -m client.worker``, from the same app
folder and interpreter as the ClientApp) and waits until it listens; later messages find it by its socket.
The worker exits when its SuperNode's process (the ClientApp's parent, Flower's SuperExec) is gone (checked
twice a second, so a stopped or killed site leaves no training behind), when it is signalled (SIGTERM,
SIGINT, SIGHUP: it shares the SuperNode's process group, so stopping the group or Ctrl-C stops it), or after
``site-worker-idle`` seconds without a message; each way it removes its socket, lock and log. A worker
killed outright (SIGKILL, a crash) cannot: the next worker started on the machine removes its socket and lock
and, after 7 days, its log. A new app version (another FAB), interpreter or node-config means another
socket, hence another worker. A worker that dies mid-message fails that message with its log's last lines,
as a ClientApp exception would; the next message starts a new one.

Security. The socket lies in a folder only this user may enter (``$TMPDIR/fedpd-<uid>``, mode 0700, refused
if anyone else owns it or may enter), is itself 0600, and the worker answers only processes of its own user
(the kernel's peer credentials). What crosses it is Flower's own protobuf encoding of the message (its
metadata and records), the Context and the reply, except that arrays travel as their own bytes (Flower's
``Array.data``, the same bytes its protobuf would carry) with their key, dtype, shape and stype in a JSON
header: nothing is unpickled, nothing executed.

A site turns it off with ``--node-config "... site-worker='false'"``: every message then runs in its own
ClientApp process, as Flower intends. A simulation never uses it (its Ray actors already persist).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.app.message import make_message
from flwr.common import log
from flwr.common.serde import (context_from_proto, context_to_proto, message_from_proto, message_to_proto,
                               recorddict_from_proto, recorddict_to_proto)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from common import keys
from common.errors import ConfigError

__all__ = ["call", "remote", "wanted", "serve", "socket_path", "PROTOCOL"]

PROTOCOL = 2  # bumped whenever the frames below change; part of the socket's name
APP_DIR = Path(__file__).resolve().parents[1]  # the folder holding client/ and common/ (a FAB's install folder)
DEFAULT_IDLE = 900.0  # seconds without a message after which a worker exits
START_LIMIT = 600.0  # seconds a ClientApp waits for a new worker to listen (its imports, on a busy machine)
KEEP_LOGS = 7 * 24 * 3600.0  # seconds a dead worker's log is kept (it explains the message that failed)
ACCEPTED = b"\x01"  # the worker's first byte: it read the whole request and starts on it
_LEN = struct.Struct(">Q")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_EXCEPTIONS = {"builtins", "common.errors"}  # modules a worker's exception may be rebuilt from


# --- whether to use it --------------------------------------------------------------------------------


def wanted(context: Context) -> bool:
    """Whether this message goes to the site worker: in a deployed ``flwr-clientapp`` process (one process per
    message), unless the site's node-config says ``site-worker='false'``."""
    node = context.node_config
    value = str(node.get(keys.NODE_SITE_WORKER, "true")).strip().lower()
    if value not in _TRUE | _FALSE:
        raise ConfigError(f"node-config {keys.NODE_SITE_WORKER}={value!r}: choose 'true' (the default) or 'false'")
    if keys.NODE_PARTITION_ID in node or Path(sys.argv[0]).name != "flwr-clientapp":
        return False  # a simulation's actors, or a test calling the handlers, already keep everything warm
    return value in _TRUE


def _idle_seconds(context: Context) -> float:
    raw = context.node_config.get(keys.NODE_SITE_WORKER_IDLE, DEFAULT_IDLE)
    try:
        idle = float(raw)
    except (TypeError, ValueError):
        idle = -1.0
    if not idle > 0:
        raise ConfigError(f"node-config {keys.NODE_SITE_WORKER_IDLE}={raw!r}: give the seconds a site worker waits "
                          f"for the next message before it exits (a number > 0; default {DEFAULT_IDLE:g})")
    return idle


# --- frames: each part is its length (8 bytes, big-endian) and its bytes ------------------------------


def _send(conn: socket.socket, *parts: bytes) -> None:
    for part in parts:
        conn.sendall(_LEN.pack(len(part)))
        conn.sendall(part)


def _exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if not k:
            raise EOFError(f"the connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _receive(conn: socket.socket, count: int) -> list[bytes]:
    return [_exactly(conn, _LEN.unpack(_exactly(conn, _LEN.size))[0]) for _ in range(count)]


def _receive_framed(conn: socket.socket) -> tuple[dict, list[bytes]]:
    """A JSON header frame, then the ``frames`` more frames it announces."""
    head = json.loads(_receive(conn, 1)[0])
    return head, _receive(conn, int(head.get("frames", 0)))


# --- records: arrays as their own frames, the rest as Flower's protobuf -------------------------------


def _pack(content: RecordDict) -> tuple[dict, list[bytes]]:
    """A RecordDict as an index (JSON) and frames: one protobuf frame with every record but the ArrayRecords,
    then each array's bytes as they are. Flower's protobuf encoding copies a 57 MB model 4-5 times on its way
    to bytes (about 0.5 s; ``benchmarks/handover.py``); an array's ``data`` is sent without a copy."""
    rest, order, arrays, frames = RecordDict(), [], {}, []
    for name, record in content.items():
        order.append(name)
        if isinstance(record, ArrayRecord):
            arrays[name] = [[key, a.dtype, list(a.shape), a.stype] for key, a in record.items()]
            frames += [a.data for a in record.values()]
        else:
            rest[name] = record
    return {"order": order, "arrays": arrays}, [recorddict_to_proto(rest).SerializeToString(), *frames]


def _unpack(index: dict, frames: list[bytes]) -> RecordDict:
    """The RecordDict :func:`_pack` made ``index`` and ``frames`` of: the same records in the same order, the
    same arrays (keys, order, dtype, shape, stype, bytes)."""
    rest = recorddict_from_proto(ProtoRecordDict.FromString(frames[0]))
    data = iter(frames[1:])
    records = {name: ArrayRecord(array_dict={key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=next(data))
                                             for key, dtype, shape, stype in items}, keep_input=False)
               for name, items in index["arrays"].items()}
    out = RecordDict()
    for name in index["order"]:
        out[name] = records[name] if name in records else rest[name]
    return out


# --- where a site's worker listens --------------------------------------------------------------------


def _folder() -> Path:
    """``$TMPDIR/fedpd-<uid>``: made 0700 if new; refused if another user owns it or may enter it."""
    folder = Path(tempfile.gettempdir()) / f"fedpd-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        raise ConfigError(f"site worker: cannot make its folder {folder} ({exc}); fix the permissions of "
                          f"{folder.parent}, or start the SuperNode with --node-config \"... "
                          f"{keys.NODE_SITE_WORKER}='false'\"") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"site worker: {folder} is not a folder of this user's alone (owner uid {info.st_uid}, "
                          f"mode {stat.S_IMODE(info.st_mode):o}); remove it (it is made again, 0700), or start the "
                          f"SuperNode with --node-config \"... {keys.NODE_SITE_WORKER}='false'\"")
    return folder


def socket_path(node_config, owner: int) -> Path:
    """The socket of the worker that serves this app version, interpreter, site (node-config) and SuperNode."""
    ident = json.dumps([PROTOCOL, str(APP_DIR), sys.executable, owner,
                        sorted((str(k), str(v)) for k, v in node_config.items())])
    return _folder() / f"w-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.sock"


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join(text) or "(empty log)"


# --- the ClientApp's side -----------------------------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):  # no worker, or a dead one's socket
        conn.close()
        return None
    return conn


def _sweep(folder: Path, now: float | None = None) -> list[Path]:
    """Remove what dead workers left (a killed worker cannot clean up): the socket and lock of every worker
    whose lock no process holds, and their logs after :data:`KEEP_LOGS` seconds. Returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    for lock_path in folder.glob("w-*.lock"):
        try:
            if now - lock_path.stat().st_mtime < 60:  # a worker opens its lock a moment before it takes it
                continue
            with open(lock_path, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a live worker holds it
                for leftover in (lock_path.with_suffix(".sock"), lock_path):
                    try:
                        leftover.unlink()
                    except FileNotFoundError:  # this worker never bound its socket, or another sweep was first
                        continue
                    removed.append(leftover)
        except OSError:  # held by a live worker (BlockingIOError is an OSError), or removed meanwhile
            continue
    for log_path in folder.glob("w-*.log"):
        try:
            if not log_path.with_suffix(".lock").exists() and now - log_path.stat().st_mtime > KEEP_LOGS:
                log_path.unlink()
                removed.append(log_path)
        except OSError:
            continue
    return removed


def _start(path: Path, owner: int, idle: float) -> socket.socket:
    """Start a worker for ``path`` and wait until it accepts a connection."""
    _sweep(path.parent)
    logfile = path.with_suffix(".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APP_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with open(logfile, "ab") as out:
        os.fchmod(out.fileno(), 0o600)
        proc = subprocess.Popen([sys.executable, "-m", "client.worker", "--socket", str(path), "--owner", str(owner),
                                 "--idle", repr(idle)], cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, close_fds=True)
    log(logging.INFO, "site worker: started pid %d (socket %s, log %s)", proc.pid, path, logfile)
    deadline = time.monotonic() + START_LIMIT
    while (conn := _connect(path)) is None:
        if proc.poll() is not None:  # it died, or lost the race to another worker of the same socket: try once more
            if (conn := _connect(path)) is not None:
                return conn
            raise RuntimeError(f"site worker exited with code {proc.returncode} before it listened; its log "
                               f"{logfile}:\n{_log_tail(logfile)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"site worker did not listen within {START_LIMIT:.0f} s; its log {logfile}:\n"
                               f"{_log_tail(logfile)}")
        time.sleep(0.05)
    return conn


def _rebuild(header: dict) -> Exception:
    """The worker's exception, as its own class where that is a builtin or fedpd's error (so the message and
    type read the same as in-process); any other as RuntimeError naming the class."""
    module, name, text = header.get("module", ""), header.get("type", "Exception"), header.get("message", "")
    if module in _EXCEPTIONS:
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(text)
            except Exception:  # noqa: BLE001 - a class whose constructor wants more: fall through
                pass
    return RuntimeError(f"{module}.{name}: {text}")


def _exchange(conn: socket.socket, request: list[bytes]) -> tuple[bool, dict, list[bytes]]:
    """Send a request; returns (accepted, response header, response frames). ``accepted`` False: the worker
    closed before it read the request (it was exiting), so nothing ran and the request may go to a new worker."""
    try:
        _send(conn, *request)
        if conn.recv(1) != ACCEPTED:
            return False, {}, []
    except (BrokenPipeError, ConnectionResetError):
        return False, {}, []
    return (True, *_receive_framed(conn))


def call(name: str, msg: Message, context: Context, startup: float) -> Message:
    """Run handler ``name`` (``train`` / ``evaluate``, client/handlers.py) on this site's worker when it is
    :func:`wanted` (the worker serves the SuperNode that started this process), else in this process."""
    if not wanted(context):
        from client.handlers import HANDLERS  # torch, MONAI: paid once per process

        return HANDLERS[name](msg, context, startup)
    return remote(name, msg, context, startup, owner=os.getppid(), idle=_idle_seconds(context))


def remote(name: str, msg: Message, context: Context, startup: float, *, owner: int, idle: float) -> Message:
    """Run handler ``name`` on the worker of this site and ``owner`` (the process whose end ends the worker),
    starting one (exiting after ``idle`` seconds without a message) if none listens.

    The reply, the site's updated ``context.state`` (the BatchNorm state the site keeps under fedbn, DP and secure
    aggregation) and the handler's log lines come back; a handler's exception is raised here again (same type
    for builtins and fedpd's errors).
    """
    path = socket_path(context.node_config, owner)
    entered = time.monotonic()
    index, frames = _pack(msg.content)
    envelope = make_message(metadata=msg.metadata, content=RecordDict())  # the metadata, without the records
    parts = [message_to_proto(envelope).SerializeToString(), context_to_proto(context).SerializeToString(), *frames]
    for _ in range(3):
        conn = _connect(path)
        if conn is None:
            conn = _start(path, owner, idle)
        with conn:
            # the wait for a new worker's imports is start-up this message paid, like the imports it replaces
            waited = time.monotonic() - entered
            header = json.dumps({"protocol": PROTOCOL, "handler": name, "startup": startup + waited, "content": index,
                                 "frames": len(parts)}).encode()
            try:
                accepted, head, response = _exchange(conn, [header, *parts])
            except (EOFError, ConnectionResetError) as exc:
                peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid = struct.unpack("3i", peer)[0]
                raise RuntimeError(f"site worker (pid {pid}) ended while it ran this {name} message ({exc}); its log "
                                   f"{path.with_suffix('.log')}:\n{_log_tail(path.with_suffix('.log'))}") from exc
        if accepted:
            break
    else:
        raise RuntimeError(f"site worker at {path} closed 3 connections before reading the message; see "
                           f"{path.with_suffix('.log')}")
    for level, text in head.get("logs", []):
        log(int(level), "%s", text)
    if not head["ok"]:
        log(logging.ERROR, "site worker: the %s handler raised:\n%s", name, head.get("traceback", ""))
        raise _rebuild(head)
    state = recorddict_from_proto(ProtoRecordDict.FromString(response[0]))
    for key in [k for k in context.state if k not in state]:
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return Message(_unpack(head["content"], response[1:]), reply_to=msg)


# --- the worker's side --------------------------------------------------------------------------------


class _Captured(logging.Handler):
    """Collects the handler's Flower log records, to be logged again by the ClientApp (the SuperNode's log)."""

    def __init__(self):
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """A worker that ends cleanly leaves nothing behind (one that crashes leaves its log for the ClientApp)."""
    for suffix in (".sock", ".log", ".lock"):
        path.with_suffix(suffix).unlink(missing_ok=True)


def _on_signal(path: Path):
    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        log(logging.INFO, "site worker %d: %s, exiting", os.getpid(), signal.Signals(signum).name)
        _remove(path)
        os._exit(0)

    return stop


def _watch(owner: int, path: Path) -> None:
    """Exit at once when the SuperNode's process is gone: a stopped or killed site leaves nothing running."""
    while _alive(owner):
        time.sleep(0.5)
    _remove(path)
    os._exit(0)


def _answer(conn: socket.socket, handlers: dict) -> None:
    request, parts = _receive_framed(conn)
    started = time.monotonic()
    conn.sendall(ACCEPTED)
    log(logging.INFO, "site worker %d: accepted a %s message", os.getpid(), request.get("handler"))
    if request.get("protocol") != PROTOCOL or request.get("handler") not in handlers or len(parts) < 3:
        _send(conn, json.dumps({"ok": False, "module": "builtins", "type": "RuntimeError", "logs": [], "frames": 0,
                                "message": f"site worker speaks protocol {PROTOCOL} with handlers {sorted(handlers)}; "
                                           f"got {request.get('protocol')!r} / {request.get('handler')!r}"}).encode())
        return
    envelope = message_from_proto(ProtoMessage.FromString(parts[0]))
    msg = make_message(metadata=envelope.metadata, content=_unpack(request["content"], parts[2:]))
    context = context_from_proto(ProtoContext.FromString(parts[1]))
    captured = _Captured()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(captured)
    ok = False
    try:
        reply = handlers[request["handler"]](msg, context, float(request["startup"]))
        ok = True
        index, frames = _pack(reply.content)
        parts = [recorddict_to_proto(context.state).SerializeToString(), *frames]
        out = [json.dumps({"ok": True, "logs": captured.lines, "content": index, "frames": len(parts)}).encode(), *parts]
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the ClientApp, which raises it
        out = [json.dumps({"ok": False, "logs": captured.lines, "module": type(exc).__module__,
                           "type": type(exc).__qualname__, "message": str(exc), "frames": 0,
                           "traceback": traceback.format_exc()}).encode()]
    finally:
        flwr_logger.removeHandler(captured)
    _send(conn, *out)
    log(logging.INFO, "site worker %d: %s message of run %d answered (%s) in %.1f s", os.getpid(), request["handler"],
        context.run_id, "ok" if ok else "error", time.monotonic() - started)


def serve(path: Path, owner: int, idle: float) -> int:
    """Listen at ``path`` and answer one message at a time until the owner is gone or ``idle`` seconds pass."""
    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 - held for the process's life
    for attempt in range(50):  # a killed worker's lock is dropped by the kernel a moment after its death
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 49:
                return 0  # another worker serves this socket (its ClientApp connects to that one)
            time.sleep(0.1)
    threading.Thread(target=_watch, args=(owner, path), daemon=True, name="owner-watch").start()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the SuperNode's stop reaches its group
        signal.signal(signum, _on_signal(path))
    from client.handlers import HANDLERS  # the slow imports, before listening: a listening worker is warm

    path.unlink(missing_ok=True)  # a dead worker's socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)
    server.settimeout(idle)
    log(logging.INFO, "site worker %d: listening at %s for SuperNode process %d", os.getpid(), path, owner)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                log(logging.INFO, "site worker %d: no message for %g s, exiting", os.getpid(), idle)
                _remove(path)
                return 0
            with conn:
                conn.settimeout(None)
                pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
                if uid != os.getuid():
                    log(logging.WARNING, "site worker: refused a connection from pid %d of uid %d", pid, uid)
                    continue
                try:
                    _answer(conn, HANDLERS)
                except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
                    log(logging.WARNING, "site worker: the ClientApp (pid %d) went away: %s", pid, exc)
    finally:
        server.close()
        path.unlink(missing_ok=True)  # no new connections; the log stays unless the exit was clean (above)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fedpd's site worker (started by the ClientApp; not for direct use)")
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--owner", type=int, required=True, help="the SuperNode's process: exit when it is gone")
    p.add_argument("--idle", type=float, default=DEFAULT_IDLE)
    a = p.parse_args(argv)
    return serve(a.socket, a.owner, a.idle)


if __name__ == "__main__":
    sys.exit(main())

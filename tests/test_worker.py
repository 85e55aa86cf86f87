"""The site worker (client/worker.py): a real worker process on a real Unix socket, on a tiny 16^3 site.

- it answers a training message exactly as the handler does in-process (same weights, same metrics);
- the records cross the socket unchanged (arrays as their own bytes, the rest as Flower's protobuf);
- fedbn's BatchNorm kept in ``context.state`` comes back from it;
- a handler's error comes back with its own type and message, and the worker keeps serving;
- it exits (leaving no socket) when its owner process is gone, or after its idle time;
- its folder and socket are this user's alone; a folder others may enter is refused;
- it is used only where Flower starts a process per message, and ``site-worker`` is validated.

The deployment tests (test_deploy.py) show a real SuperNode starting it once and reusing it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client import handlers, worker
from common import keys
from common.errors import ConfigError

try:
    from deploy_helpers import processes
    from test_app_units import _context, _site_context, instruction, make_cfg, med3d_state  # noqa: F401 - fixture
except ImportError:  # run as a package
    from tests.deploy_helpers import processes
    from tests.test_app_units import _context, _site_context, instruction, make_cfg, med3d_state  # noqa: F401


def test_records_cross_the_socket_unchanged():
    """_pack/_unpack: every record, in order, the same kinds and values; every array with its key, order, dtype,
    shape, stype and bytes, as Flower's protobuf would carry them; a legacy FitIns (SecAgg+) record set too."""
    from flwr.app import Array, MetricRecord
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    state = {"a.weight": torch.randn(3, 2, 2), "a.num_batches_tracked": torch.tensor(7), "b": torch.zeros(0)}
    content = RecordDict({keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: 2, "s": "x"}),
                          keys.ARRAYS: ArrayRecord(state),
                          keys.METRICS: MetricRecord({"loss": 0.25}),
                          "more": ArrayRecord({"h": torch.arange(6, dtype=torch.float16).reshape(2, 3)})})
    legacy = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.ones(4), np.eye(2)]), {"k": 1}),
                                         keep_input=True)
    for original in (content, legacy):
        index, frames = worker._pack(original)
        arrays = [a for r in original.values() if isinstance(r, ArrayRecord) for a in r.values()]
        assert len(frames) == 1 + len(arrays)
        assert all(f is a.data for f, a in zip(frames[1:], arrays))  # sent as they are, not copied
        back = worker._unpack(index, [bytes(f) for f in frames])
        assert list(back) == list(original)
        for name, record in original.items():
            assert type(back[name]) is type(record)
            if isinstance(record, ArrayRecord):
                assert list(back[name]) == list(record)
                for key, a in record.items():
                    b = back[name][key]
                    assert isinstance(b, Array)
                    assert (b.dtype, tuple(b.shape), b.stype, b.data) == (a.dtype, tuple(a.shape), a.stype, a.data)
            else:
                assert dict(back[name]) == dict(record)
    restored = worker._unpack(*worker._pack(content))[keys.ARRAYS].to_torch_state_dict()
    assert all(torch.equal(restored[k], v) for k, v in state.items())


@pytest.fixture
def owner():
    """A process standing in for the SuperNode: the worker lives as long as it does."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def _worker_pids(path: Path) -> list[int]:
    return [pid for pid, argv in processes() if "client.worker" in argv and str(path) in argv]


def _exited(pid: int) -> bool:
    """Gone or a zombie: its files (and so its lock) are closed. (An exiting process's cmdline empties first.)"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _wait_gone(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    pids = _worker_pids(path)
    while not all(map(_exited, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(_exited, pids)), f"the worker of {path} still runs after {timeout:.0f} s"


def _train_message(state: dict, round_: int = 1):
    arrays = ArrayRecord({k: torch.as_tensor(v) for k, v in state.items()})
    return instruction(101, RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: round_})}))


def _evaluate_message(state: dict):
    arrays = ArrayRecord({k: torch.as_tensor(v) for k, v in state.items()})
    return instruction(101, RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({})}), "evaluate")


def _one_worker(tmp_path: Path, state: dict, owner, idle: float):
    """A site whose worker answered one evaluate message: (context, message, socket, the worker's pid)."""
    ctx, msg = _site_context(tmp_path, make_cfg()), _evaluate_message(state)
    worker.remote("evaluate", msg, ctx, 0.0, owner=owner.pid, idle=idle)
    path = worker.socket_path(ctx.node_config, owner.pid)
    (pid,) = _worker_pids(path)
    return ctx, msg, path, pid


def test_the_worker_trains_exactly_as_the_handler_in_process_and_keeps_fedbn_state(tmp_path, med3d_state, owner):
    cfg = make_cfg(strategy="fedbn", lr=1e-3)
    here, there = _site_context(tmp_path / "a", cfg), _site_context(tmp_path / "b", cfg)
    there.node_config = here.node_config  # the same site (manifest and cache) for both
    local = handlers.train(_train_message(med3d_state), here, 0.0)
    remote = worker.remote("train", _train_message(med3d_state), there, 0.0, owner=owner.pid, idle=120)
    path = worker.socket_path(there.node_config, owner.pid)
    try:
        assert len(_worker_pids(path)) == 1
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        a, b = local.content[keys.ARRAYS], remote.content[keys.ARRAYS]
        assert list(a) == list(b)
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # CPU kernels are deterministic
        timing = {keys.STARTUP_SECONDS, keys.SETUP_SECONDS, keys.TRAIN_SECONDS, keys.SAMPLES_PER_SECOND}
        ma, mb = local.content[keys.METRICS], remote.content[keys.METRICS]
        assert {k: ma[k] for k in ma if k not in timing} == {k: mb[k] for k in mb if k not in timing}
        assert mb[keys.STARTUP_SECONDS] > 0  # the wait for the worker's imports counts as this message's start-up
        assert dict(remote.content[keys.SITE]) == dict(local.content[keys.SITE])
        assert remote.metadata.reply_to_message_id == "msg-101"
        kept_here, kept_there = (c.state[handlers.SITE_BATCHNORM].to_torch_state_dict() for c in (here, there))
        assert list(kept_here) == list(kept_there)
        assert all(torch.equal(kept_here[k], kept_there[k]) for k in kept_here)

        # round 2 on the same (warm) worker starts from the site's own BatchNorm, as in-process
        local2 = handlers.train(_train_message(med3d_state, 2), here, 0.0)
        remote2 = worker.remote("train", _train_message(med3d_state, 2), there, 0.0, owner=owner.pid, idle=120)
        a, b = local2.content[keys.ARRAYS], remote2.content[keys.ARRAYS]
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
        assert remote2.content[keys.METRICS][keys.STARTUP_SECONDS] < mb[keys.STARTUP_SECONDS]  # no worker to wait for
        assert len(_worker_pids(path)) == 1  # the same worker answered
    finally:
        owner.kill()
        owner.wait()
    _wait_gone(path)  # its SuperNode is gone: so is the worker, and it left nothing behind
    assert not [p for p in path.parent.glob(path.stem + ".*")]


def test_a_handler_error_comes_back_with_its_type_and_the_worker_keeps_serving(tmp_path, med3d_state, owner):
    cfg = make_cfg(attack="sign-flip", **{"attack-site": "site"})  # this deployed site is "site": refused
    ctx = _site_context(tmp_path, cfg)
    with pytest.raises(ConfigError) as in_process:
        handlers.train(_train_message(med3d_state), ctx, 0.0)
    with pytest.raises(ConfigError) as there:
        worker.remote("train", _train_message(med3d_state), ctx, 0.0, owner=owner.pid, idle=120)
    assert str(there.value) == str(in_process.value)
    assert "for simulations only" in str(there.value)
    reply = worker.remote("evaluate", _evaluate_message(med3d_state), ctx, 0.0, owner=owner.pid, idle=120)
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 2


def test_an_idle_worker_exits_by_itself_and_the_next_message_starts_another(tmp_path, med3d_state, owner):
    ctx, msg, path, first = _one_worker(tmp_path, med3d_state, owner, idle=2)
    _wait_gone(path)
    assert not path.exists()
    worker.remote("evaluate", msg, ctx, 0.0, owner=owner.pid, idle=2)
    assert _worker_pids(path) and first not in _worker_pids(path)


def test_a_worker_killed_mid_message_fails_that_message_with_its_log(tmp_path, med3d_state, owner):
    cfg = make_cfg(**{"local-epochs": 50})
    ctx = _site_context(tmp_path, cfg)
    path = worker.socket_path(ctx.node_config, owner.pid)

    done = threading.Event()

    def kill_when_training():
        # once the worker logged that it accepted the message (it then trains for 50 epochs); killed before that,
        # the ClientApp would start another worker and the message succeed (a loaded CI machine once did that)
        log = path.with_suffix(".log")
        while not done.is_set():  # a busy machine may take minutes over the worker's imports
            if log.is_file() and "accepted a train message" in log.read_text(errors="replace"):
                for pid in _worker_pids(path):
                    os.kill(pid, 9)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_training)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match=r"site worker \(pid \d+\) ended while it ran this train message") as e:
            worker.remote("train", _train_message(med3d_state), ctx, 0.0, owner=owner.pid, idle=120)
    finally:
        done.set()
        killer.join()
    assert "listening at" in str(e.value)  # the worker's log tail comes with the error
    assert not _worker_pids(path)


def test_a_signalled_worker_cleans_up_and_a_killed_ones_leftovers_are_swept(tmp_path, med3d_state, owner):
    ctx, msg, path, pid = _one_worker(tmp_path, med3d_state, owner, idle=120)
    os.kill(pid, signal.SIGTERM)  # what stopping the SuperNode's process group sends
    _wait_gone(path)
    assert not list(path.parent.glob(path.stem + ".*"))

    worker.remote("evaluate", msg, ctx, 0.0, owner=owner.pid, idle=120)
    (pid,) = _worker_pids(path)
    os.kill(pid, signal.SIGKILL)  # no chance to clean up
    _wait_gone(path)
    left = sorted(p.suffix for p in path.parent.glob(path.stem + ".*"))
    assert left == [".lock", ".log", ".sock"]
    swept = worker._sweep(path.parent)
    assert path not in swept and path.with_suffix(".lock") not in swept  # too new to tell from a worker starting up
    later, swept, deadline = time.time() + 120, set(), time.monotonic() + 20
    while not swept >= {path, path.with_suffix(".lock")} and time.monotonic() < deadline:
        swept |= set(worker._sweep(path.parent, later))  # the kernel drops a killed process's lock a moment after
        time.sleep(0.2)
    assert swept >= {path, path.with_suffix(".lock")}
    assert path.with_suffix(".log").exists()  # kept: it may explain a failed message
    assert path.with_suffix(".log") in worker._sweep(path.parent, later + worker.KEEP_LOGS)

    worker.remote("evaluate", msg, ctx, 0.0, owner=owner.pid, idle=120)  # a live worker's files are never swept
    assert path.with_suffix(".log") not in worker._sweep(path.parent, time.time() + 10 * worker.KEEP_LOGS)
    assert path.exists() and _worker_pids(path)


def test_a_worker_folder_others_may_enter_is_refused(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"fedpd-{os.getuid()}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(ConfigError, match=r"not a folder of this user's alone .*mode 755.*site-worker='false'"):
        worker.socket_path({"data-path": "x"}, 1)
    folder.chmod(0o700)
    assert worker.socket_path({"data-path": "x"}, 1).parent == folder


def test_the_worker_is_wanted_only_where_flower_starts_a_process_per_message(monkeypatch):
    ctx = _context({"data-path": "/site.csv", "cache-dir": "/cache"}, make_cfg())
    assert not worker.wanted(ctx)  # pytest is not flwr-clientapp: the handlers run here
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-clientapp", "--insecure"])
    assert worker.wanted(ctx)
    ctx.node_config = ctx.node_config | {keys.NODE_SITE_WORKER: "false"}
    assert not worker.wanted(ctx)
    ctx.node_config = ctx.node_config | {keys.NODE_SITE_WORKER: "maybe"}
    with pytest.raises(ConfigError, match=r"site-worker='maybe': choose 'true' \(the default\) or 'false'"):
        worker.wanted(ctx)
    sim = _context({keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: 3}, make_cfg())
    assert not worker.wanted(sim)  # a simulation's actors keep everything warm already
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ConfigError, match="site-worker-idle"):
            worker._idle_seconds(_context({keys.NODE_SITE_WORKER_IDLE: bad}, make_cfg()))

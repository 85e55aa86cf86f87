"""``fedpd simulate``: N virtual sites on this machine with Flower's simulation engine.

Starts a simulation SuperLink of its own (free port, own FLWR_HOME under the run folder), submits the
app with ``flwr run`` exactly as a user would, streams the log, and stops the SuperLink by PID even
when the run fails. The ServerApp and ClientApp are the same ones a real deployment runs.
"""

from __future__ import annotations

import logging
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from common.cli import raise_interrupt
from common.config import RunConfig, parse_overrides
from common.errors import ConfigError, FedpdError
from common.runs.preflight import preflight_partition
from common.runs.records import RunReport, load_report
from simulation.flower import (flwr_run, log_problems, run_statuses, start_superlink, stop, write_connections,
                               write_run_config)

log = logging.getLogger("fedpd.simulate")

__all__ = ["simulate", "SimulationError"]


class SimulationError(FedpdError):
    """The Flower run did not finish or produced no report."""


def simulate(partition: Path, rounds: int | None, out: Path, run_config: str = "", echo: bool = True,
             timeout: float | None = None) -> dict:
    """Run a federated simulation over ``partition/sites/*.csv`` with ``partition/server.csv`` held out.

    Args:
        partition: folder written by ``fedpd partition``.
        rounds: ``num-server-rounds`` (``None`` keeps the run-config's value).
        out: the run folder (``runs/<name>``); made absolute.
        run_config: extra ``"k=v ..."`` overrides, as for ``flwr run -c``.
        echo: stream the Flower log to stdout.
        timeout: seconds before the run is abandoned (``None``: no limit).

    Returns:
        The parsed ``report.json``.
    """
    partition, out = Path(partition).resolve(), Path(out).resolve()
    sites = sorted((partition / "sites").glob("*.csv"))
    server_csv = partition / "server.csv"
    if not sites or not server_csv.is_file():
        raise ConfigError(f"{partition}: expected sites/*.csv and server.csv (run fedpd partition first)")
    if out == partition or partition in out.parents:
        raise ConfigError(f"--out {out} is inside the partition folder {partition}; put the run folder elsewhere "
                          "(e.g. runs/NAME)")
    overrides = parse_overrides(run_config)
    overrides.update({"partition-dir": str(partition), "server-manifest": str(server_csv), "out-dir": str(out)})
    overrides.setdefault("min-nodes", len(sites))
    if rounds is not None:
        overrides["num-server-rounds"] = int(rounds)
    cfg = RunConfig.from_mapping(overrides)  # fail here, with the list of keys, not inside Flower
    # every cheap-to-find error, before Flower; a progress bar only on a terminal (in a log it is one long line)
    checked = preflight_partition(partition, cfg, out, progress=echo and sys.stderr.isatty())
    if echo:
        log.info(checked.summary())
    home = out / ".flwr"
    cfg_file = write_run_config(home / "run-config.toml", overrides)

    cuda = torch.cuda.is_available()
    # One site trains at a time with every core (or the GPU): no oversubscription on small machines.
    federation = (f"num-supernodes={len(sites)} client-resources-num-cpus={os.cpu_count() or 1} "
                  f"client-resources-num-gpus={1.0 if cuda else 0.0}")
    started = time.time()
    link = start_superlink(home, simulation=True, database=home / "state.db")
    # SIGTERM (e.g. from a scheduler) must still stop the SuperLink: turn it into an exception
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_interrupt) if in_main else None
    try:
        write_connections(home, {"sim": {"address": f"127.0.0.1:{link.port}", "insecure": True}})
        code = flwr_run(home, "sim", run_config=cfg_file, federation_config=federation, log=out / "flower.log",
                        timeout=timeout, echo=echo)
        # a run that ended without its report: ask the SuperLink how it ended, while it still runs
        statuses = [] if code == 0 and _fresh(out / "report.json", started) else run_statuses(home, "sim")
    finally:
        stop(link)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return _result(out, code, started, link.log, statuses)


def _fresh(path: Path, since: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= since - 1.0


def _server_error(log: Path) -> str | None:
    """The last ``SomeError: message`` line the ServerApp logged (Flower exits 0 when the ServerApp raises)."""
    if not log.is_file():
        return None
    found = None
    for line in log.read_text(errors="replace").splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m:
            found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    return found


_ERROR_LINE = re.compile(r"^((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def _ended(statuses: Sequence[dict], link_log: Path) -> str:
    """How the SuperLink says the run ended (``finished:failed: No heartbeat received from the task``), and the
    problems its log records (the simulation process and Ray write there): the cause of a run that died
    outside the ServerApp, in the error message itself rather than only in a log file."""
    text = ""
    if statuses:  # a simulation SuperLink holds this one run
        last = statuses[-1]
        text += f"\nSuperLink's run status: {last.get('status', '?')}" + (
            f": {last['status-details']}" if last.get("status-details") else "")
    problems = log_problems(link_log)
    if problems:
        text += "\nSuperLink's log, last problems:\n  " + "\n  ".join(problems)
    return text


def _result(out: Path, code: int, started: float, link_log: Path, statuses: Sequence[dict] = ()) -> RunReport:
    """The report written by *this* run, or a :class:`SimulationError` that says why there is none.

    A run counts only when its ServerApp wrote ``report.json`` after the run started: ``flwr run`` exits 0
    even when the ServerApp raised, and a resumed folder may still hold the report of an earlier attempt.
    """
    report, failure, log = out / "report.json", out / "failure.json", out / "flower.log"
    if _fresh(failure, started):
        raise SimulationError(json.loads(failure.read_text()).get("message", "the run trained nothing")
                              + f"\n(details: {failure}, log: {log})")
    if code != 0 or not _fresh(report, started):
        why = _server_error(log)
        raise SimulationError(f"the run failed{': ' + why if why else ''} (flwr run exit code {code}, "
                              f"{'no new' if not _fresh(report, started) else 'a'} report.json); nothing was reported. "
                              f"Full log: {log} (SuperLink: {link_log})" + _ended(statuses, link_log))
    return load_report(report)

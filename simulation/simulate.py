"""``fedpd simulate``: N virtual sites on this machine with Flower's simulation engine.

Starts a simulation SuperLink of its own (free port, own FLWR_HOME under the run folder), submits the
app with ``flwr run`` exactly as a user would, streams the log, and stops the SuperLink by PID even
when the run fails. The ServerApp and ClientApp are the same ones a real deployment runs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import tomllib
from pathlib import Path

import torch

from common.config import RunConfig, parse_overrides
from common.errors import ConfigError, FedpdError
from simulation.flower import flwr_run, start_superlink, stop, write_connections, write_run_config

__all__ = ["simulate", "SimulationError"]


class SimulationError(FedpdError):
    """The Flower run did not finish or produced no report."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


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
    overrides = parse_overrides(run_config)
    overrides.update({"partition-dir": str(partition), "server-manifest": str(server_csv), "out-dir": str(out)})
    overrides.setdefault("min-nodes", len(sites))
    if rounds is not None:
        overrides["num-server-rounds"] = int(rounds)
    cfg = RunConfig.from_mapping(overrides)  # fail here, with the list of keys, not inside Flower
    out.mkdir(parents=True, exist_ok=True)
    home = out / ".flwr"
    cfg_file = write_run_config(home / "run-config.toml", overrides)

    cuda = torch.cuda.is_available()
    # One site trains at a time with every core (or the GPU): no oversubscription on small machines.
    federation = (f"num-supernodes={len(sites)} client-resources-num-cpus={os.cpu_count() or 1} "
                  f"client-resources-num-gpus={1.0 if cuda else 0.0}")
    link = start_superlink(home, simulation=True, database=home / "state.db")
    # SIGTERM (e.g. from a scheduler) must still stop the SuperLink: turn it into an exception
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        write_connections(home, {"sim": {"address": f"127.0.0.1:{link.port}", "insecure": True}})
        code = flwr_run(home, "sim", run_config=cfg_file, federation_config=federation, log=out / "flower.log",
                        timeout=timeout, echo=echo)
    finally:
        stop(link)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    report = out / "report.json"
    if code != 0 or not report.is_file():
        raise SimulationError(f"the Flower run ended with code {code} and {'no' if not report.is_file() else 'a'} report; "
                              f"see {out / 'flower.log'} and {link.log}")
    return json.loads(report.read_text())

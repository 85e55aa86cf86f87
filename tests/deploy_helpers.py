"""Helpers for tests that run real Flower deployments on 127.0.0.1 (test_faults, test_bad_site, test_deploy)
and read the ClientApp audit log (test_audit, test_deploy).

The cohort is the phantom at 32^3 through the real ingest/split/partition path (as in test_federated);
the network input is 16^3 so that a deployment round stays short on two CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd

from simulation.flower import Proc, _tree, start_supernode

try:
    from data_factory import phantom_cohort
except ImportError:  # run as a package
    from tests.data_factory import phantom_cohort

__all__ = ["SMALL", "RUN_LIMIT", "PROCESS_LIMIT", "ROUND_FACTOR", "make_cohort", "rounds", "slowest_round", "round_limit",
           "site_names", "start_sites", "clientapps", "cmdline", "kill_tree", "wait_until", "strict_json", "audit_lines",
           "forbidden_strings", "record_strings"]

SMALL = {"input-shape": "16,16,16", "spacing": "12.0,12.0,12.0", "batch-size": 4}

# Limits of the waits on real Flower processes. No test sleeps a fixed time: every wait polls for its event
# and returns as soon as it happens, so a generous limit costs a healthy run nothing and only bounds how long
# a broken one hangs. A wait that spans federated rounds is a multiple of a round measured in the same run
# (``round_limit``), never below the floor the caller gives; before any round has finished, ``RUN_LIMIT``.
#
# A whole 1-round deployment (flwr run start-up, the server's scan check and round-0 evaluation, round 1,
# the report): about 1-2 minutes at 16^3 on a busy 2-core machine (a round took 66 s at load 7).
RUN_LIMIT = 900.0
# Work that does not depend on round length: a process to go after SIGKILL or after losing its SuperLink,
# a one-shot flwr CLI call (seconds).
PROCESS_LIMIT = 120.0
# A later round (or the report) may take this many times the slowest round measured so far.
ROUND_FACTOR = 4.0


def make_cohort(root: Path) -> Path:
    """Phantom download -> manifest.csv -> split -> partition/ (sites/*.csv, server.csv) under ``root``."""
    phantom_cohort(root, subjects=30, sites=3, shape=32, effect=1.0, seed=1)
    return root


def rounds(out: Path) -> list[dict]:
    """The records of ``rounds.jsonl`` so far."""
    f = out / "rounds.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def slowest_round(out: Path) -> float:
    """The longest ``wall_seconds`` (train, evaluate, server evaluation, checkpoint) in ``rounds.jsonl`` so far."""
    walls = [r["wall_seconds"] for r in rounds(out)]
    assert walls, f"no round recorded in {out} yet: nothing to measure"
    return max(walls)


def round_limit(measured: float, *, rounds: float = 1.0, floor: float) -> float:
    """A limit for ``rounds`` more rounds when one took ``measured`` seconds: ROUND_FACTOR times that, at least ``floor``."""
    return max(floor, ROUND_FACTOR * rounds * measured)


def site_names(partition: Path) -> list[str]:
    return sorted(p.stem for p in (partition / "sites").glob("*.csv"))


def start_sites(partition: Path, tmp_path: Path, link: Proc, names: list[str],
                extra_config: dict[str, str] | None = None) -> dict[str, Proc]:
    """One real SuperNode per site, with the site's manifest as ``--node-config data-path``."""
    sites = {}
    for name in names:
        node_config = f"data-path='{partition / 'sites' / f'{name}.csv'}' cache-dir='{tmp_path / 'cache' / name}'"
        if extra_config and name in extra_config:
            node_config += " " + extra_config[name]
        sites[name] = start_supernode(tmp_path / f"site-{name}", f"127.0.0.1:{link.port}",
                                      node_config=node_config, name=f"site-{name}")
    return sites


def processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every process, read from /proc (ps truncates long command lines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            found.append((int(entry.name), [a.decode(errors="replace") for a in argv if a]))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def clientapps(proc: Proc) -> set[int]:
    """PIDs of the flwr-clientapp processes a SuperNode is running now."""
    pids, _ = _tree(proc.pid)
    return {p for p in pids if "flwr-clientapp" in cmdline(p)}


def kill_tree(proc: Proc) -> None:
    """SIGKILL a Flower process and everything it started: no clean shutdown, no goodbye to the SuperLink."""
    pids, groups = _tree(proc.pid)
    groups.add(proc.pid)
    groups.discard(os.getpgrp())
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.popen.wait(timeout=PROCESS_LIMIT)


def wait_until(condition, what: str, timeout: float, watch=()) -> None:
    """Poll ``condition`` until it is true; fail with the log of any watched process that exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in watch:
            assert p.popen.poll() is None, f"{p.name} exited while waiting for {what}: {p.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.3)


# --- the audit log (client/audit.py) ---------------------------------------------------------------


def strict_json(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def audit_lines(path: Path) -> list[dict]:
    """The entries of an audit log, each line parsed as strict JSON (no NaN/Infinity)."""
    return [strict_json(x) for x in path.read_text().splitlines() if x.strip()]


def forbidden_strings(root: Path) -> set[str]:
    """Every path, file name, subject id and image id in the manifests of the cohort under ``root``."""
    out: set[str] = set()
    for csv in [root / "manifest.csv", *(root / "partition").rglob("*.csv")]:
        df = pd.read_csv(csv, dtype=str)
        for col in ("path", "subject_id", "image_id"):
            out |= set(df[col].dropna())
        out |= {Path(p).name for p in df["path"].dropna()}
        out |= {str((csv.parent / p).resolve()) for p in df["path"].dropna()}
        out.add(str(csv))
    return out


def record_strings(entry: dict) -> list[str]:
    """All string values inside an audit entry's metric and config records."""
    found = []
    for record in entry.get("records", {}).values():
        for item in list(record.get("metrics", {}).values()) + list(record.get("config", {}).values()):
            values = item.get("value") if isinstance(item.get("value"), list) else [item.get("value")]
            found += [v for v in values if isinstance(v, str)]
    return found

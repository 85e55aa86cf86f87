"""Start and stop real Flower processes (SuperLink, SuperNodes) and call the ``flwr`` CLI.

Used by ``fedpd simulate``, the demo and the integration tests. Every process is started in its own
session with its own ``FLWR_HOME`` and log file and is stopped by PID (its process group), so the
SuperExec children go with it. Runtime dependency installation is always off: the SuperLink would
otherwise build a fresh environment per run and pull a CUDA torch (FLOWER.md §0).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from common.runs.rundir import GIT_COMMIT_ENV, git_commit

_log = logging.getLogger("fedpd.flower")

__all__ = ["Proc", "free_port", "flwr_env", "start_superlink", "start_supernode", "stop", "write_connections",
           "flwr_run", "console_lines", "wait_for_port", "write_run_config", "run_statuses", "log_problems", "APP_DIR"]

APP_DIR = Path(__file__).resolve().parents[1]  # the folder with pyproject.toml
BIN = Path(sys.executable).parent  # the venv's bin/: flower-superlink, flower-supernode, flwr


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a Flower process: its own FLWR_HOME, no runtime dependency installation."""
    env = os.environ.copy()
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    commit = git_commit()  # the FAB the processes run has no .git: provenance travels in the environment
    if commit != "unknown":
        env[GIT_COMMIT_ENV] = commit
    env.update(extra)
    return env


@dataclass
class Proc:
    """A started Flower process; ``stop(proc)`` ends it and its children."""

    name: str
    popen: subprocess.Popen
    log: Path
    port: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for_port(port: int, timeout: float = 30.0, proc: Proc | None = None) -> None:
    """Wait until something listens on 127.0.0.1:port; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}; log {proc.log}:\n{proc.log_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s" + (f"; log {proc.log}" if proc else ""))


def _spawn(name: str, args: list[str], home: Path, log: Path, port: int, env: dict | None = None) -> Proc:
    home.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")
    popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env or flwr_env(home),
                             start_new_session=True, cwd=home)
    fh.close()
    return Proc(name=name, popen=popen, log=log, port=port)


def start_superlink(home: Path, *, port: int | None = None, simulation: bool = False, database: Path | None = None,
                    extra: list[str] | None = None, insecure: bool = True, wait: bool = True) -> Proc:
    """Start ``flower-superlink`` on 127.0.0.1 (one HTTP port for all APIs in Flower 1.42)."""
    port = port or free_port()
    args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if insecure:
        args.append("--insecure")
    if simulation:
        args.append("--simulation")
    if database is not None:
        args += ["--database", str(database)]
    args += extra or []
    proc = _spawn("superlink", args, home, home / "superlink.log", port)
    if wait:
        wait_for_port(port, proc=proc)
    return proc


def start_supernode(home: Path, superlink: str, *, node_config: str, port: int | None = None,
                    extra: list[str] | None = None, insecure: bool = True, name: str = "supernode") -> Proc:
    """Start ``flower-supernode`` connected to ``superlink`` ("127.0.0.1:PORT") with ``--node-config``."""
    port = port or free_port()
    args = [str(BIN / "flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", node_config]
    if insecure:
        args.append("--insecure")
    args += extra or []
    return _spawn(name, args, home, home / f"{name}.log", port)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) for every live process (zombies left out), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _tree(root: int) -> tuple[set[int], set[int]]:
    """All descendants of ``root`` (itself included) and the process groups they are in.

    Flower's SuperExec starts its own session, and the simulation's Ray workers are re-parented to init
    but stay in that group, so killing only the SuperLink's group leaves a simulation running.
    """
    table = _process_table()
    pids, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in pids:
                pids.add(pid)
                frontier.append(pid)
    groups = {table[p][1] for p in pids if p in table}
    return pids, groups


def _signal_all(pids: set[int], groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pids: set[int], groups: set[int]) -> bool:
    table = _process_table()
    return any(p in table for p in pids) or any(g in groups for _, g in table.values())


def stop(proc: Proc | None, timeout: float = 15.0) -> None:
    """Stop a started process and everything it started: SIGTERM, wait, then SIGKILL. Safe to call twice."""
    if proc is None:
        return
    pids, groups = _tree(proc.pid)
    groups.add(proc.pid)  # its own session/group (start_new_session)
    groups.discard(os.getpgrp())  # never signal our own group
    _signal_all(pids, groups, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.popen.poll()  # reap our direct child
        if not _alive(pids, groups):
            break
        time.sleep(0.2)
    else:
        _signal_all(pids, groups, signal.SIGKILL)
    try:
        proc.popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def write_connections(home: Path, connections: dict[str, dict]) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with ``[superlink.<name>]`` sections (FLOWER.md §2)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{next(iter(connections))}"', ""]
    for name, opts in connections.items():
        lines.append(f"[superlink.{name}]")
        for k, v in opts.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path = home / "config.toml"
    path.write_text("\n".join(lines))
    return path


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_run_config(path: Path, overrides: dict) -> Path:
    """A TOML file of run-config overrides for ``flwr run --run-config FILE`` (no shell quoting games)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in overrides.items()))
    return path


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?:[\w.:-]+)(?: pid=\d+)?(?:, ip=[\w.:-]+)?\)\s?")  # "(ClientAppActor pid=7) "
_LOG_LEVEL = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")  # Flower's "ERROR :     "
# Flower's INFO detail: empty lines, tab-indented trees (strategy banner, "Aggregated MetricRecord" dumps,
# the "Final results" tables) and their headers; fedpd's own lines say the same per round, so the console
# skips them (the log keeps them).
_FLOWER_DETAIL = re.compile(r"^INFO\s*:[ ]*(?:\t.*|Final results:|Starting \w+ strategy:|Initial global evaluation "
                            r"results: None|Global evaluation)?$")
_PY_WARNING = re.compile(r"^(?P<where>\S.*?):(?P<line>\d+): (?P<category>[A-Za-z_]\w*Warning): (?P<message>.*)$")
_LOG_WARNING = re.compile(r"^WARNING\s*:\s*(?P<message>.*)$")
_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = ("The above exception was the direct cause of the following exception:",
            "During handling of the above exception, another exception occurred:")
_RAY_FRAME_HEADER = re.compile(r"^ray::[\w.]+\(\)(?: \(pid=.*)?$")  # Ray's remote traceback, e.g. "ray::ClientAppActor.run() (pid=7, ...)"
_FRAME = re.compile(r'^\s+File "[^"]*", line \d+')
_CARETS = re.compile(r"^\s+[\^~]+\s*$")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Warning)(?:\([\w.]*\))?(?::.*)?$")


def console_lines(lines: Iterable[str], log_name: str = "flower.log") -> Iterator[str]:
    """What the console shows of a streamed Flower log (the log file keeps every line).

    - A warning seen before (a Python warning of the same category from the same source line, e.g.
      sklearn's ``UndefinedMetricWarning`` or our ``MetricUndefinedWarning``, or a Flower/Ray ``WARNING``
      line with the same text) is counted, not shown; the counts come at the end. The source line Python
      prints under a warning is dropped.
    - A Python traceback, chained ones ("The above exception was the direct cause ...") and Ray's remote
      frames included, becomes its last ``XError: message`` line, marked with where the full text is.
    - Flower's INFO detail (its strategy banner, the aggregated-metric dumps and "Final results" tables,
      empty lines) is dropped: fedpd's own per-round lines carry what matters.
    - Everything else passes unchanged.

    Args:
        lines: the log's lines, with or without their line ends (a generator is consumed lazily, so the
            console follows the run; the last line of a traceback shows when the line after it arrives).
        log_name: the log file named in the markers.

    Yields:
        Console lines without line ends.
    """
    seen: dict[tuple, list] = {}  # warning key -> [repeats not shown, short description]
    in_traceback = after_frame = skip_source = False
    pending: str | None = None  # the latest exception line of the traceback being read
    collapsed = 0
    for raw in lines:
        line = raw.rstrip("\r\n")
        text = _RAY_PREFIX.sub("", _ANSI.sub("", line))
        body = _LOG_LEVEL.sub("", text.strip())
        indented = text[:1].isspace() and bool(body)
        frame = indented and bool(_FRAME.match(text))
        if skip_source:  # the source line Python prints under a warning header
            skip_source = False
            if indented:
                continue
        if in_traceback:
            # Before the first exception line every indented line is a frame; after it, only frames, their
            # code lines and "^^^" markers are (an exception's own message may go on with indented lines).
            code = indented and (pending is None or after_frame or frame or _CARETS.match(text))
            after_frame = frame
            if (code or not body or body in _CHAINED or _RAY_FRAME_HEADER.match(body)
                    or body.endswith(_TRACEBACK)):
                continue
            if pending is None or _EXCEPTION.match(body):
                pending = line  # a later exception line (the chain's last one) replaces an earlier one
                continue
            in_traceback = False
            collapsed += 1
            yield f"{pending}  [traceback in {log_name}]"
            pending = None
        if body.endswith(_TRACEBACK) or _RAY_FRAME_HEADER.match(body) or frame or (indented and _CARETS.match(text)):
            # a traceback, also one inside a logged message (an error reply's reason), which has no header
            in_traceback, after_frame, pending = True, frame, None
            continue
        if _FLOWER_DETAIL.match(text):
            continue
        key, short = _warning_key(text)
        if key is not None:
            skip_source = key[0] == "python"
            if key in seen:
                seen[key][0] += 1
                continue
            seen[key] = [0, short]
        yield line
    if pending is not None:
        collapsed += 1
        yield f"{pending}  [traceback in {log_name}]"
    for n, short in seen.values():
        if n:
            yield f"(repeated {n} more time{'s' if n > 1 else ''}, not shown: {short}; all in {log_name})"
    if collapsed:
        yield f"({collapsed} traceback(s) shortened to their last line; full text in {log_name})"


def _warning_key(text: str) -> tuple[tuple | None, str]:
    """A key that is equal for repeats of one warning, and a short description of it (``None`` if no warning)."""
    m = _PY_WARNING.match(text.strip())
    if m:
        where = f"{Path(m['where']).name}:{m['line']}"
        return ("python", m["category"], m["where"], m["line"]), f"{m['category']} at {where}"
    m = _LOG_WARNING.match(text.strip())
    if m:  # the same text only: our own warnings differ by round and site, and each of them matters
        return ("log", m["message"].strip()), f"WARNING {m['message'].strip()[:100]}"
    return None, ""


def _tee(proc: subprocess.Popen, fh, log: Path, timeout: float | None) -> Iterator[str]:
    """The process's output lines, each written to the log file first; kills the process after ``timeout``."""
    start = time.monotonic()
    for raw in proc.stdout or []:
        fh.write(raw)
        fh.flush()
        if timeout and time.monotonic() - start > timeout:
            proc.kill()
            raise TimeoutError(f"flwr run exceeded {timeout:.0f}s; see {log}")
        yield raw.decode(errors="replace")


def flwr_run(home: Path, connection: str, *, run_config: Path | None = None, federation_config: str | None = None,
             log: Path, timeout: float | None = None, app: Path = APP_DIR, echo: bool = False) -> int:
    """``flwr run APP CONNECTION --stream`` with our FLWR_HOME; output to ``log``, and when ``echo`` a
    summary of it to the ``fedpd.flower`` logger (:func:`console_lines`: repeated warnings counted,
    tracebacks shortened), which the command line prints."""
    args = [str(BIN / "flwr"), "run", str(app), connection, "--stream"]
    if run_config is not None:
        args += ["--run-config", str(run_config)]
    if federation_config:
        args += ["--federation-config", federation_config]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=flwr_env(home), cwd=app)
        lines = _tee(proc, fh, log, timeout)
        if echo:
            for line in console_lines(lines, log_name=str(log)):
                _log.info(line)
        else:
            for _ in lines:
                pass
        return proc.wait()


def run_statuses(home: Path, connection: str, timeout: float = 60.0) -> list[dict]:
    """The SuperLink's record of its runs (``flwr ls CONNECTION --format json``): each a dict with ``run-id``,
    ``status`` (e.g. ``finished:failed``) and ``status-details`` (e.g. ``No heartbeat received from the
    task``). Empty when the SuperLink cannot be asked: this only adds to an error message, never replaces one."""
    try:
        proc = subprocess.run([str(BIN / "flwr"), "ls", connection, "--format", "json"], capture_output=True,
                              text=True, env=flwr_env(home), timeout=timeout)
        runs = json.loads(proc.stdout).get("runs", [])
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
        return []
    return [r for r in runs if isinstance(r, dict)]


def log_problems(log: Path, limit: int = 6) -> list[str]:
    """The last ``limit`` lines of a Flower process's log that report a problem (ERROR, CRITICAL, a raised
    exception, a killed worker), for an error message: where a run died outside the ServerApp (the
    simulation process, Ray), the SuperLink's log holds the cause."""
    if not log.is_file():
        return []
    lines = (_ANSI.sub("", line).strip() for line in log.read_text(errors="replace").splitlines())
    found = [line[:300] for line in lines if _PROBLEM.search(line)]
    return found[-limit:]


_PROBLEM = re.compile(r"\b(?:ERROR|CRITICAL)\b|^Traceback|\w(?:Error|Exception): |[Kk]illed|out of memory|[Hh]eartbeat")

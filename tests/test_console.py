"""Library functions log, the command line prints (common/cli.py ``console``; issue 14 item 5)."""

import ast
import logging
from pathlib import Path

from common.cli import console

ROOT = Path(__file__).resolve().parents[1]
# modules that are commands themselves: they may print
COMMANDS = {"common/cli.py", "simulation/commands.py", "simulation/demo.py"}


def test_console_sends_info_to_stdout_and_warnings_to_stderr_once(capsys):
    assert console() is console()  # one handler, however often it is installed
    assert sum(h is console() for h in logging.getLogger("fedpd").handlers) == 1
    log = logging.getLogger("fedpd.example")
    log.info("ingest: 3 scans kept")
    log.warning("ingest: warning: 1 scan excluded")
    out, err = capsys.readouterr()
    assert out == "ingest: 3 scans kept\n" and err == "ingest: warning: 1 scan excluded\n"


def test_no_library_module_prints():
    offenders = []
    for package in ("common", "client", "server", "simulation"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in COMMANDS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders

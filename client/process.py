"""What a ClientApp process knows of itself: its age, whether it answered before, its parsed run-config.

Torch-free on purpose: a deployed ClientApp process imports this, Flower and numpy only, and hands the work to
the site worker (client/worker.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context

from common.config import RunConfig

__all__ = ["process_age", "startup_seconds", "run_config"]

_ANSWERED = False  # whether this process already answered a message (simulation actors answer many)
_PARSED: tuple = (None, None)  # (the run-config mapping last parsed, its RunConfig)


def process_age() -> float | None:
    """Seconds since this process started, from Linux's ``/proc`` (``None`` elsewhere, or unreadable)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time, ticks after boot
    return max(0.0, uptime - started)


def startup_seconds() -> float:
    """``startup-seconds`` of this message: the process's age for its first message (0.0 when unknown, off
    Linux), 0.0 for every later one (the imports were paid already).

    In a deployment Flower starts a fresh ``flwr-clientapp`` process for every message, so this is the
    interpreter, Flower, the imports and the message pull that precede every training or evaluation (plus, in
    the site worker's first message, the worker's own start: client/worker.py adds it)."""
    global _ANSWERED
    first, _ANSWERED = not _ANSWERED, True
    return float(process_age() or 0.0) if first else 0.0


def run_config(context: Context) -> RunConfig:
    """This message's RunConfig, parsed once for its mods and handler (they all read the same mapping)."""
    global _PARSED
    if _PARSED[0] is not context.run_config:  # Flower merged the defaults into run_config already
        _PARSED = (context.run_config, RunConfig.from_mapping(context.run_config, defaults={}))
    return _PARSED[1]

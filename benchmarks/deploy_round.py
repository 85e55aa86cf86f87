"""Benchmark a real deployment round on loopback: where a round's wall time goes.

Starts a SuperLink and one SuperNode per site of a phantom cohort (MNI space, natural partition) on
127.0.0.1, runs ``flwr run`` for ``--rounds`` rounds, and samples every Flower process of the run from
/proc every 0.2 s. Prints per round the train and evaluate phases (from the ServerApp's log lines), and
per process kind the count, mean life and mean CPU seconds: ``flwr-clientapp`` is one process per site
message (train or evaluate), so its start-up (Python, Flower, torch, MONAI imports) is paid every message.

    .venv/bin/python benchmarks/deploy_round.py --rounds 2            # 3 sites, 32^3 phantom, 16^3 input

Results and the command that produced them go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cohort.ingest import ingest  # noqa: E402
from common.cohort.splits import partition_manifest, split_manifest  # noqa: E402
from simulation.flower import (APP_DIR, BIN, flwr_env, free_port, start_superlink, start_supernode, stop,  # noqa: E402
                               write_connections, write_run_config)
from simulation.phantom import generate_phantom  # noqa: E402

KINDS = ("flwr-clientapp", "flwr-serverapp", "flower-superlink", "flower-supernode", "flower-superexec")
PHASES = {"configure_train": "train start", "aggregate_train": "train end", "configure_evaluate": "evaluate start",
          "aggregate_evaluate": "evaluate end"}


class Sampler(threading.Thread):
    """CPU seconds and life of every Flower process, sampled from /proc."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.seen, self.running = period, {}, True
        self.t0 = time.monotonic()
        self.tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while self.running:
            now = time.monotonic() - self.t0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                kind = next((k for k in KINDS if k in cmd), None)
                if kind:
                    cpu = (int(stat[11]) + int(stat[12])) / self.tick
                    first = self.seen.get(pid, (kind, now, now, 0.0))[1]
                    self.seen[pid] = (kind, first, now, cpu)
            time.sleep(self.period)


def cohort(root: Path, subjects: int, sites: int, shape: int) -> Path:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        generate_phantom(root / "download", subjects=subjects, sites=sites, shape=shape, effect=1.0, seed=1, space="mni")
        ingest(root / "download", csv=root / "download" / "idaSearch.csv", sites_csv=root / "download" / "centres.csv",
               out=root / "manifest.csv")
        split_manifest(root / "manifest.csv", val=0.2, test=0.25, seed=0)
        partition_manifest(root / "manifest.csv", scheme="natural", out=root / "partition", seed=0)
    return root / "partition"


def start_federation(root: Path, partition: Path, procs: list, node_extra: str = "") -> Path:
    """A SuperLink and one SuperNode per ``partition/sites/*.csv`` on loopback (appended to ``procs``, for the
    caller to stop), each with ``node_extra`` added to its node-config; returns the CLI's FLWR_HOME with a
    ``deploy`` connection to the SuperLink."""
    link = start_superlink(root / "link", port=free_port())
    procs.append(link)
    for name in sorted(f.stem for f in (partition / "sites").glob("*.csv")):
        procs.append(start_supernode(root / f"site-{name}", f"127.0.0.1:{link.port}", name=f"site-{name}",
                                     node_config=f"data-path='{partition / 'sites' / f'{name}.csv'}' "
                                                 f"cache-dir='{root / 'cache' / name}'{node_extra}"))
    home = root / "cli"
    write_connections(home, {"deploy": {"address": f"127.0.0.1:{link.port}", "insecure": True}})
    return home


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--subjects", type=int, default=30)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--shape", type=int, default=32, help="phantom volume edge (voxels)")
    p.add_argument("--input", type=int, default=16, help="network input edge (voxels)")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()

    root = a.out or Path(tempfile.mkdtemp(prefix="fedpd-deploy-round-"))
    partition = cohort(root / "cohort", a.subjects, a.sites, a.shape)
    names = sorted(f.stem for f in (partition / "sites").glob("*.csv"))
    procs, marks, sampler = [], [], Sampler()
    sampler.start()
    try:
        home = start_federation(root, partition, procs)
        edge = a.input
        overrides = {"input-shape": f"{edge},{edge},{edge}", "spacing": ",".join([f"{192 / edge:.1f}"] * 3),
                     "batch-size": 4, "num-server-rounds": a.rounds, "server-manifest": str(partition / "server.csv"),
                     "out-dir": str(root / "run")}
        started = time.monotonic()
        cli = subprocess.Popen([str(BIN / "flwr"), "run", str(APP_DIR), "deploy", "--stream", "--run-config",
                                str(write_run_config(root / "rc.toml", overrides))], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=flwr_env(home), cwd=APP_DIR)
        for raw in cli.stdout:
            line = raw.decode(errors="replace")
            for key, label in PHASES.items():
                if key in line:
                    marks.append((label, time.monotonic() - started))
        code = cli.wait()
        total = time.monotonic() - started
    finally:
        for proc in procs:
            stop(proc)
        sampler.running = False
        sampler.join()
    rounds = [json.loads(x) for x in (root / "run" / "rounds.jsonl").read_text().splitlines() if x.strip()]
    print(f"deployment: {len(names)} SuperNodes, {a.subjects} subjects, {a.shape}^3 phantom, {a.input}^3 input, "
          f"{a.rounds} round(s); flwr run exit {code}, {total:.1f} s from flwr run to its exit")
    for r in rounds:
        print(f"  round {r['round']}: wall {r['wall_seconds']:.1f} s (rounds.jsonl)")
    times = {}
    for label, t in marks:
        times.setdefault(label, []).append(t)
    for phase in ("train", "evaluate"):
        spans = [e - s for s, e in zip(times.get(f"{phase} start", []), times.get(f"{phase} end", []))]
        print(f"  {phase} phase per round: " + ", ".join(f"{s:.1f} s" for s in spans))
    print(f"  {'process kind':<18} {'count':>5} {'mean life s':>12} {'mean CPU s':>11} {'total CPU s':>12}")
    grand = 0.0
    for kind in KINDS:
        rows = [v for v in sampler.seen.values() if v[0] == kind]
        if rows:
            cpu = sum(r[3] for r in rows)
            grand += cpu
            print(f"  {kind:<18} {len(rows):>5} {sum(r[2] - r[1] for r in rows) / len(rows):>12.1f} "
                  f"{cpu / len(rows):>11.1f} {cpu:>12.1f}")
    print(f"  all Flower processes: {grand:.1f} CPU s over {total:.1f} s wall on {os.cpu_count()} cores "
          f"({100 * grand / (total * os.cpu_count()):.0f} % busy)")
    sys.exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()

"""Round overhead (issue 16 item 1): the part of a round that is neither local training nor evaluation.

Three measurements, one invocation each:

``imports``  Where a fresh ClientApp process's start-up goes: interpreter, Flower's ClientApp modules, torch,
             MONAI and fedpd's ``client.app``, each imported alone in a fresh interpreter (median of
             ``--repeats``). In a deployment Flower starts one such process per site message.
``sim``      A simulation (3 sites by default, 64^3 input): per round, the wall time minus the sites' training
             loops (``train-seconds``), the sites' validation loops (``eval-seconds``) and the server's
             validation (``val.seconds``), all from ``rounds.jsonl``. The simulation runs one ClientApp at a
             time (each gets every core), so these add up; the rest is overhead: each message's set-up
             (``setup-seconds``: config, model build, weight loading, manifest and cache open), the ClientApp
             actors' start-up (round 1), and the remainder (serialisation, Flower's message passing,
             aggregation, screening, the checkpoint). Target: <= 5 % of the round.
``deploy``   A real deployment on loopback (a SuperLink, one SuperNode per site), in the same invocation: first
             a no-op Flower app (``benchmarks/noop_app``: model-sized arrays of random numbers, new in
             every reply, through train and evaluate messages, nothing else) for Flower's floor per round,
             then fedpd for as many rounds. Overhead above the floor = fedpd's round - the no-op round -
             (the slowest site's training loop + the slowest site's validation loop + the server's
             validation). Each message's ``startup-seconds`` (process start to the handler: interpreter,
             Flower, imports) and ``setup-seconds`` show where it goes. Target: <= 2 s. Sites train side by
             side while the others' messages still travel, so with several sites a round can come out below
             the floor (negative): one round's figure resolves about +-3 s; quote the median over rounds
             and repeats.

    .venv/bin/python benchmarks/round_overhead.py imports
    .venv/bin/python benchmarks/round_overhead.py sim --rounds 3                # 3 sites, 64^3
    .venv/bin/python benchmarks/round_overhead.py deploy --rounds 3             # 3 SuperNodes, 32^3 input

``deploy --repeats K`` pairs the runs: K times a no-op run, then fedpd, on the same federation, each fedpd round
measured against the no-op run just before it (this machine's load drifts over minutes). Both ServerApps poll
for replies every ``--poll-interval`` seconds (fedpd's run-config ``poll-interval``, default 0.1; Flower's own
deployment Grid waits 3 s, which puts each phase of a round on a 3-s tick); ``--flower-floor`` adds one no-op
run with Flower's 3-s wait, for reference.

``deploy --site-worker on off`` runs a second federation whose SuperNodes say ``site-worker='false'``: every
message then pays a fresh process's imports, as before the site worker (client/worker.py).
``deploy`` also runs fedpd a second time with ``transport-dtype=float16`` and both with ``log-message-size``:
the bytes Flower's ``message_size_mod`` logged at the sites, per message and per site and round (item 2).

Results and the commands go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import keys  # noqa: E402

IMPORTS = (
    ("interpreter", "pass"),
    ("flwr ClientApp", "import flwr.clientapp, flwr.app"),
    ("torch", "import torch"),
    ("monai (with torch)", "import monai"),
    ("fedpd client.app (thin ClientApp)", "import client.app"),
    ("fedpd client.handlers (worker)", "import client.handlers"),
)


def _median_seconds(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE.parent)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def imports(a: argparse.Namespace) -> None:
    print(f"fresh-interpreter import times, median of {a.repeats} ({sys.executable}):")
    base = None
    for label, code in IMPORTS:
        s = _median_seconds(code, a.repeats)
        base = s if base is None else base
        print(f"  {label:<24} {s:6.2f} s  ({s - base:+.2f} s over the bare interpreter)")


def _cohort(root: Path, subjects: int, sites: int, shape: int) -> Path:
    from deploy_round import cohort  # benchmarks/deploy_round.py: MNI-space phantom, split, natural partition
    return cohort(root, subjects, sites, shape)


def _overrides(edge: int, batch: int) -> dict:
    return {"input-shape": f"{edge},{edge},{edge}", "spacing": ",".join([f"{192 / edge:.1f}"] * 3),
            "batch-size": batch}


def _rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines() if x.strip()]


def _site_sum(rec: dict, part: str, key: str, how=sum) -> float:
    values = [float(m.get(key, 0.0) or 0.0) for m in rec[part].values()]
    return how(values) if values else 0.0


def sim(a: argparse.Namespace) -> None:
    from simulation.simulate import simulate

    root = a.out or Path(tempfile.mkdtemp(prefix="fedpd-round-overhead-"))
    partition = _cohort(root / "cohort", a.subjects, a.sites, a.shape)
    overrides = _overrides(a.input, a.batch_size) | {"model-depth": a.depth}
    rc = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
    started = time.monotonic()
    simulate(partition, a.rounds, root / "run", run_config=rc, echo=False)
    total = time.monotonic() - started
    recs = _rounds(root / "run")
    print(f"simulation: {a.sites} sites, {a.subjects} subjects, {a.shape}^3 phantom, {a.input}^3 input, batch "
          f"{a.batch_size}, {a.rounds} round(s), {total:.0f} s from start to report")
    print(f"  {'round':>5} {'wall s':>7} {'train s':>8} {'site eval s':>11} {'server val s':>12} {'overhead s':>10} "
          f"{'share':>6} | {'start-up s':>10} {'set-up s':>8} {'rest s':>7}")
    shares = []
    for r in recs:
        train = _site_sum(r, "sites", keys.TRAIN_SECONDS)
        site_eval = _site_sum(r, "site_eval", keys.EVAL_SECONDS)
        val = float(r["val"].get("seconds") or 0.0)
        over = r["wall_seconds"] - train - site_eval - val
        startup = _site_sum(r, "sites", keys.STARTUP_SECONDS) + _site_sum(r, "site_eval", keys.STARTUP_SECONDS)
        setup = _site_sum(r, "sites", keys.SETUP_SECONDS) + _site_sum(r, "site_eval", keys.SETUP_SECONDS)
        share = over / r["wall_seconds"]
        shares.append(share)
        print(f"  {r['round']:>5} {r['wall_seconds']:7.1f} {train:8.1f} {site_eval:11.1f} {val:12.1f} {over:10.1f} "
              f"{100 * share:5.1f}% | {startup:10.1f} {setup:8.1f} {over - startup - setup:7.1f}")
    if len(shares) > 1:
        print(f"  overhead share, rounds 2..{len(shares)}: median {100 * statistics.median(shares[1:]):.1f} % "
              f"(target <= 5 %); round 1 (actor start-up, cache fill): {100 * shares[0]:.1f} %")


def _shapes_file(path: Path, depth: int) -> Path:
    from common.config import RunConfig
    from common.learning.model import exchanged_keys, make_model

    model = make_model(RunConfig.from_mapping({"model-depth": depth}))
    state = model.state_dict()
    spec = [[k, list(state[k].shape), str(state[k].numpy().dtype)] for k in exchanged_keys(model)]
    path.write_text(json.dumps(spec))
    return path


def _flwr_run(app: Path, conn: str, home: Path, rc: Path) -> float:
    from simulation.flower import BIN, flwr_env

    started = time.monotonic()
    proc = subprocess.run([str(BIN / "flwr"), "run", str(app), conn, "--stream", "--run-config", str(rc)],
                          env=flwr_env(home), cwd=app, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"flwr run {app} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.monotonic() - started


def _sizes(text: str, direction: str) -> list[int]:
    """Sizes Flower's message_size_mod logged on a SuperNode (run-config log-message-size), bytes."""
    return [int(m) for m in re.findall(rf"{direction} message size: (\d+) bytes", text)]


def _model_bytes(depth: int) -> tuple[int, int]:
    """(trainable-parameter bytes, exchanged state bytes) of fedpd's Med3D, float32."""
    from common.config import RunConfig
    from common.learning.model import exchanged_keys, make_model

    model = make_model(RunConfig.from_mapping({"model-depth": depth}))
    state = model.state_dict()
    return (sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
            sum(state[k].numel() * state[k].element_size() for k in exchanged_keys(model)))


def _noop(root: Path, home: Path, a: argparse.Namespace, n_sites: int, poll: float, tag: str) -> tuple[float, list[dict]]:
    """One run of the no-op app: (flwr run to exit, its rounds' start/end/start-up records)."""
    from simulation.flower import write_run_config

    out = root / f"noop-{tag}.json"
    rc = write_run_config(root / f"noop-{tag}.toml", {
        "num-server-rounds": a.rounds, "min-nodes": n_sites, "out": str(out), "poll-interval": poll,
        "shapes": str(_shapes_file(root / "shapes.json", a.depth))})
    total = _flwr_run(HERE / "noop_app", "deploy", home, rc)
    return total, json.loads(out.read_text())


def _above_floor(recs: list[dict], noop: list[dict]) -> list[tuple[dict, dict, float]]:
    """Per round: (fedpd record, no-op record, seconds above the floor) = fedpd's round - the no-op's round -
    (slowest site's training loop + slowest site's validation loop + the server's validation)."""
    rows = []
    for r, nr in zip(recs, noop):
        train = _site_sum(r, "sites", keys.TRAIN_SECONDS, max)
        site_eval = _site_sum(r, "site_eval", keys.EVAL_SECONDS, max)
        val = float(r["val"].get("seconds") or 0.0)
        rows.append((r, nr, r["wall_seconds"] - (nr["end"] - nr["start"]) - train - site_eval - val))
    return rows


def _print_rounds(rows: list[tuple[dict, dict, float]]) -> None:
    print(f"  {'round':>5} {'fedpd s':>8} {'floor s':>8} {'train s':>8} {'eval s':>7} {'val s':>6} "
          f"{'above floor s':>13} | per message, slowest site: {'start-up s':>10} {'(no-op s)':>9} {'set-up s':>8}")
    for r, nr, extra in rows:
        startup = (_site_sum(r, "sites", keys.STARTUP_SECONDS, max), _site_sum(r, "site_eval", keys.STARTUP_SECONDS, max))
        setup = (_site_sum(r, "sites", keys.SETUP_SECONDS, max), _site_sum(r, "site_eval", keys.SETUP_SECONDS, max))
        print(f"  {r['round']:>5} {r['wall_seconds']:8.1f} {nr['end'] - nr['start']:8.1f} "
              f"{_site_sum(r, 'sites', keys.TRAIN_SECONDS, max):8.1f} {_site_sum(r, 'site_eval', keys.EVAL_SECONDS, max):7.1f} "
              f"{float(r['val'].get('seconds') or 0.0):6.1f} {extra:13.1f} | train {startup[0]:5.1f} / eval {startup[1]:5.1f} "
              f"({nr.get('startup-train', 0.0):4.1f} / {nr.get('startup-evaluate', 0.0):4.1f})   train {setup[0]:4.1f} / eval "
              f"{setup[1]:4.1f}")


def deploy(a: argparse.Namespace) -> None:
    from deploy_round import start_federation
    from simulation.flower import APP_DIR, stop, write_run_config

    root = a.out or Path(tempfile.mkdtemp(prefix="fedpd-round-overhead-"))
    partition = _cohort(root / "cohort", a.subjects, a.sites, a.shape)
    names = sorted(f.stem for f in (partition / "sites").glob("*.csv"))
    totals: dict[str, list[float]] = {}
    logs: dict[str, str] = {}
    runs: list[tuple[str, str, int, Path, list[dict]]] = []  # key, dtype, repeat, run folder, the paired no-op rounds
    default_floor = None
    for worker in a.site_worker:  # one federation each: site-worker is the SuperNodes' node-config
        procs = []
        fed = root / f"site-worker-{worker}"
        try:
            home = start_federation(fed, partition, procs, node_extra="" if worker == "on" else " site-worker='false'")
            if a.flower_floor and default_floor is None:  # the no-op with Flower's own 3-s Grid poll, once
                total, default_floor = _noop(root, home, a, len(names), 3.0, "flower-poll")
                totals.setdefault("no-op, Flower's 3 s poll", []).append(total)
            for rep in range(a.repeats):  # paired: a no-op run right before each fedpd run, same poll interval
                total, floor = _noop(root, home, a, len(names), a.poll_interval, f"{worker}-{rep}")
                totals.setdefault(f"no-op, poll {a.poll_interval:g} s", []).append(total)
                for dtype in a.transport:
                    key = f"{dtype}, site worker {worker}"
                    before = {p.pid: len(p.log_text()) for p in procs[1:]}
                    run = fed / f"run-{dtype}-{rep}"
                    rc = write_run_config(fed / f"fedpd-{dtype}-{rep}.toml", _overrides(a.input, a.batch_size) | {
                        "num-server-rounds": a.rounds, "min-nodes": len(names), "model-depth": a.depth,
                        "transport-dtype": dtype, "log-message-size": True, "poll-interval": a.poll_interval,
                        "server-manifest": str(partition / "server.csv"), "out-dir": str(run)})
                    totals.setdefault(key, []).append(_flwr_run(APP_DIR, "deploy", home, rc))
                    logs[key] = logs.get(key, "") + "".join(p.log_text()[before[p.pid]:] for p in procs[1:])
                    runs.append((key, dtype, rep, run, floor))
        finally:
            for proc in procs:
                stop(proc)
    print(f"deployment on loopback: {len(names)} SuperNodes, {a.subjects} subjects, {a.shape}^3 phantom, {a.input}^3 "
          f"input, batch {a.batch_size}, resnet_{a.depth}, {a.rounds} round(s) per app, {a.repeats} paired repeat(s), "
          f"ServerApps poll every {a.poll_interval:g} s; flwr run to exit: "
          + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in vs) + " s" for k, vs in totals.items()))
    trainable, exchanged = _model_bytes(a.depth)
    print(f"  resnet_{a.depth}: trainable parameters {trainable / 1e6:.1f} MB float32; exchanged state (with BatchNorm "
          f"statistics) {exchanged / 1e6:.1f} MB")
    if default_floor:
        ends = [r["end"] - r["start"] for r in default_floor]
        print("  Flower's floor with its own 3-s Grid poll, per round: " + ", ".join(f"{x:.1f}" for x in ends) + " s")
    later: dict[str, list[float]] = {}
    for key, dtype, rep, run, floor in runs:
        rows = _above_floor(_rounds(run), floor)
        print(f"  fedpd, transport-dtype {key}, repeat {rep + 1} (its no-op run just before it):")
        _print_rounds(rows)
        warm = [x for r, _, x in rows if r["round"] > 1]
        later.setdefault(key, []).extend(warm)
        if warm:
            print(f"    seconds per round above Flower's floor, rounds 2..{a.rounds}: median {statistics.median(warm):.1f}")
    for key, values in later.items():
        if values:
            print(f"  {key}: seconds above the floor, rounds 2..{a.rounds} of {a.repeats} repeat(s): median "
                  f"{statistics.median(values):.1f}, min {min(values):.1f}, max {max(values):.1f}, "
                  f"{sum(v <= 2.0 for v in values)} of {len(values)} rounds <= 2 s (target <= 2 s)")
    for key in logs:
        got, sent = _sizes(logs[key], "Incoming"), _sizes(logs[key], "Outgoing")
        if got and sent:
            per_round = (sum(got) + sum(sent)) / (len(names) * a.rounds * a.repeats)
            print(f"    {key}: message_size_mod at the sites: received max {max(got) / 1e6:.2f} MB, sent max "
                  f"{max(sent) / 1e6:.2f} MB per message; {per_round / 1e6:.1f} MB per site per round both ways "
                  f"({len(got)} messages in, {len(sent)} out)")
    pair = [f"{d}, site worker {a.site_worker[0]}" for d in ("float32", "float16")]
    if all(k in logs for k in pair):
        full = max(_sizes(logs[pair[0]], "Incoming")) + max(_sizes(logs[pair[0]], "Outgoing"))
        half = max(_sizes(logs[pair[1]], "Incoming")) + max(_sizes(logs[pair[1]], "Outgoing"))
        print(f"  float16 / float32 bytes of a training exchange (weights in + update out): {half / full:.3f} "
              "(target <= 0.51)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("imports", help="fresh-interpreter import times")
    q.add_argument("--repeats", type=int, default=5)
    for name, shape, edge, subjects in (("sim", 64, 64, 60), ("deploy", 32, 32, 30)):
        q = sub.add_parser(name)
        q.add_argument("--rounds", type=int, default=3)
        q.add_argument("--subjects", type=int, default=subjects)
        q.add_argument("--sites", type=int, default=3)
        q.add_argument("--shape", type=int, default=shape, help="phantom volume edge (voxels)")
        q.add_argument("--input", type=int, default=edge, help="network input edge (voxels)")
        q.add_argument("--batch-size", type=int, default=4)
        q.add_argument("--depth", type=int, default=10, help="resnet depth")
        q.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
        if name == "deploy":
            q.add_argument("--transport", nargs="+", choices=("float32", "float16"), default=["float32", "float16"],
                           help="run fedpd once per transport-dtype, after the no-op app")
            q.add_argument("--repeats", type=int, default=1,
                           help="paired repeats: a no-op run, then fedpd, on the same federation, this many times")
            q.add_argument("--poll-interval", type=float, default=0.1,
                           help="seconds between both ServerApps' checks for replies (fedpd's poll-interval)")
            q.add_argument("--flower-floor", action="store_true",
                           help="also run the no-op once with Flower's own 3-s Grid poll, for reference")
            q.add_argument("--site-worker", nargs="+", choices=("on", "off"), default=["on"],
                           help="one federation per setting: the sites' long-lived worker (client/worker.py) on, "
                                "or off (a fresh process per message)")
    a = p.parse_args()
    {"imports": imports, "sim": sim, "deploy": deploy}[a.what](a)


if __name__ == "__main__":
    main()

"""End to end on real Flower processes: simulation (fedpd simulate and plain flwr run) and resume after a
kill. Deployments with real SuperLinks and SuperNodes are in test_deploy.py (2 sites over TLS with
authentication, from the kits), test_faults.py (3 sites, insecure; faults) and test_bad_site.py.

Every process is started on free ports with its own FLWR_HOME and stopped by PID in ``finally``.
The cohort is deploy_helpers.make_cohort (phantom at 32^3 through the real ingest/split/partition path), the
network input 16^3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import keys
from common.runs.rundir import RunDir, git_commit
from simulation.flower import APP_DIR, BIN, flwr_env, free_port, write_connections, write_run_config

try:
    from deploy_helpers import SMALL, make_cohort, processes
    from deploy_helpers import rounds as _rounds
except ImportError:  # run as a package
    from tests.deploy_helpers import SMALL, make_cohort, processes
    from tests.deploy_helpers import rounds as _rounds

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort")) / "partition"


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def _check_outputs(out: Path, rounds: int, sites: set[str]):
    recs = _rounds(out)
    assert [r["round"] for r in recs] == list(range(1, rounds + 1))
    for r in recs:
        assert set(r["sites"]) == sites, f"round {r['round']}: trained sites {sorted(r['sites'])}"
        assert r["missing_sites"] == []
        assert r["num_examples"] == sum(s["num-examples"] for s in r["sites"].values())
        assert 0.0 <= r["val"]["auc"] <= 1.0
        # where the round's time went (benchmarks/round_overhead.py): the server's validation, and per site its
        # process start-up, set-up and loop, in train and evaluate replies
        assert r["val"]["seconds"] > 0
        for phase, loop in ((r["sites"], keys.TRAIN_SECONDS), (r["site_eval"], keys.EVAL_SECONDS)):
            for m in phase.values():
                assert m[keys.STARTUP_SECONDS] >= 0 and m[keys.SETUP_SECONDS] > 0 and m[loop] >= 0
    for k in range(1, rounds + 1):
        assert (out / "checkpoints" / f"round-{k}.pt").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == "phantom"
    assert report["git_commit"] == git_commit()  # provenance survives Flower's FAB install (no .git there)
    assert 1 <= report["selected_round"] <= rounds
    assert set(report["test"]["auc"]) >= {"value", "ci95"}
    assert set(report["test_per_site"]) <= sites
    counts = report["data"]["site_train_counts"]
    assert set(counts) == sites and all(c["pd"] + c["control"] == c["num_examples"] > 0 for c in counts.values())
    assert report["data"]["server_split_audit"]["subjects_shared_across_splits"] == 0
    return recs, report


def _site_names(partition: Path) -> set[str]:
    return {p.stem for p in (partition / "sites").glob("*.csv")}


def test_flwr_run_local_simulation(cohort, tmp_path):
    """The README's plain `flwr run . local` form: Flower starts its own simulation SuperLink. The run uses
    strategy=fedyogi (Flower's FedYogi, server-side adaptive optimizer): its moments are in the checkpoint."""
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    write_connections(home, {"local": {"address": ":local:"}})
    cfg = write_run_config(tmp_path / "rc.toml", SMALL | {
        "num-server-rounds": 1, "min-nodes": 3, "partition-dir": str(cohort), "strategy": "fedyogi",
        "server-manifest": str(cohort / "server.csv"), "out-dir": str(out)})
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    env = flwr_env(home, **ports)
    try:
        proc = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "local", "--stream", "--run-config", str(cfg),
                               "--federation-config", "num-supernodes=3 client-resources-num-cpus=2"],
                              env=env, cwd=APP_DIR, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _check_outputs(out, 1, _site_names(cohort))
        state = RunDir.load_checkpoint(out / "checkpoints" / "round-1.pt")["strategy"]
        assert state["name"] == "fedyogi" and set(state["state"]) == {"m_t", "v_t"}
    finally:
        # the CLI leaves its SuperLink running (FLOWER.md §2): find it by its port and stop it by PID
        port = ports["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
        pids = [pid for pid, args in processes() if "flower-superlink" in " ".join(args) and port in args]
        assert pids, "the local SuperLink started by flwr run was not found"
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            _wait_gone(pid)


def test_simulate_resume_after_kill(cohort, tmp_path):
    """A 3-round `fedpd simulate` is killed once round 1 is checkpointed, resumed, and ends with 3 rounds;
    the records of the checkpointed rounds are unchanged.

    The server appends a round's record to rounds.jsonl before it saves that round's checkpoint, and resume
    truncates rounds.jsonl to the last checkpoint. A kill between the two makes resume redo that round, so
    the test waits for the checkpoint (written atomically) and compares only the checkpointed rounds.

    The run uses strategy=fedadam: resume restores the server optimizer's moments from the checkpoint (the
    log says so), so round 2 continues Adam rather than restarting it."""
    out = tmp_path / "run"
    rc = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in SMALL.items()) + " strategy='fedadam'"
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--partition", str(cohort), "--rounds", "3",
           "--out", str(out), "--run-config", rc]
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(cmd, cwd=APP_DIR, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 480
        while not (out / "checkpoints" / "round-1.pt").is_file():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 was never checkpointed"
            time.sleep(0.5)
        first.send_signal(signal.SIGTERM)  # fedpd simulate stops its SuperLink (and the ServerApp) on SIGTERM
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    saved = RunDir(out).saved_rounds()
    # a later round may have its record but not yet its checkpoint: resume redoes it, so it is not compared
    before = [r for r in _rounds(out) if r["round"] <= saved[-1]]
    assert saved == [r["round"] for r in before] == list(range(1, saved[-1] + 1))
    assert 1 <= saved[-1] < 3 and not (out / "report.json").exists()

    again = subprocess.run(cmd[:-1] + [rc + " resume=true"], cwd=APP_DIR, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"from round {saved[-1] + 1}" in again.stdout, again.stdout[-3000:]
    assert "resume: restored the strategy's m_t, v_t" in again.stdout, again.stdout[-3000:]
    recs, report = _check_outputs(out, 3, _site_names(cohort))
    assert recs[: len(before)] == before  # nothing checkpointed by the first run was lost or rewritten
    assert "test AUC" in again.stdout and "phantom" in again.stdout

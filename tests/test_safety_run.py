"""Issue 12 through the command line: runs refuse bad input before Flower starts and never look successful
when they are not.

Every test calls ``fedpd`` (``common.cli.main``) as a user would and checks the exit code, that the
message names the file or key and the fix, that no traceback is printed, and that the inputs are
unchanged (sha256). The last test starts a real simulation whose sites all fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import common.cohort.scans as scans
from common.cli import main
from common.cohort.manifest import read_manifest, write_manifest
from tests.ckpt_utils import random_backbone_state, write_official
from tests.data_factory import scan_cohort

SMALL = "input-shape='16,16,16' spacing='4.0,4.0,4.0' batch-size=4"


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "cache" not in p.parts}


@pytest.fixture()
def partition(tmp_path) -> Path:
    """A real 3-site partition of 16^3 NIfTI scans (subject split, natural partition)."""
    return scan_cohort(tmp_path, {(1, "A"): 5, (0, "A"): 3, (1, "B"): 5, (0, "B"): 3, (1, "C"): 4, (0, "C"): 3})


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    return code, text


def _simulate(capsys, partition, out, extra=""):
    return _run(capsys, "simulate", "--partition", partition, "--rounds", 1, "--out", out, "--run-config",
                f"{SMALL} {extra}")


def test_simulate_refuses_a_folder_that_holds_a_run(partition, tmp_path, capsys):
    out = tmp_path / "runs" / "old"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "round-3.pt").write_bytes(b"old weights")
    (out / "report.json").write_text(json.dumps({"test": {"auc": {"value": 0.9}}}))
    before, inputs = _checksums(out), _checksums(partition)
    code, text = _simulate(capsys, partition, out)
    assert code == 2
    assert str(out) in text and "already holds a run" in text and "resume=true" in text and "new --out" in text
    assert "0.9" not in text and "AUC" not in text  # the old report is not shown as if it were this run's
    assert not (out / ".flwr").exists()  # Flower never started
    assert _checksums(out) == before and _checksums(partition) == inputs


def test_holdout_run_into_an_old_run_writes_nothing(partition, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "rounds.jsonl").write_text('{"round": 1}\n')
    code, text = _run(capsys, "simulate", "--partition", partition, "--out", out, "--holdout-site", "A")
    assert code == 2 and "already holds a run" in text
    assert sorted(p.name for p in out.iterdir()) == ["rounds.jsonl"]


@pytest.mark.parametrize("extra, key, fix", [
    ("min-nodes=4", "min-nodes", "set min-nodes <= 3"),
    ("lr=inf", "'lr'", "finite"),
    ("round-timeout=nan", "'round-timeout'", "finite"),
    ("poll-interval=0.0", "'poll-interval'", "must be > 0"),
    ("pretrained-path='/no/such/resnet_10.pth'", "pretrained-path", "no such file"),
])
def test_simulate_config_errors_stop_before_flower(partition, tmp_path, capsys, extra, key, fix):
    out = tmp_path / "run"
    inputs = _checksums(partition)
    code, text = _simulate(capsys, partition, out, extra)
    assert code == 2 and key in text and fix in text
    assert not out.exists()  # nothing created for a run that cannot start
    assert _checksums(partition) == inputs


def test_pretrained_checkpoint_that_does_not_load_strictly_is_refused_up_front(partition, tmp_path, capsys):
    ckpt = write_official(random_backbone_state(depth=18), tmp_path / "resnet_18.pth")
    code, text = _simulate(capsys, partition, tmp_path / "run", f"pretrained-path='{ckpt}' model-depth=10")
    assert code == 2 and "pretrained-path" in text and str(ckpt) in text
    assert not (tmp_path / "run").exists()


def test_unwritable_out_is_a_clear_error(partition, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, text = _simulate(capsys, partition, blocker / "run")
    assert code == 2 and str(blocker / "run") in text and "writable" in text
    assert blocker.read_text() == "not a folder"


def test_hand_edited_partition_that_leaks_subjects_is_refused(partition, tmp_path, capsys):
    a = read_manifest(partition / "sites" / "A.csv", require_split=True)
    b = read_manifest(partition / "sites" / "B.csv", require_split=True)
    server = read_manifest(partition / "server.csv", require_split=True)
    moved = b[b["split"] == "train"].iloc[[0]].assign(site="A")  # a subject of B copied into A's file
    write_manifest(pd.concat([a, moved]), partition / "sites" / "A.csv")
    leaked = a[a["split"] == "train"].iloc[[0]].assign(split="test")  # a training subject of A in the test rows
    write_manifest(pd.concat([server, leaked]), partition / "server.csv")
    inputs = _checksums(partition)
    code, text = _simulate(capsys, partition, tmp_path / "run")
    assert code == 2
    assert f"{moved['subject_id'].iloc[0]} (A/B)" in text
    assert "sites/A.csv trains on 1 subject(s) that server.csv holds out: " + leaked["subject_id"].iloc[0] in text
    assert "fedpd partition" in text and _checksums(partition) == inputs


def test_every_bad_scan_is_listed_at_once_and_the_check_is_cached(partition, tmp_path, capsys, monkeypatch):
    site = read_manifest(partition / "sites" / "A.csv", require_split=True)
    server = read_manifest(partition / "server.csv", require_split=True)
    bad = {}
    for name, data in (("nan", np.full((16, 16, 16), np.nan)), ("scout", np.random.rand(16, 16, 3)),
                       ("empty", np.zeros((16, 16, 16)))):
        import nibabel as nib

        bad[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(bad[name]))
    site.loc[0, "path"], site.loc[1, "path"] = str(bad["nan"]), str(bad["scout"])
    test_idx = server.index[server["split"] == "test"][0]
    server.loc[test_idx, "path"] = str(bad["empty"])
    write_manifest(site, partition / "sites" / "A.csv")
    write_manifest(server, partition / "server.csv")
    inputs = _checksums(partition)

    calls = []
    real = scans.scan_problem
    monkeypatch.setattr(scans, "scan_problem", lambda p: calls.append(p) or real(p))
    code, text = _simulate(capsys, partition, tmp_path / "run")
    assert code == 2 and "3 of" in text and "Nothing was started" in text
    for name, what in (("nan", "NaN/Inf"), ("scout", "scout"), ("empty", "no voxel > 0")):
        line = next(ln for ln in text.splitlines() if str(bad[name]) in ln)
        assert what in line and "image_id" in line
    assert "sites/A.csv: image_id" in text and "server.csv: image_id" in text
    first = len(calls)
    assert first > 3 and (partition / "cache" / "scan-check.json").is_file()

    calls.clear()
    code, text2 = _simulate(capsys, partition, tmp_path / "run")
    assert code == 2 and calls == []  # every file's result came from the content-keyed cache
    assert text2.count("image_id") == 3
    os.utime(bad["scout"], ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file is checked again
    _simulate(capsys, partition, tmp_path / "run")
    assert calls == [str(bad["scout"])]
    assert _checksums(partition) == inputs and not (tmp_path / "run").exists()


def test_baseline_runs_the_same_preflight(partition, tmp_path, capsys):
    site = read_manifest(partition / "sites" / "B.csv", require_split=True)
    site.loc[0, "path"] = str(tmp_path / "missing.nii.gz")
    write_manifest(site, partition / "sites" / "B.csv")
    code, text = _run(capsys, "baseline", "--mode", "centralized", "--partition", partition, "--out", tmp_path / "b",
                      "--run-config", SMALL)
    assert code == 2 and "missing.nii.gz" in text and "image file not found" in text
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_run_in_which_every_site_fails_reports_no_auc(partition, tmp_path, capsys):
    """lr=1e30 makes every site's loss non-finite in its first steps: nothing is aggregated in any round."""
    out = tmp_path / "nan-run"
    code, text = _simulate(capsys, partition, out, "lr=1e30")
    assert code == 2
    assert "no site update was aggregated" in text and "test AUC" not in text
    for site in ("A", "B", "C"):
        assert f"site {site} (train)" in text
    assert "training loss is nan" in text and "lower lr" in text  # the sites' own reason
    assert not (out / "report.json").exists() and not (out / "model.pt").exists()
    failure = json.loads((out / "failure.json").read_text())
    assert {r["site"] for r in failure["reasons"]} == {"A", "B", "C"}


def test_a_failed_server_app_is_never_read_as_success(tmp_path):
    """flwr run exits 0 when the ServerApp raised: only a report.json written by this run counts."""
    from simulation.simulate import SimulationError, _result

    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"test": {"auc": {"value": 0.9}}}))  # an earlier attempt's
    os.utime(out / "report.json", (time.time() - 3600, time.time() - 3600))
    (out / "flower.log").write_text("Traceback (most recent call last):\n  File x\n"
                                    "common.errors.DataError: /data/server.csv: label must be 0 or 1; fix it\n"
                                    "ERROR :     Exit Code: 700\n")
    with pytest.raises(SimulationError) as info:
        _result(out, 0, time.time() - 5, tmp_path / "link.log")
    assert "DataError: /data/server.csv: label must be 0 or 1; fix it" in str(info.value)
    assert "no new report.json" in str(info.value) and "0.9" not in str(info.value)


def test_a_run_that_died_outside_the_server_app_names_the_superlinks_reason(tmp_path):
    """No ServerApp error in flower.log: the message carries the SuperLink's final run status and the problem
    lines of its log (the simulation process and Ray write there), without colour codes."""
    from simulation.simulate import SimulationError, _result

    out = tmp_path / "run"
    out.mkdir()
    (out / "flower.log").write_text("INFO :      [ROUND 1/1]\n")
    link_log = tmp_path / "superlink.log"
    link_log.write_text("INFO : Starting\n\x1b[91mERROR \x1b[0m:     Ray worker died: memory used 23.1GB > 95%\n"
                        "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.\n"
                        "INFO : shutdown\n")
    statuses = [{"run-id": "1", "status": "finished:failed", "status-details": "No heartbeat received from the task"}]
    with pytest.raises(SimulationError) as info:
        _result(out, 0, time.time() - 5, link_log, statuses)
    message = str(info.value)
    assert "SuperLink's run status: finished:failed: No heartbeat received from the task" in message
    assert "ERROR :     Ray worker died: memory used 23.1GB > 95%" in message and "\x1b" not in message
    assert "OutOfMemoryError: Task was killed" in message and "Starting" not in message and "shutdown" not in message
    (out / "report.json").write_text(json.dumps({"test": {"auc": {"value": 0.7}}}))  # written by this run
    assert _result(out, 0, time.time() - 5, tmp_path / "link.log").test["auc"]["value"] == 0.7
    with pytest.raises(SimulationError, match="exit code 1"):
        _result(out, 1, time.time() - 5, tmp_path / "link.log")


def test_a_simulation_process_that_dies_is_reported_with_the_superlinks_reason(partition, tmp_path):
    """The simulation process (ServerApp and Ray, under the SuperLink) is killed mid-round, as the OOM killer
    would: ``flwr run`` still exits 0, and the error says how the SuperLink saw the run end (no heartbeat from
    the task) instead of only pointing at a log file. Nothing of the run is reported."""
    from simulation.flower import _tree
    from simulation.simulate import SimulationError, simulate
    from tests.deploy_helpers import cmdline

    out = tmp_path / "run"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(simulate, partition, 1, out, SMALL)
        deadline, killed = time.monotonic() + 600, None
        while killed is None and time.monotonic() < deadline and not future.done():
            log = out / "flower.log"
            if log.is_file() and "trained on" in log.read_text(errors="replace"):
                links = [p for p in _tree(os.getpid())[0] if "flower-superlink" in cmdline(p)]
                sims = [p for link in links for p in _tree(link)[0] if "flwr-simulation" in cmdline(p)]
                for pid in sims:
                    os.kill(pid, signal.SIGKILL)
                killed = sims
            time.sleep(0.2)
        assert killed, "no flwr-simulation process to kill while a site trained"
        with pytest.raises(SimulationError) as info:
            future.result(timeout=600)
    message = str(info.value)
    assert "the run failed" in message and "no new report.json" in message
    assert "SuperLink's run status: finished:failed" in message and "heartbeat" in message.lower()
    assert not (out / "report.json").exists() and not (out / "model.pt").exists()

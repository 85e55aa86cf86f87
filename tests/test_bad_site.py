"""A site that sends a poisoned update, in a real deployment on 127.0.0.1.

Every SuperNode of a run executes the same FAB, so the bad ClientApp (tests/bad_client_app.py) travels
in an app folder of its own: a copy of our packages with that module as the ClientApp component. It runs
fedpd's own handlers and spoils the reply only on the SuperNode started with ``bad-update='nan'``.
The assertion: the run completes, the update is recorded as rejected (site, round, reason) in
``rounds.jsonl`` and the report, the other sites are aggregated, and the global model is finite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.runs.rundir import RunDir
from simulation.flower import APP_DIR, flwr_run, start_superlink, stop, write_connections, write_run_config

try:
    from deploy_helpers import RUN_LIMIT, SMALL, make_cohort, rounds, site_names, start_sites
except ImportError:  # run as a package
    from tests.deploy_helpers import RUN_LIMIT, SMALL, make_cohort, rounds, site_names, start_sites

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def partition(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort")) / "partition"


def bad_app(folder: Path) -> Path:
    """Our app with tests/bad_client_app.py as its ClientApp, in ``folder`` (so it builds a FAB of its own)."""
    for pkg in ("common", "client", "server"):
        shutil.copytree(APP_DIR / pkg, folder / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("bad_client_app.py"), folder / "bad_client_app.py")
    shutil.copy(APP_DIR / "README.md", folder / "README.md")
    lines = (APP_DIR / "pyproject.toml").read_text().splitlines()
    (i,) = [i for i, x in enumerate(lines) if x.startswith("clientapp = ")]
    lines[i] = 'clientapp = "bad_client_app:app"'
    (i,) = [i for i, x in enumerate(lines) if x.startswith("fab-include = [")]  # ours, plus the bad ClientApp
    lines[i] = lines[i].replace("fab-include = [", 'fab-include = ["/bad_client_app.py", ', 1)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def test_bad_site_update_is_rejected_and_the_rest_aggregated(partition, tmp_path):
    """2 sites, 1 round; one site's ClientApp trains normally and then sends a weight that is NaN."""
    out, names = tmp_path / "run", site_names(partition)[:2]
    bad = names[0]
    procs = []
    try:
        link = start_superlink(tmp_path / "link")
        procs.append(link)
        procs += start_sites(partition, tmp_path, link, names, extra_config={bad: "bad-update='nan'"}).values()
        home = tmp_path / "cli"
        write_connections(home, {"deploy": {"address": f"127.0.0.1:{link.port}", "insecure": True}})
        cfg = write_run_config(tmp_path / "rc.toml", SMALL | {
            "num-server-rounds": 1, "min-nodes": 2, "server-manifest": str(partition / "server.csv"), "out-dir": str(out)})
        # one round and nothing measured before it: a generous overall limit (flwr run returns when the run ends);
        # the app's round-timeout (3600 s) never fires, as every site replies
        code = flwr_run(home, "deploy", run_config=cfg, log=tmp_path / "flwr-run.log", timeout=RUN_LIMIT,
                        app=bad_app(tmp_path / "bad-app"))
        log = (tmp_path / "flwr-run.log").read_text()
        assert code == 0, log[-3000:]
    finally:
        for p in reversed(procs):
            stop(p)

    good = [n for n in names if n != bad]
    (rec,) = rounds(out)
    assert sorted(rec["sites"]) == good
    assert rec["num_examples"] == sum(rec["sites"][n]["num-examples"] for n in good)  # the others were aggregated
    assert rec["missing_sites"] == [bad]
    (rej,) = rec["rejected"]
    assert rej["site"] == bad and rej["round"] == 1 and rej["phase"] == "train"
    assert "non-finite value(s) (NaN/Inf)" in rej["reason"], rej
    assert f"round 1: rejected the train reply of site {bad}" in log  # the ServerApp's log names site and round
    for path in (out / "checkpoints" / "round-1.pt", out / "model.pt"):
        state = RunDir.load_checkpoint(path)["state_dict"]
        assert all(np.isfinite(v.numpy()).all() for v in state.values()), path
    report = json.loads((out / "report.json").read_text())
    assert report["participation"]["1"]["trained"] == good
    assert report["participation"]["1"]["missing"] == [bad]
    assert report["participation"]["1"]["rejected"] == [{"site": bad, "phase": "train", "reason": rej["reason"]}]

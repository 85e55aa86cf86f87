"""Every strategy, privacy and robustness option through a real Flower simulation (`fedpd simulate`, one
round at 16^3 on the 3-site phantom cohort of deploy_helpers.make_cohort). The simulations run in the
background, a few at a time (``_Simulations``); each test checks its own.

Options that go together share a run (fedprox with client-side DP clipping, fedbn with server-side DP
clipping): each run checks what its options promise in rounds.jsonl, the checkpoint, report.json and the
console. fedadam with resume is test_federated.py::test_simulate_resume_after_kill, fedyogi is
test_federated.py::test_flwr_run_local_simulation; secure aggregation in a deployment with a dropout is
test_deploy.py. The unit-level behaviour of each option is in test_strategies.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from simulation.flower import APP_DIR

try:
    from deploy_helpers import SMALL, make_cohort, rounds
except ImportError:  # run as a package
    from tests.deploy_helpers import SMALL, make_cohort, rounds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort")) / "partition"


# One simulation per option set: name -> (run-config beyond SMALL, rounds). The attacker is the first site.
RUNS = {
    "fedprox-client-fixed": ("strategy='fedprox' proximal-mu=0.1 dp='client-fixed' clipping-norm=0.5 noise-multiplier=0.5 "
                             "transport-dtype='float16'", 1),
    "fedbn-server-fixed": ("strategy='fedbn' dp='server-fixed' clipping-norm=1.0 noise-multiplier=1.0 "
                           "keep-checkpoints='selected-and-last'", 2),
    "client-adaptive": ("dp='client-adaptive' clipping-norm=0.5 noise-multiplier=0.5", 1),
    "fedmedian": ("strategy='fedmedian' attack='sign-flip' attack-factor=10.0 attack-site='{attacker}'", 1),
    "fedtrimmedavg": ("strategy='fedtrimmedavg' trim-beta=0.34 transport-dtype='float16' log-message-size=true", 2),
    "krum": ("strategy='krum' byzantine-sites=1 attack='scale' attack-factor=10.0 attack-site='{attacker}' "
             "log-message-size=true", 1),
    "secagg": ("secure-aggregation=true", 1),
}
PARALLEL = 2  # simulations at a time: each mostly waits on Flower's polling (BENCHMARKS.md); 3 at once beside a
# deployment failed in one CI run (all three simulations ended mid-round without a report)


def _run_names(item) -> tuple[str, ...]:
    """The RUNS entries a collected test of this module reads."""
    params = getattr(item, "callspec", None)
    if params is not None and "strategy" in params.params:
        return (params.params["strategy"],)
    return {"test_fedprox_with_client_side_dp_clipping": ("fedprox-client-fixed",),
            "test_fedbn_with_server_side_dp_clipping": ("fedbn-server-fixed",),
            "test_fedavg_with_adaptive_client_clipping": ("client-adaptive",),
            "test_float16_transport_halves_the_messages": ("fedtrimmedavg", "krum"),
            "test_secure_aggregation_simulation": ("secagg",)}.get(item.originalname, ())


class _Simulations:
    """The selected tests' simulations, started in test order, ``PARALLEL`` at a time, in the background: each
    test waits only for its own run, so a test's time (and its timeout) covers one simulation, not the lot."""

    def __init__(self, cohort: Path, root: Path, names: list[str]):
        attacker, self.root = _sites(cohort)[0], root
        self.pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="simulate")
        self.futures = {}
        for name in names:
            extra, rounds_ = RUNS[name]
            self.futures[name] = self.pool.submit(_simulate, cohort, root / name, extra.format(attacker=attacker), rounds_,
                                                  audit=name == "secagg")

    def get(self, name: str) -> tuple[str, list[dict], dict, dict]:
        return self.futures[name].result()

    def out(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def runs(request, cohort, tmp_path_factory):
    names = list(dict.fromkeys(n for item in request.session.items if item.path == request.path
                               for n in _run_names(item)))
    sims = _Simulations(cohort, tmp_path_factory.mktemp("runs"), names)
    yield sims
    sims.pool.shutdown(wait=True, cancel_futures=True)


def _simulate(cohort: Path, out: Path, extra: str, rounds_: int = 1,
              audit: bool = False) -> tuple[str, list[dict], dict, dict]:
    """One `fedpd simulate`; returns its output, the round records, the report and the last checkpoint.
    ``audit``: with the sites' audit log on (``out/audit.jsonl``), as benchmarks/strategies.py runs."""
    from client.audit import AUDIT_ENV

    env = {**os.environ, AUDIT_ENV: str(out / "audit.jsonl")} if audit else None
    rc = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in SMALL.items()) + " " + extra
    proc = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--partition", str(cohort), "--rounds",
                           str(rounds_), "--out", str(out), "--run-config", rc],
                          cwd=APP_DIR, capture_output=True, text=True, timeout=900, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    recs = rounds(out)
    assert [r["round"] for r in recs] == list(range(1, rounds_ + 1))
    report = json.loads((out / "report.json").read_text())
    ckpt = torch.load(out / "checkpoints" / f"round-{rounds_}.pt", map_location="cpu", weights_only=True)
    return text, recs, report, ckpt


def _sites(cohort: Path) -> list[str]:
    return sorted(p.stem for p in (cohort / "sites").glob("*.csv"))


def _statistics_from_server_validation(ckpt: dict, cohort: Path, text: str) -> None:
    """DP and secure aggregation: the sites keep their BatchNorm statistics; the server re-estimated its own on
    its validation scans (one pass: each BatchNorm counted exactly the val batches) and checkpointed them."""
    import pandas as pd

    n_val = int((pd.read_csv(cohort / "server.csv")["split"] == "val").sum())
    assert f"the server re-estimates its own on its {n_val} validation scans every round" in text
    sd = ckpt["state_dict"]
    counts = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counts) == 12  # Med3D-10's BatchNorms
    for k in counts:
        assert int(sd[k]) == math.ceil(n_val / SMALL["batch-size"]), k
    variances = [sd[k] for k in sd if k.endswith("running_var")]
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in variances)
    assert not any(torch.all(v == 1.0) for v in variances)  # not the initial statistics any more


def _privacy_recorded(text: str, recs: list[dict], report: dict, releases: int, ckpt: dict, html: str,
                      adaptive: bool = False) -> dict:
    spent = recs[-1]["privacy"]
    assert spent["releases"] == releases and spent["epsilon"] > 0 and spent["delta"] == pytest.approx(1e-5)
    assert report["privacy"]["epsilon"] == pytest.approx(spent["epsilon"]) and report["privacy"]["rounds"] == len(recs)
    assert f"privacy spent epsilon {spent['epsilon']:.3f} at delta 1e-05" in text  # on the console
    # the noise against the update: model noise multiplier x sqrt(numbers a site sends) / sites, where a site
    # sends every parameter and no BatchNorm statistic
    sent = sum(v.numel() for k, v in ckpt["state_dict"].items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    z = spent["noise_multiplier"] * ((1 - 1 / 4) ** -0.5 if adaptive else 1.0)  # Flower's model noise, adaptive
    ratio = z * math.sqrt(sent) / len(recs[-1]["sites"])
    assert spent["noise_to_update"] == pytest.approx(ratio, rel=1e-9) and ratio > 100
    assert report["privacy"]["noise_to_update"] == pytest.approx(ratio, rel=1e-9)
    assert f"expected norm {ratio:.3g}x the largest averaged update" in text  # said before round 1
    assert "the noise is louder than any round's update, so the model learns only if" in text
    # ... and per number, against the RMS of the weights a site sends (the model's at round 1, here the initial one)
    std = z * spent["clipping_norm"] / len(recs[-1]["sites"]) if not adaptive else None
    if std is not None:
        assert f"Gaussian noise of std {std:.3g} to each of the {sent:,} numbers a site sends" in text
    assert re.search(r"the model's weights: RMS 0\.0[0-9]+\)", text)
    assert f"expected noise norm {ratio:.3g}x the largest averaged update (louder than any single update)" in html
    return spent


def test_fedprox_with_client_side_dp_clipping(cohort, runs):
    """fedprox + dp=client-fixed: the sites clip (Flower's fixedclipping_mod), the server noises; epsilon is in
    rounds.jsonl, the report and on the console; the server's BatchNorm statistics come from its validation
    scans. The run also sends
    float16 (transport-dtype): the clipping mod works on the float32 update inside it."""
    text, recs, report, ckpt = runs.get("fedprox-client-fixed")
    assert report["arm"] == "fedprox+dp:client-fixed+fp16 (random init)"
    assert sorted(recs[0]["sites"]) == _sites(cohort) and recs[0]["rejected"] == []
    assert all(s["unit-weight"] == 1 for s in recs[0]["sites"].values())  # every site weighs the same
    assert text.count("fixedclipping_mod: parameters are clipped by value: 0.5000") == 3  # each site clipped
    html = (runs.out("fedprox-client-fixed") / "report.html").read_text()
    spent = _privacy_recorded(text, recs, report, releases=1, ckpt=ckpt, html=html)
    assert spent["noise_multiplier"] == 0.5 and spent["clipping_norm"] == 0.5
    assert "privacy: epsilon" in html and f"{spent['epsilon']:.2f} (delta 1e-05)" in html  # the comparison table
    _statistics_from_server_validation(ckpt, cohort, text)
    assert ckpt["strategy"]["name"] == "fedprox" and ckpt["strategy"]["dp"] == "client-fixed"
    assert ckpt["strategy"]["state"]["accountant"]["compositions"]  # the ledger travels with the checkpoint


def test_fedbn_with_server_side_dp_clipping(cohort, runs):
    """fedbn + dp=server-fixed, 2 rounds: the server clips and noises; the ledger counts 2 releases. With
    keep-checkpoints = selected-and-last only the selected round's checkpoint and the last one stay."""
    text, recs, report, ckpt = runs.get("fedbn-server-fixed")
    from common.runs.rundir import RunDir

    assert RunDir(runs.out("fedbn-server-fixed")).saved_rounds() == sorted({report["selected_round"], 2})
    assert report["arm"] == "fedbn+dp:server-fixed (random init)"
    assert all(sorted(r["sites"]) == _sites(cohort) for r in recs)
    first = recs[0]["privacy"]
    assert first["releases"] == 1 and f"privacy spent epsilon {first['epsilon']:.3f}" in text
    second = _privacy_recorded(text, recs, report, releases=2, ckpt=ckpt,
                               html=(runs.out("fedbn-server-fixed") / "report.html").read_text())
    assert second["epsilon"] > first["epsilon"]  # privacy loss accumulates over rounds
    _statistics_from_server_validation(ckpt, cohort, text)


def test_fedavg_with_adaptive_client_clipping(runs):
    """dp=client-adaptive: Flower's adaptiveclipping_mod at the sites; the clipping norm adapts after the round
    and the round is composed into the ledger."""
    text, recs, report, ckpt = runs.get("client-adaptive")
    assert "adaptiveclipping_mod" in text
    spent = _privacy_recorded(text, recs, report, releases=1, ckpt=ckpt,
                              html=(runs.out("client-adaptive") / "report.html").read_text(), adaptive=True)
    assert spent["noise_multiplier"] == 0.5 and spent["clipping_norm"] != 0.5  # adapted from the initial norm
    assert all("norm_bit" in s for s in recs[0]["sites"].values())


def _message_sizes(text: str, direction: str) -> list[int]:
    """The sizes Flower's message_size_mod logged (log-message-size=true), in bytes."""
    return [int(m) for m in re.findall(rf"{direction} message size: (\d+) bytes", text)]


def test_float16_transport_halves_the_messages(runs):
    """transport-dtype=float16 (the fedtrimmedavg run, 2 rounds) against float32 (the krum run: the same arrays,
    BatchNorm statistics included), both measured by Flower's message_size_mod at the sites: the weights the
    sites receive and the updates they send take <= 0.51x the bytes. Round 2 aggregates every site again
    (BatchNorm's counter, a float on the server after round 1's average, an int at the sites), and the
    server's checkpoint stays float32."""
    half, recs, report, ckpt = runs.get("fedtrimmedavg")
    full, full_recs, *_ = runs.get("krum")
    assert report["arm"].startswith("fedtrimmedavg+fp16")
    assert all(len(r["sites"]) == 3 and r["rejected"] == [] for r in recs)
    for direction in ("Incoming", "Outgoing"):
        fp16, fp32 = _message_sizes(half, direction), _message_sizes(full, direction)
        assert len(fp16) == 12 and len(fp32) == 6  # 3 sites x (train + evaluate) per round
        assert max(fp16) <= 0.51 * max(fp32), (direction, fp16, fp32)
    # the server's count of what it received (rounds.jsonl received_bytes, shown in the report's comparison
    # table) is what the sites' message_size_mod says they sent: 3 train + 3 evaluate replies a round
    assert sum(r["received_bytes"] for r in recs) == sum(_message_sizes(half, "Outgoing"))
    assert full_recs[0]["received_bytes"] == sum(_message_sizes(full, "Outgoing"))
    assert max(r["received_bytes"] for r in recs) <= 0.51 * full_recs[0]["received_bytes"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state_dict"].values())


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_aggregation_runs(cohort, runs, strategy):
    """fedmedian / fedtrimmedavg / krum aggregate a real round (two of them with a simulated attacker, whose
    update passes screening: it is aggregated, not rejected)."""
    attacker, extra = _sites(cohort)[0], RUNS[strategy][0]
    text, recs, report, ckpt = runs.get(strategy)
    fp16 = "+fp16" if "transport-dtype='float16'" in extra else ""
    assert report["arm"].startswith(f"{strategy}{fp16} (random init)")
    assert sorted(recs[0]["sites"]) == _sites(cohort) and recs[0]["rejected"] == []
    if "attack=" in extra:
        assert f"site {attacker}, round 1: SIMULATED ATTACK" in text
        assert "attack:" in report["arm"]
    assert ckpt["strategy"]["name"] == strategy
    assert all(np.isfinite(v.numpy()).all() for v in ckpt["state_dict"].values())


def test_secure_aggregation_simulation(cohort, runs):
    """secure-aggregation=true: SecAgg+ rounds in simulation; the sum of the 3 sites is aggregated, the sites'
    metrics are recorded as usual, the server's BatchNorm statistics come from its validation scans, the
    weights moved but stay small."""
    text, recs, report, ckpt = runs.get("secagg")
    assert "round 1: securely aggregated 3 site update(s)" in text
    # with the audit log on, as benchmarks/strategies.py runs (its SecAgg+ arm failed every round: the audit could
    # not size SecAgg+'s config records), every SecAgg+ stage of every site is logged
    audit = [json.loads(line) for line in (runs.out("secagg") / "audit.jsonl").read_text().splitlines()]
    assert len(audit) >= 3 * 4 and not any("error" in e for e in audit), audit[:2]
    assert report["arm"] == "fedavg+secagg (random init)"
    assert sorted(recs[0]["sites"]) == _sites(cohort)
    assert recs[0]["num_examples"] == sum(s["num-examples"] for s in recs[0]["sites"].values())
    assert recs[0]["failures"] == [] and recs[0]["missing_sites"] == []
    # every SecAgg+ stage's replies, as the sites' audit log sized them
    assert recs[0]["received_bytes"] == sum(e["content_bytes"] for e in audit)
    _statistics_from_server_validation(ckpt, cohort, text)
    sd = ckpt["state_dict"]
    assert max(float(v.abs().max()) for k, v in sd.items() if v.is_floating_point() and "running_" not in k) <= 8.0

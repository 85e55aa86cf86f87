"""Strategies, privacy and robustness on the demo-size phantom, for EXPERIMENTS.md (issue 15).

Every arm is one ``fedpd simulate`` on the demo-size phantom (120 subjects, 3 acquisition sites, 48^3), one
of two cohorts (``--cohort``): ``native``, ``make demo``'s own (scanner-space scans through site-local
preprocessing, built by ``python -m simulation.demo --cohort-only``), or ``mni``, the template-space
phantom built by benchmarks/experiments.py's commands (no preprocessing; FedAvg on it is unstable across
seeds, EXPERIMENTS.md). Every arm has the same
run-config apart from the arm's own keys, and the audit log on (``FEDPD_AUDIT_LOG``) to measure the bytes
the sites send. Recorded per arm: test AUC with its subject-bootstrap 95 % CI, the selected round, the mean
round wall time, the bytes the sites sent per round (all sites, train and evaluate replies), and epsilon
at the run's delta where DP is on. Results accumulate in ``<out>/strategies.json``.

    python benchmarks/strategies.py --out runs/experiments --arms fedavg fedmedian --schemes natural --seeds 0
    python benchmarks/strategies.py --out runs/experiments --cohort native --arms fedavg fedavg-fp16 --seeds 0 1 2
    python benchmarks/strategies.py --out runs/experiments --markdown
    python benchmarks/strategies.py --out runs/experiments --report     # one fedpd report per cohort/partition/seed

``--report`` renders, for each cohort, partition and seed, the report of its first arm (in ``ARMS`` order) with
every other arm of the same cohort, partition and seed in its comparison table (test AUC with CI, selected
round, round wall time, bytes received per round, epsilon), as ``fedpd report RUN --compare ARM ...`` does.

Phantom results: they show how the options behave on this pipeline, never a clinical performance.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.experiments import FEDPD, _cohort  # noqa: E402
from simulation.demo import DEMO, DEMO_RUN_CONFIG  # noqa: E402

ROUNDS = DEMO["rounds"]  # every arm the same number of rounds as the demo (8)
# With 3 sites FedTrimmedAvg must cut one site per end (beta 0.2 cuts none of 3) and Krum assumes one Byzantine site.
ROBUST_3 = "trim-beta=0.34 byzantine-sites=1"
ATTACK = "attack='sign-flip' attack-factor=10.0 attack-site='10'"  # site 10 sends w - 10 * its update

ARMS = {
    "fedavg": "strategy='fedavg'",
    "fedprox": "strategy='fedprox' proximal-mu=0.01",
    "fedadam": "strategy='fedadam' server-lr=0.001",
    "fedyogi": "strategy='fedyogi' server-lr=0.001",
    "fedmedian": "strategy='fedmedian'",
    "fedtrimmedavg": f"strategy='fedtrimmedavg' {ROBUST_3}",
    "krum": f"strategy='krum' {ROBUST_3}",
    "fedbn": "strategy='fedbn'",
    "dp-server-fixed": "dp='server-fixed' clipping-norm=1.0 noise-multiplier=0.5",
    "dp-client-fixed": "dp='client-fixed' clipping-norm=1.0 noise-multiplier=0.5",
    "dp-client-adaptive": "dp='client-adaptive' clipping-norm=1.0 noise-multiplier=0.5",
    # what the noise costs: server-side fixed clipping at smaller multipliers (noise 63x, 6.3x, 0.63x the largest
    # averaged update at 3 sites; epsilon after 8 rounds about 1.9e3, 1.8e5, 1.8e7: no privacy left to speak of)
    **{f"dp-server-fixed-z{z}": f"dp='server-fixed' clipping-norm=1.0 noise-multiplier={z}"
       for z in ("0.05", "0.005", "0.0005")},
    "secagg": "secure-aggregation=true",
    "fedavg-fp16": "strategy='fedavg' transport-dtype='float16'",  # issue 16: half the bytes, the same AUC?
    # robustness: one site sends a harmful update that passes screening
    "attack-fedavg": f"strategy='fedavg' {ATTACK}",
    "attack-fedmedian": f"strategy='fedmedian' {ATTACK}",
    "attack-fedtrimmedavg": f"strategy='fedtrimmedavg' {ROBUST_3} {ATTACK}",
    "attack-krum": f"strategy='krum' {ROBUST_3} {ATTACK}",
}


def _audit_bytes(audit: Path, rounds: int) -> float | None:
    """Bytes of every reply the sites sent (train and evaluate), per round."""
    if not audit.is_file():
        return None
    total = sum(json.loads(line).get("content_bytes", 0) for line in audit.read_text().splitlines() if line.strip())
    return total / rounds if rounds else None


COHORTS = ("mni", "native")


def _native_cohort(out: Path, scheme: str, seed: int) -> tuple[Path, list[str]]:
    """Commands that build (once) ``make demo``'s preprocessed native-space cohort for ``seed`` and its
    partition by ``scheme`` (the demo's own is natural); returns the partition folder."""
    data = out / f"native-seed{seed}" / "data"
    cmds = []
    if not (data / "partition" / "partition.json").exists():
        cmds.append(f"{sys.executable} -m simulation.demo --out {data.parent} --seed {seed} --cohort-only")
    if scheme == "natural":
        return data / "partition", cmds
    part = data / f"partition-{scheme}"
    if not (part / "partition.json").exists():
        cmds.append(f"{FEDPD} partition {data / 'preprocessed' / 'manifest.csv'} --scheme {scheme} --sites "
                    f"{DEMO['sites']} --alpha 0.5 --seed {seed} --out {part}")
    return part, cmds


def _key(arm: str, scheme: str, seed: int, cohort: str) -> str:
    return f"{arm}-{scheme}-seed{seed}" + ("" if cohort == "mni" else f"-{cohort}")


def run(arm: str, scheme: str, seed: int, out: Path, cohort: str = "mni") -> dict:
    if cohort == "native":
        part, cmds = _native_cohort(out, scheme, seed)
    else:
        part, cmds = _cohort(out, DEMO["effect"], "subject", scheme, seed=seed)
    name = _key(arm, scheme, seed, cohort)
    run_dir = out / "strategies" / name
    audit = out / "strategies" / f"{name}.audit.jsonl"
    audit.unlink(missing_ok=True)
    if run_dir.exists():  # a run of this arm the store does not hold (interrupted, or the store was reset): start over
        shutil.rmtree(run_dir)
    # keep-checkpoints: an arm needs only its selected round's checkpoint (report, model.pt); 8 x 57 MB per run otherwise
    rc = f"{DEMO_RUN_CONFIG} num-server-rounds={ROUNDS} seed={seed} keep-checkpoints='selected-and-last' {ARMS[arm]}"
    cmds.append(f"FEDPD_AUDIT_LOG={audit} {FEDPD} simulate --partition {part} --out {run_dir} --run-config {shlex.quote(rc)}")
    start = time.perf_counter()
    for cmd in cmds:
        print(f"$ {cmd}", flush=True)
        code = subprocess.run(cmd, shell=True, cwd=ROOT, env=os.environ.copy()).returncode
        if code != 0:  # a run that fails (e.g. every round poisoned) is a result too: record why
            failure = run_dir / "failure.json"
            why = json.loads(failure.read_text())["message"] if failure.is_file() else f"exit code {code}"
            return {"arm": arm, "scheme": scheme, "seed": seed, "cohort": cohort, "name": arm, "run_config": ARMS[arm],
                    "failed": why,
                    "seconds": round(time.perf_counter() - start, 1), "command": cmds[-1].replace(str(ROOT) + "/", "")}
    seconds = time.perf_counter() - start
    report = json.loads((run_dir / "report.json").read_text())
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
    walls = [r["wall_seconds"] for r in rounds if r.get("wall_seconds")]
    return {"arm": arm, "scheme": scheme, "seed": seed, "cohort": cohort, "name": report["arm"], "run_config": ARMS[arm],
            "test_auc": report["test"]["auc"], "balanced_accuracy": report["test"]["balanced_accuracy"],
            "selected_round": report["selected_round"], "rounds": len(rounds),
            "round_wall_s": sum(walls) / len(walls) if walls else None,
            "site_bytes_per_round": _audit_bytes(audit, len(rounds)),
            "privacy": report.get("privacy"), "seconds": round(seconds, 1),
            "command": cmds[-1].replace(str(ROOT) + "/", "")}


def _ci(m: dict) -> str:
    v, (lo, hi) = m.get("value"), (m.get("ci95") or [None, None])
    if v is None or v != v:
        return "n/a"
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{v:.2f}"


def _where(r: dict) -> str:
    """The cohort and partition of a result (results stored before ``--cohort`` existed are the MNI phantom's)."""
    return f"{r.get('cohort', 'mni')}, {r['scheme']}"


def _name(r: dict) -> str:
    """The report's arm name, with the noise multiplier under DP (the arms of the noise sweep share a name)."""
    z = (r.get("privacy") or {}).get("noise_multiplier")
    return r["name"] + (f", z {z:g}" if z is not None else "")


def markdown(results: dict) -> str:
    lines = ["| arm | cohort, partition | seed | test AUC [95% CI] | balanced acc. | round | round wall | site bytes/round | "
             "epsilon (delta) |", "|" + "---|" * 9]
    for key in sorted(results, key=lambda k: (list(ARMS).index(results[k]["arm"]), _where(results[k]), results[k]["seed"])):
        r = results[key]
        if r.get("failed"):
            lines.append(f"| {_name(r)} | {_where(r)} | {r['seed']} | run failed: {r['failed'][:160]} | | | | | |")
            continue
        eps = "-"
        if r.get("privacy"):
            e = r["privacy"]["epsilon"]
            eps = (f"{e:.1f}" if e < 1e4 else f"{e:.2g}") + f" ({r['privacy']['delta']:g})"
        mb = f"{r['site_bytes_per_round'] / 1e6:.1f} MB" if r.get("site_bytes_per_round") else "n/a"
        lines.append(f"| {_name(r)} | {_where(r)} | {r['seed']} | {_ci(r['test_auc'])} | {_ci(r['balanced_accuracy'])} | "
                     f"{r['selected_round']} | {r['round_wall_s']:.0f} s | {mb} | {eps} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """One row per (arm, partition) over its seeds: each seed's test AUC, their mean, and how many seeds' CIs
    lie above 0.5 (a claim that an arm learns rests on 3 seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["arm"], _where(r)), []).append(r)
    lines = ["| arm | cohort, partition | seeds | test AUC per seed | mean | seeds with CI above 0.5 |", "|" + "---|" * 6]
    for (arm, scheme), rs in sorted(groups.items(), key=lambda kv: (list(ARMS).index(kv[0][0]), kv[0][1])):
        rs = sorted(rs, key=lambda r: r["seed"])
        aucs = [None if r.get("failed") else r["test_auc"].get("value") for r in rs]
        shown = ", ".join("failed" if a is None else f"{a:.2f}" for a in aucs)
        ok = [a for a in aucs if a is not None and a == a]
        mean = f"{sum(ok) / len(ok):.2f}" if ok else "n/a"
        above = sum(1 for r in rs if not r.get("failed") and (r["test_auc"].get("ci95") or [0])[0] > 0.5)
        lines.append(f"| {_name(rs[0])} | {scheme} | {', '.join(str(r['seed']) for r in rs)} | {shown} | {mean} | "
                     f"{above} of {len(rs)} |")
    return "\n".join(lines)


def reports(results: dict, out: Path) -> list[Path]:
    """``fedpd report`` of the first finished arm of each (cohort, partition, seed), the others as comparison
    arms; returns the report pages."""
    groups: dict[tuple[str, str, int], list[str]] = {}
    for key in sorted(results, key=lambda k: list(ARMS).index(results[k]["arm"])):
        r = results[key]
        if not r.get("failed") and (out / "strategies" / key / "report.json").is_file():
            groups.setdefault((r.get("cohort", "mni"), r["scheme"], r["seed"]), []).append(key)
    pages = []
    for (cohort, scheme, seed), keys_ in sorted(groups.items()):
        first, *others = [out / "strategies" / k for k in keys_]
        compare = [x for o in others for x in ("--compare", str(o))]
        cmd = [*shlex.split(FEDPD), "report", str(first), *compare, "--saliency-scans", "0"]
        print("$ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        pages.append(first / "report.html")
    return pages


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--schemes", nargs="*", default=["natural", "dirichlet"], choices=["natural", "dirichlet"])
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--cohort", choices=COHORTS, default="native",
                   help="native: make demo's preprocessed scanner-space cohort; mni: the template-space phantom")
    p.add_argument("--markdown", action="store_true", help="print the table from the results so far, run nothing")
    p.add_argument("--retry-failed", action="store_true", help="run again the arms whose stored result is a failure")
    p.add_argument("--report", action="store_true", help="render one report per cohort, partition and seed with every "
                   "arm in its comparison table, run nothing")
    a = p.parse_args()
    out = a.out.resolve()
    store = out / "strategies.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if a.report:
        for page in reports(results, out):
            print(page)
        return 0
    if a.markdown:
        print(markdown(results))
        print()
        print(summary(results))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for scheme in a.schemes:
            for arm in a.arms:
                key = _key(arm, scheme, seed, a.cohort)
                if key in results and not (a.retry_failed and results[key].get("failed")):
                    print(f"{key}: done already ({store})")
                    continue
                results[key] = run(arm, scheme, seed, out, a.cohort)
                store.write_text(json.dumps(results, indent=2) + "\n")
                print(markdown({key: results[key]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

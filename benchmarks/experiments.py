"""Demo-size phantom experiments for EXPERIMENTS.md, run through the public ``fedpd`` commands.

Each experiment is a list of shell commands (phantom -> ingest -> split -> partition -> simulate or
baseline) that is printed, run, timed and recorded with the resulting test metrics and their 95 % CIs.
Cohorts and partitions are shared between experiments that use the same ones. Results accumulate in
``<out>/results.json``; ``--markdown`` prints the table for EXPERIMENTS.md from that file.

    python benchmarks/experiments.py --out runs/experiments --only fedavg-natural centralized-natural
    python benchmarks/experiments.py --out runs/experiments --markdown

These are phantom results: they show how the pipeline behaves, never a clinical performance.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulation.demo import DEMO, DEMO_RUN_CONFIG  # noqa: E402

FEDPD = str(ROOT / ".venv" / "bin" / "fedpd")
METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy")


def _cohort(out: Path, effect: float, split: str, scheme: str, seed: int = DEMO["seed"]) -> tuple[Path, list[str]]:
    """Commands that build (once) the partition for (effect, split kind, scheme, seed); returns its folder."""
    data = out / (f"data-effect{effect:g}" + (f"-seed{seed}" if seed != DEMO["seed"] else ""))
    manifest = data / f"manifest-{split}.csv"
    part = data / f"partition-{split}-{scheme}"
    cmds = []
    if not (data / "download" / "phantom.json").exists():
        cmds.append(f"{FEDPD} phantom {data / 'download'} --subjects {DEMO['subjects']} --sites {DEMO['sites']} "
                    f"--shape {DEMO['shape']} --effect {effect:g} --seed {seed}")
    if not (data / "manifest.csv").exists():
        cmds.append(f"{FEDPD} ingest {data / 'download'} --csv {data / 'download' / 'idaSearch.csv'} "
                    f"--sites-csv {data / 'download' / 'centres.csv'} --out {data / 'manifest.csv'}")
    if not manifest.exists():
        unsafe = " --unsafe-split-by-scan" if split == "scan" else ""
        cmds.append(f"{FEDPD} split {data / 'manifest.csv'} --val 0.2 --test 0.25 --seed {seed} --out {manifest}{unsafe}")
    if not (part / "partition.json").exists():
        extra = f" --sites {DEMO['sites']} --alpha 0.5" if scheme == "dirichlet" else ""
        cmds.append(f"{FEDPD} partition {manifest} --scheme {scheme}{extra} --seed {seed} --out {part}")
    return part, cmds


# name -> (effect, split unit, partition scheme, arm, extra)
EXPERIMENTS = {
    "fedavg-natural": (DEMO["effect"], "subject", "natural", "fedavg", ""),
    "centralized-natural": (DEMO["effect"], "subject", "natural", "centralized", ""),
    "local-natural": (DEMO["effect"], "subject", "natural", "local", ""),
    "local-natural-effect0": (0.0, "subject", "natural", "local", ""),
    "local-dirichlet": (DEMO["effect"], "subject", "dirichlet", "local", ""),
    "fedavg-natural-effect0": (0.0, "subject", "natural", "fedavg", ""),
    "centralized-natural-effect0": (0.0, "subject", "natural", "centralized", ""),
    "fedavg-dirichlet": (DEMO["effect"], "subject", "dirichlet", "fedavg", ""),
    "fedavg-dirichlet-effect0": (0.0, "subject", "dirichlet", "fedavg", ""),
    "fedavg-natural-scansplit": (DEMO["effect"], "scan", "natural", "fedavg", ""),
    # no signal at all: whatever lifts the AUC above 0.5 here is the subject leaking from train into test
    "fedavg-natural-scansplit-effect0": (0.0, "scan", "natural", "fedavg", ""),
    "fedavg-holdout-10": (DEMO["effect"], "subject", "natural", "fedavg", "10"),
    # pretrained from a STAND-IN checkpoint (no MedicalNet file here): Med3D trained centralized on another
    # phantom cohort (seed 1, disjoint subjects), exported in MedicalNet's format (benchmarks/standin_checkpoint.py).
    # Its scratch arm is fedavg-natural: the same command with pretrained-path=''.
    "fedavg-natural-pretrained-standin": (DEMO["effect"], "subject", "natural", "fedavg", "standin"),
}
STANDIN_SEED = 1


def run(name: str, out: Path) -> dict:
    effect, split, scheme, arm, holdout = EXPERIMENTS[name]
    part, cmds = _cohort(out, effect, split, scheme)
    run_dir = out / name
    rc = f"{DEMO_RUN_CONFIG} num-server-rounds={DEMO['rounds']}"
    if holdout == "standin":
        source, more = _cohort(out, effect, split, scheme, seed=STANDIN_SEED)
        cmds += more
        standin = out / "standin"
        if not (standin / "medicalnet-standin.pth").exists():
            cmds.append(f"{FEDPD} baseline --mode centralized --partition {source} --out {standin / 'run'} "
                        f"--run-config {shlex.quote(rc)}")
            cmds.append(f"{sys.executable} {ROOT / 'benchmarks' / 'standin_checkpoint.py'} "
                        f"{standin / 'run' / 'model.pt'} {standin / 'medicalnet-standin.pth'}")
        rc += f" pretrained-path='{standin / 'medicalnet-standin.pth'}'"
        holdout = ""
    rc = shlex.quote(rc)
    if arm == "fedavg":
        hold = f" --holdout-site {holdout}" if holdout else ""
        cmds.append(f"{FEDPD} simulate --partition {part} --out {run_dir} --run-config {rc}{hold}")
    else:
        cmds.append(f"{FEDPD} baseline --mode {arm} --partition {part} --out {run_dir} --run-config {rc}")
    start = time.perf_counter()
    for cmd in cmds:
        print(f"$ {cmd}", flush=True)
        subprocess.run(cmd, shell=True, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if arm != "fedavg" else None)
    seconds = time.perf_counter() - start
    reports = sorted(run_dir.glob("report.json")) + sorted(run_dir.glob("*/report.json"))
    rows = []
    for f in reports:
        r = json.loads(f.read_text())
        rows.append({"arm": r.get("arm"), "test": {m: r["test"][m] for m in METRICS},
                     "test_counts": r["test_counts"], "selected_round": r["selected_round"],
                     "holdout_site": r.get("holdout_site"), "unsafe_scan_split": r["data"].get("unsafe_scan_split")})
    return {"name": name, "effect": effect, "split": split, "scheme": scheme, "holdout": holdout,
            "commands": [c.replace(str(ROOT) + "/", "") for c in cmds], "seconds": round(seconds, 1), "rows": rows}


def _fmt(m: dict) -> str:
    v, ci = m.get("value"), m.get("ci95") or [None, None]
    if v is None or v != v:
        return "n/a"
    lo, hi = ci
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{v:.2f}"


def markdown(results: dict) -> str:
    lines = ["| experiment | effect | split | partition | arm | test AUC [95% CI] | balanced acc. | sensitivity | "
             "specificity | test scans/subjects | round | wall |", "|" + "---|" * 12]
    for name in EXPERIMENTS:
        res = results.get(name)
        if not res:
            continue
        for row in res["rows"]:
            t = row["test"]
            split = "SCAN (unsafe)" if res["split"] == "scan" else "subject"
            part = res["scheme"] + (f", holdout {res['holdout']}" if res["holdout"] else "")
            lines.append(f"| {name} | {res['effect']:g} | {split} | {part} | {row['arm']} | {_fmt(t['auc'])} | "
                         f"{_fmt(t['balanced_accuracy'])} | {_fmt(t['sensitivity'])} | {_fmt(t['specificity'])} | "
                         f"{row['test_counts']['scans']}/{row['test_counts']['subjects']} | {row['selected_round']} | "
                         f"{res['seconds']:.0f}s |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments")
    p.add_argument("--only", nargs="*", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    p.add_argument("--markdown", action="store_true", help="print the results table and the commands, run nothing")
    a = p.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if a.markdown:
        print(markdown(results))
        for name in EXPERIMENTS:
            if name in results:
                print(f"\n`{name}` ({results[name]['seconds']:.0f}s):\n```\n" + "\n".join(results[name]["commands"]) + "\n```")
        return 0
    for name in a.only:
        if name in results:
            print(f"{name}: done already ({store})")
            continue
        results[name] = run(name, out)
        store.write_text(json.dumps(results, indent=2) + "\n")
        print(markdown({name: results[name]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

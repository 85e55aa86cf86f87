"""``make demo``: phantom cohort -> ingest -> split -> partition -> 3-site federated simulation -> report.

Everything goes into one folder (default ``runs/demo``), which the demo owns: a re-run replaces it
(only if it carries the demo's marker file, so it never deletes a folder it did not make).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from common.errors import FedpdError

MARKER = ".fedpd-demo"

# Sized so the whole demo (after `make setup`) finishes well inside 20 minutes on 2 CPU cores.
DEMO = {"subjects": 120, "sites": 3, "shape": 48, "effect": 1.0, "seed": 0, "rounds": 8}
DEMO_RUN_CONFIG = "input-shape='48,48,48' spacing='4.0,4.0,4.0' batch-size=8 local-epochs=2 lr=0.0001"


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def auc_line(report: dict) -> str:
    """One line: test AUC with its CI, selected round, threshold, and what kind of data it was."""
    auc = report["test"]["auc"]
    lo, hi = auc.get("ci95") or (None, None)
    kind = report["data"]["source"]
    note = " (synthetic phantom, not a clinical result)" if kind == "phantom" else ""
    return (f"test AUC {_num(auc['value'])} (95% CI {_num(lo)}-{_num(hi)}), selected round {report['selected_round']}, "
            f"threshold {_num(report['threshold'])}; data: {kind}{note}")


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_demo(out: Path, pretrained: str | None = None, rounds: int = DEMO["rounds"], subjects: int = DEMO["subjects"],
             seed: int = DEMO["seed"]) -> dict:
    """Run the whole demo into ``out``; returns the report dict.

    ``seed`` drives everything random: the phantom cohort, the subject split, the partition and the run
    (initialisation, sampling, augmentation, dropout), so two demos with one seed give one result.
    """
    from common.ingest import ingest
    from common.splits import partition_manifest, split_manifest
    from simulation.phantom import generate_phantom
    from simulation.simulate import simulate

    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FedpdError(f"{out} exists and was not made by the demo; pass another folder with DEMO_DIR=runs/NAME")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `make demo`; a re-run replaces this folder\n")
    data = out / "data"
    t0 = time.perf_counter()

    t = _step("1/5 phantom cohort (synthetic, never a clinical result)")
    generate_phantom(data / "download", subjects=subjects, sites=DEMO["sites"], shape=DEMO["shape"],
                     effect=DEMO["effect"], seed=seed)
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("2/5 ingest")
    ingest(data / "download", csv=data / "download" / "idaSearch.csv", sites_csv=data / "download" / "centres.csv",
           out=data / "manifest.csv")
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("3/5 subject-level split")
    split_manifest(data / "manifest.csv", val=0.2, test=0.25, seed=seed)
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("4/5 partition by acquisition site")
    partition_manifest(data / "manifest.csv", scheme="natural", out=data / "partition", seed=seed)
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step(f"5/5 federated simulation: {DEMO['sites']} sites, {rounds} rounds, Med3D resnet_10 "
              + ("(MedicalNet weights)" if pretrained else "(from scratch)"))
    run_config = DEMO_RUN_CONFIG + f" seed={seed}" + (f" pretrained-path='{Path(pretrained).resolve()}'" if pretrained else "")
    report = simulate(data / "partition", rounds, out, run_config=run_config)
    print(f"({time.perf_counter() - t:.1f}s)")

    print(f"\nreport: {out / 'report.html'} (figures in {out / 'figures'}, numbers in {out / 'report.json'})")
    print(auc_line(report))
    print(f"total demo time {time.perf_counter() - t0:.0f}s")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--pretrained", default=None, help="MedicalNet resnet_10 checkpoint (default: from scratch)")
    p.add_argument("--rounds", type=int, default=DEMO["rounds"])
    p.add_argument("--subjects", type=int, default=DEMO["subjects"])
    p.add_argument("--seed", type=int, default=DEMO["seed"], help="phantom, split, partition and run seed")
    a = p.parse_args(argv)
    try:
        run_demo(a.out, a.pretrained, a.rounds, a.subjects, a.seed)
    except FedpdError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

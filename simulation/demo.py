"""``make demo``: phantom cohort -> ingest -> preprocess -> split -> partition -> 3-site federated simulation -> report.

The phantom is written in scanner ("native") space, like a real download: every scan goes through the
site-local preprocessing (N4, affine registration to MNI152, brain mask, QC) before the split. Two arms
for comparison (EXPERIMENTS.md): ``--space mni`` (a phantom already on the template grid, no preprocessing)
and ``--no-preprocess`` (native scans straight into the training pipeline).

Everything goes into one folder (default ``runs/demo``), which the demo owns: a re-run replaces it
(only if it carries the demo's marker file, so it never deletes a folder it did not make).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from common.cli import console, interrupt_on_sigterm
from common.errors import FedpdError
from common.runs.records import RunReport

MARKER = ".fedpd-demo"

# Sized so the whole demo (after `make setup`) finishes well inside 20 minutes on 2 CPU cores.
DEMO = {"subjects": 120, "sites": 3, "shape": 48, "effect": 1.0, "seed": 0, "rounds": 8}
DEMO_RUN_CONFIG = "input-shape='48,48,48' spacing='4.0,4.0,4.0' batch-size=8 local-epochs=2 lr=0.0001"
DEMO_TEMPLATE_MM = 2  # preprocessing registers to the 2 mm MNI152 template (the training input is 4 mm)


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def auc_line(report: RunReport) -> str:
    """One line: test AUC with its CI, selected round, threshold, and what kind of data it was."""
    auc = report.test.get("auc") or {}
    lo, hi = auc.get("ci95") or (None, None)
    kind = report.source
    note = " (synthetic phantom, not a clinical result)" if kind == "phantom" else ""
    return (f"test AUC {_num(auc.get('value'))} (95% CI {_num(lo)}-{_num(hi)}), selected round {report.selected_round}, "
            f"threshold {_num(report.threshold)}; data: {kind}{note}")


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_demo(out: Path, pretrained: str | None = None, rounds: int = DEMO["rounds"], subjects: int = DEMO["subjects"],
             seed: int = DEMO["seed"], space: str = "native", preprocess: bool = True,
             effect: float = DEMO["effect"], cohort_only: bool = False) -> RunReport | None:
    """Run the whole demo into ``out``; returns its report. ``cohort_only`` stops before the federated run
    (the partition is ``out/data/partition``: benchmarks run their own arms on it) and returns ``None``.

    ``seed`` drives everything random: the phantom cohort, the subject split, the partition and the run
    (initialisation, sampling, augmentation, dropout), so two demos with one seed give one result.
    """
    from common.cohort.ingest import ingest
    from common.cohort.splits import partition_manifest, split_manifest
    from common.preprocessing.pipeline import preprocess_manifest
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

    preprocess = preprocess and space == "native"
    steps = (6 if preprocess else 5) - cohort_only
    step = iter(range(1, steps + 1))
    t = _step(f"{next(step)}/{steps} phantom cohort in {space} space (synthetic, never a clinical result)")
    generate_phantom(data / "download", subjects=subjects, sites=DEMO["sites"], shape=DEMO["shape"],
                     effect=effect, seed=seed, space=space)
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step(f"{next(step)}/{steps} ingest")
    ingest(data / "download", csv=data / "download" / "idaSearch.csv", sites_csv=data / "download" / "centres.csv",
           out=data / "manifest.csv")
    manifest = data / "manifest.csv"
    print(f"({time.perf_counter() - t:.1f}s)")

    if preprocess:
        t = _step(f"{next(step)}/{steps} site-local preprocessing: N4, affine registration to MNI152 "
                  f"({DEMO_TEMPLATE_MM} mm), brain mask, QC (default threshold)")
        qc = preprocess_manifest(manifest, data / "preprocessed", template_mm=DEMO_TEMPLATE_MM)
        if not (qc["status"] == "ok").any():
            raise FedpdError(f"preprocessing QC excluded every scan; see {data / 'preprocessed' / 'qc.html'}")
        manifest = data / "preprocessed" / "manifest.csv"
        print(f"({time.perf_counter() - t:.1f}s)")

    t = _step(f"{next(step)}/{steps} subject-level split")
    split_manifest(manifest, val=0.2, test=0.25, seed=seed)
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step(f"{next(step)}/{steps} partition by acquisition site")
    partition_manifest(manifest, scheme="natural", out=data / "partition", seed=seed)
    print(f"({time.perf_counter() - t:.1f}s)")
    if cohort_only:
        print(f"\ncohort ready: {data / 'partition'} ({time.perf_counter() - t0:.0f}s); no federated run (--cohort-only)")
        return None

    t = _step(f"{next(step)}/{steps} federated simulation: {DEMO['sites']} sites, {rounds} rounds, Med3D resnet_10 "
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
    p.add_argument("--space", choices=("native", "mni"), default="native",
                   help="phantom space: native (scanner space, preprocessed before training) or mni (template grid)")
    p.add_argument("--no-preprocess", action="store_true",
                   help="comparison arm: native scans straight into the training pipeline, without preprocessing")
    p.add_argument("--effect", type=float, default=DEMO["effect"],
                   help="PD effect size of the phantom; 0 is the negative control (nothing to learn: test AUC "
                        "should be near 0.5)")
    p.add_argument("--cohort-only", action="store_true",
                   help="build the preprocessed, split and partitioned cohort (out/data/partition) and stop")
    a = p.parse_args(argv)
    console()  # the library functions' lines (ingest, split, ...), as fedpd prints them
    interrupt_on_sigterm()  # SIGTERM as Ctrl-C: preprocessing's pool and the Flower processes are stopped
    try:
        run_demo(a.out, a.pretrained, a.rounds, a.subjects, a.seed, space=a.space, preprocess=not a.no_preprocess,
                 effect=a.effect, cohort_only=a.cohort_only)
    except FedpdError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted; the Flower processes and the preprocessing workers were stopped (a re-run starts over)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

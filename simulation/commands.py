"""The local lab's ``fedpd`` subcommands: ``phantom``, ``simulate``, ``baseline``.

Added to the ``fedpd`` parser (:mod:`common.cli`) through the ``fedpd.commands`` entry point in
pyproject.toml: ``common`` may not import ``simulation``, so the lab plugs itself in.
"""

from __future__ import annotations

from pathlib import Path

from common.keys import BASELINE_MODES

__all__ = ["register"]


def _phantom(a):
    from simulation.phantom import generate_phantom

    generate_phantom(a.out, subjects=a.subjects, sites=a.sites, shape=a.shape, effect=a.effect, seed=a.seed,
                     dicom_fraction=a.dicom_fraction, space=a.space)


def _simulate(a):
    from simulation.simulate import simulate

    partition = a.partition
    if a.holdout_site:
        from common.config import parse_overrides
        from common.runs.preflight import check_run_dir
        from simulation.baselines import holdout_partition

        # refuse an earlier run before the held-out partition is written into its folder
        check_run_dir(Path(a.out).resolve(), parse_overrides(a.run_config).get("resume") is True)

        partition = holdout_partition(a.partition, a.holdout_site, Path(a.out).resolve() / "holdout-partition")
    report = simulate(partition, a.rounds, a.out, run_config=a.run_config)
    from simulation.demo import auc_line

    print(f"report: {Path(a.out).resolve() / 'report.html'} ({Path(a.out).resolve() / 'report.json'})")
    print(auc_line(report))


def _baseline(a):
    from simulation.baselines import run_baseline
    from simulation.demo import auc_line

    for arm, report in run_baseline(a.mode, a.partition, a.out, run_config=a.run_config).items():
        print(f"{arm}: {auc_line(report)}")



def register(sub) -> None:
    """Add the lab's subcommands to ``fedpd``'s subparsers (the ``fedpd.commands`` entry point)."""
    s = sub.add_parser("phantom", help="write a synthetic PPMI-shaped download (never a clinical result)")
    s.add_argument("out", type=Path)
    s.add_argument("--subjects", type=int, default=120)
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--shape", type=int, default=64, help="edge of the cubic output volume in voxels")
    s.add_argument("--effect", type=float, default=1.0, help="PD effect size; 0 = negative control")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dicom-fraction", type=float, default=0.15, help="share of scans written as DICOM series")
    s.add_argument("--space", choices=("native", "mni"), default="native",
                   help="native (default): scanner space like a real download (head pose, skull, neck, anisotropic "
                        "voxels, noisy background, bias field; known transforms in phantom.json), to be run through "
                        "fedpd preprocess; mni: already on the MNI152 grid with a zero background")
    s.set_defaults(func=_phantom)

    s = sub.add_parser("simulate", help="federated simulation: one virtual site per partition/sites/*.csv")
    s.add_argument("--partition", type=Path, required=True, help="folder from fedpd partition")
    s.add_argument("--rounds", type=int, default=None, help="num-server-rounds (default: run-config)")
    s.add_argument("--out", type=Path, required=True, help="run folder, e.g. runs/NAME")
    s.add_argument("--run-config", default="", help='extra run-config overrides "k=v ...", as flwr run -c')
    s.add_argument("--holdout-site", default=None,
                   help="leave-one-site-out: train on the other sites, test on this site's own subjects only")
    s.set_defaults(func=_simulate)

    s = sub.add_parser("baseline", help="comparison arms on the same engine: centralized, local (each site alone), scratch")
    s.add_argument("--mode", choices=BASELINE_MODES, required=True)
    s.add_argument("--partition", type=Path, required=True, help="folder from fedpd partition (same as the federated run)")
    s.add_argument("--out", type=Path, required=True,
                   help="run folder; put it under <federated run>/baselines/<mode> to see it in that run's report")
    s.add_argument("--run-config", default="", help='run-config overrides "k=v ...", the same as the federated run')
    s.set_defaults(func=_baseline)

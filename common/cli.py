"""``fedpd``: the command line. Each subcommand parses its flags and calls one library function.

The commands a site or a study runs on real data live here (check-checkpoint, ingest, preprocess, split,
partition, predict, report); the local lab's commands (phantom, simulate, baseline) are added by
``simulation.commands`` through the ``fedpd.commands`` entry-point group in pyproject.toml, so that
``common`` never imports ``simulation`` (the import rule of DESIGN.md) and an install without the lab
still has a working ``fedpd``.

Library functions return and log (loggers under ``fedpd``); this module prints: :func:`main` sends the
``fedpd`` loggers' INFO lines to stdout as plain text (:func:`console`). Imports are lazy so ``fedpd
--help`` is quick and a command pulls in only what it uses. Errors a user can fix
(:class:`common.errors.FedpdError`) are printed as ``fedpd <cmd>: error: ...`` with exit code 2 and no
traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from common.keys import PARTITION_SCHEMES

__all__ = ["main", "build_parser", "console", "interrupt_on_sigterm", "raise_interrupt", "COMMANDS_GROUP"]

COMMANDS_GROUP = "fedpd.commands"  # entry points: a callable that adds subcommands to the subparsers it is given


def _values(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _check_checkpoint(a):
    from common.learning.model import check_checkpoint

    print(check_checkpoint(a.path, depth=a.depth))


def _ingest(a):
    from common.errors import DataError

    if a.bids is not None:
        if a.download is not None or a.csv is not None or a.sites_csv is not None or a.nifti_cache is not None:
            raise DataError("--bids reads a BIDS dataset: leave out DOWNLOAD, --csv, --sites-csv and --nifti-cache")
        from common.cohort.bids import ingest_bids

        ingest_bids(a.bids, a.out, diagnosis_column=a.diagnosis_column, pd_values=a.pd_values,
                    control_values=a.control_values, site_column=a.site_column, force=a.force)
        return
    if a.download is None or a.csv is None:
        raise DataError("give DOWNLOAD and --csv (an IDA download), or --bids DIR (a BIDS dataset)")
    from common.cohort.ingest import ingest

    ingest(a.download, csv=a.csv, sites_csv=a.sites_csv, out=a.out, nifti_cache=a.nifti_cache, force=a.force)


def _preprocess(a):
    from common.errors import DataError
    from common.preprocessing.pipeline import preprocess_manifest

    qc = preprocess_manifest(a.manifest, a.out, template_mm=a.template_mm, n4=not a.no_n4,
                             qc_threshold=a.qc_threshold, workers=a.workers)
    if not (qc["status"] == "ok").any():
        raise DataError(f"{a.manifest}: preprocessing QC excluded every scan ({len(qc)}); nothing to train on. The "
                        f"reasons are in {Path(a.out) / 'qc.csv'} and {Path(a.out) / 'qc.html'}")


def _split(a):
    from common.cohort.splits import split_manifest

    split_manifest(a.manifest, val=a.val, test=a.test, seed=a.seed, out=a.out, unsafe_by_scan=a.unsafe_split_by_scan)


def _partition(a):
    from common.cohort.splits import partition_manifest

    partition_manifest(a.manifest, scheme=a.scheme, out=a.out, sites=a.sites, alpha=a.alpha, seed=a.seed)


def _predict(a):
    import json

    from common.inference.predict import format_result, predict_scan

    result = predict_scan(a.checkpoint, a.scan, saliency_png=a.saliency, background=a.background,
                          preprocessed=a.preprocessed)
    print(json.dumps(result, indent=2) if a.json else format_result(result))


def _report(a):
    from common.report.render import render_report

    print(render_report(a.run, compare=a.compare, saliency_scans=a.saliency_scans))


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of all ``fedpd`` subcommands."""
    p = argparse.ArgumentParser(
        prog="fedpd",
        description="Federated Parkinson's disease detection from 3D T1 MRI (Med3D + Flower).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("check-checkpoint", help="check a MedicalNet checkpoint loads exactly into Med3D "
                                                "(every key and shape, and no NaN/Inf values)")
    s.add_argument("path", type=Path)
    s.add_argument("--depth", type=int, default=None, help="expected depth (default: guessed from the keys)")
    s.set_defaults(func=_check_checkpoint)

    s = sub.add_parser("ingest", help="IDA download (CSV + image tree) -> manifest.csv")
    s.add_argument("download", type=Path, nargs="?", default=None,
                   help="folder that holds the PPMI/ image tree (an IDA download)")
    s.add_argument("--csv", type=Path, default=None, help="IDA search-results CSV (with DOWNLOAD)")
    s.add_argument("--bids", type=Path, default=None, metavar="DIR",
                   help="a BIDS dataset instead: participants.tsv + sub-*/[ses-*/]anat/*_T1w.nii[.gz]")
    s.add_argument("--diagnosis-column", default="group", help="participants.tsv column with the diagnosis (--bids)")
    s.add_argument("--pd-values", type=_values, default=("PD",),
                   help="comma-separated diagnosis values labelled PD (--bids, case-insensitive)")
    s.add_argument("--control-values", type=_values, default=("Control", "HC"),
                   help="comma-separated diagnosis values labelled control (--bids); other values are excluded "
                        "and counted")
    s.add_argument("--site-column", default="site", help="participants.tsv column with the acquisition site (--bids)")
    s.add_argument("--sites-csv", type=Path, default=None, help="subject -> centre table (PATNO,CNO)")
    s.add_argument("--out", type=Path, required=True,
                   help="manifest.csv to write: a new file (never the --csv or --sites-csv file)")
    s.add_argument("--nifti-cache", type=Path, default=None,
                   help="where DICOM series are converted to NIfTI; also holds the scan-check cache "
                        ".scan-check.json (default: <out folder>/nifti)")
    s.add_argument("--force", action="store_true",
                   help="replace an existing --out manifest; the old file is kept beside it as "
                        "<out>.bak-<YYYYmmdd-HHMMSS>")
    s.set_defaults(func=_ingest)

    s = sub.add_parser("preprocess", help="site-local: N4, affine registration to MNI152, brain mask, QC -> new manifest")
    s.add_argument("manifest", type=Path, help="manifest.csv of raw (scanner-space) T1 scans, from fedpd ingest")
    s.add_argument("--out", type=Path, required=True,
                   help="folder for the registered scans, manifest.csv, qc.csv, qc.html (never the input's folder)")
    s.add_argument("--template-mm", type=int, default=2, choices=(1, 2, 3, 4),
                   help="MNI152 template resolution in mm that scans are registered to and written in (default 2)")
    s.add_argument("--no-n4", action="store_true", help="skip N4 bias-field correction")
    s.add_argument("--qc-threshold", type=float, default=0.7,
                   help="exclude scans whose QC correlation with the template (both smoothed 3 mm, brain mask + 4 mm) "
                        "is below this (default 0.7: good registrations of real 3D T1s measured 0.73-0.94, the same "
                        "scans 20 mm off <= 0.46, T2-like or noise images <= 0.65; EXPERIMENTS.md)")
    s.add_argument("--workers", type=int, default=None, help="scans in parallel (default: from the CPU count)")
    s.set_defaults(func=_preprocess)

    s = sub.add_parser("split", help="subject-level train/val/test split, stratified by label and site")
    s.add_argument("manifest", type=Path)
    s.add_argument("--val", type=float, default=0.15)
    s.add_argument("--test", type=float, default=0.15)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=None, help="write here instead of updating the manifest in place")
    s.add_argument("--unsafe-split-by-scan", action="store_true",
                   help="UNSAFE, leakage demonstration only: split scans instead of subjects (inflates every figure)")
    s.set_defaults(func=_split)

    s = sub.add_parser("partition", help="assign split manifest rows to sites and the server")
    s.add_argument("manifest", type=Path)
    s.add_argument("--scheme", choices=PARTITION_SCHEMES, default="natural")
    s.add_argument("--sites", type=int, default=None, help="number of sites (iid, dirichlet)")
    s.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (dirichlet)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=_partition)

    s = sub.add_parser("predict", help="PD probability of one scan from a trained run (research use only)")
    s.add_argument("checkpoint", type=Path, help="a run's model.pt (or checkpoints/round-<k>.pt)")
    s.add_argument("scan", type=Path, help="one 3D T1 NIfTI file, raw (scanner space): it is prepared as the run's "
                                          "scans were (for a run on fedpd preprocess output: N4, registration to "
                                          "MNI152, brain mask, QC at the run's settings; refused if it fails)")
    s.add_argument("--preprocessed", action="store_true",
                   help="the scan is already prepared as the run's scans were (e.g. fedpd preprocess output, in "
                        "template space): use it as given; needed for a checkpoint that records no preparation")
    s.add_argument("--saliency", type=Path, default=None, metavar="OUT.png",
                   help="write a Grad-CAM overlay here: a new .png file (missing folders are created) or one an "
                        "earlier fedpd predict wrote; the scan, the checkpoint and any other existing file are "
                        "refused, never overwritten")
    s.add_argument("--background", choices=("auto", "template", "scan"), default="auto",
                   help="overlay background: MNI152 template, the scan as the model saw it (registered, for a run "
                        "on preprocessed scans), or auto (the registered scan when there is one, else the template for "
                        "phantom models)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_predict)

    s = sub.add_parser("report", help="(re-)render a run's report.html and figures/ from its report.json")
    s.add_argument("run", type=Path, help="run folder (holds report.json)")
    s.add_argument("--compare", type=Path, action="append", default=[], metavar="DIR",
                   help="folder with another arm's report.json (searched 3 levels deep); repeatable. "
                        "<run>/baselines/ is always searched")
    s.add_argument("--saliency-scans", type=int, default=3, help="test scans with a Grad-CAM overlay (0: none)")
    s.set_defaults(func=_report)

    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return p


class _Console(logging.StreamHandler):
    """INFO lines to ``sys.stdout``, warnings and errors to ``sys.stderr``: the streams as they are when a line
    is emitted (so a redirected or captured stream is honoured)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stderr if self._level_now >= logging.WARNING else sys.stdout

    @stream.setter
    def stream(self, _value):
        pass

    _level_now = logging.INFO

    def emit(self, record: logging.LogRecord) -> None:
        self._level_now = record.levelno
        super().emit(record)


def console() -> logging.Handler:
    """Print the ``fedpd`` loggers' lines as plain text, INFO to stdout and warnings to stderr: what a command
    shows.

    Library functions only log; the command line calls this once. Idempotent: one handler however often
    it is called. Returns the handler."""
    logger = logging.getLogger("fedpd")
    for h in logger.handlers:
        if isinstance(h, _Console):
            return h
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def raise_interrupt(signum, frame):
    """A signal handler that raises KeyboardInterrupt in the main thread (SIGTERM handled as Ctrl-C)."""
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (a scheduler, ``kill``, a container stop) end a command as Ctrl-C does: as an exception in the
    main thread, so every ``finally`` runs (a preprocessing pool is shut down after its running scans are
    cached, Flower processes are stopped) instead of the process vanishing with its children still running.
    Only from the main thread, where Python delivers signals; elsewhere it does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupt)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedpd`` console script. Ctrl-C or SIGTERM: exit 130, finished work kept."""
    from common.errors import FedpdError

    console()
    interrupt_on_sigterm()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FedpdError as exc:
        print(f"fedpd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedpd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The preflight: everything about a run that can be checked before Flower (or a baseline) starts.

``fedpd simulate`` and ``fedpd baseline`` call :func:`preflight_partition` before any process is
started; the ServerApp repeats the parts it can see (its own rows' scans, the run folder, the
pretrained checkpoint) in :mod:`server.setup`. Every problem found is reported at once where that is
possible (all bad scans in one table; all leaking subjects in one list), as a
:class:`~common.errors.FedpdError` naming the file or key and the fix, so a user error costs seconds,
not a minute of Flower start-up and pages of tracebacks.

Checks, in order (cheap first):

1. the run folder: not an earlier run unless ``resume`` (:meth:`common.runs.rundir.RunDir.existing_run`); it is
   created (and so proven writable) last, when everything else passed;
2. the partition: ``sites/*.csv`` and ``server.csv`` read as manifests with a split;
3. subjects: a subject belongs to one site file only; no subject of a site's *train* rows is in
   ``server.csv``; no subject of the server's *test* rows is in a site file (validation subjects are in
   both by design: the server validates on them, the sites may too);
4. ``min-nodes`` <= the number of site files (Flower would otherwise wait forever for more sites);
5. ``pretrained-path`` exists and loads strictly into Med3D of ``model-depth``;
6. every scan of every file passes :func:`common.cohort.scans.scan_problem`, cached by file content in
   ``<partition>/cache/scan-check.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.cohort.manifest import read_manifest
from common.cohort.scans import format_problems, check_scans
from common.config import RunConfig
from common.errors import CheckpointError, ConfigError, DataError
from common.runs.rundir import RunDir

__all__ = ["Preflight", "check_run_dir", "check_subjects", "check_pretrained", "check_min_nodes", "preflight_partition",
           "SCAN_CACHE"]

SCAN_CACHE = Path("cache") / "scan-check.json"  # under the partition folder
_SHOW = 10


@dataclass(frozen=True)
class Preflight:
    """What the preflight read and checked (for the one summary line it prints)."""

    sites: dict[str, pd.DataFrame]  # site file stem -> rows
    server: pd.DataFrame
    scans: int
    seconds: float

    def summary(self) -> str:
        return (f"preflight: {len(self.sites)} site file(s), server.csv, {self.scans} scan(s) checked, subjects "
                f"disjoint, in {self.seconds:.1f}s")


def check_run_dir(out: Path, resume: bool, create: bool = True) -> RunDir:
    """The run folder is new (or ``resume``) and, with ``create``, writable; returns it (prepared when created).

    Raises:
        ConfigError: it holds an earlier run and ``resume`` is false.
        DataError: it cannot be created or written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder; choose another --out (a new folder for the run)")
    run = RunDir(out)
    earlier = run.existing_run() if out.is_dir() else None
    if earlier and not resume:
        raise ConfigError(f"{out} already holds a run ({earlier}); choose a new --out, or continue that run with "
                          "--run-config \"resume=true\"")
    return run.prepare() if create else run


def _subjects(rows: pd.DataFrame, split: str | None = None) -> set[str]:
    part = rows if split is None else rows[rows["split"] == split]
    return set(part["subject_id"].astype(str))


def _listing(items) -> str:
    items = sorted(items)
    return ", ".join(items[:_SHOW]) + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def check_subjects(sites: dict[str, pd.DataFrame], server: pd.DataFrame, partition: Path) -> None:
    """No subject in two site files, no site-train subject at the server, no server-test subject at a site.

    Raises:
        DataError: listing every leaking subject per rule, naming the files.
    """
    problems = []
    owner: dict[str, str] = {}
    shared: dict[str, set[str]] = {}
    for name, rows in sites.items():
        for sid in _subjects(rows):
            if sid in owner:
                shared.setdefault(sid, {owner[sid]}).add(name)
            else:
                owner[sid] = name
    if shared:
        where = [f"{sid} ({'/'.join(sorted(names))})" for sid, names in shared.items()]
        problems.append(f"{len(shared)} subject(s) in more than one site file: {_listing(where)}")
    server_subjects = _subjects(server)
    for name, rows in sites.items():
        leak = _subjects(rows, "train") & server_subjects
        if leak:
            problems.append(f"sites/{name}.csv trains on {len(leak)} subject(s) that server.csv holds out: {_listing(leak)}")
    test = _subjects(server, "test")
    for name, rows in sites.items():
        leak = _subjects(rows) & test
        if leak:
            problems.append(f"sites/{name}.csv holds {len(leak)} subject(s) of the server's test rows: {_listing(leak)}")
    if problems:
        raise DataError(f"{partition}: the partition leaks subjects between sites and the held-out server rows:\n  "
                        + "\n  ".join(problems) + "\nRe-create it with `fedpd partition` (it hands whole subjects to "
                        "one place) instead of editing the files by hand.")


def check_min_nodes(cfg: RunConfig, n_sites: int, partition: Path) -> None:
    """``min-nodes`` <= the number of sites (Flower waits forever for sites that do not exist)."""
    if cfg.min_nodes > n_sites:
        raise ConfigError(f"run-config key 'min-nodes' = {cfg.min_nodes} but {partition}/sites holds {n_sites} site "
                          f"file(s): the run would wait forever; set min-nodes <= {n_sites}")


def check_pretrained(cfg: RunConfig) -> None:
    """``pretrained-path`` (when set) exists and loads strictly into Med3D of ``model-depth``."""
    if not cfg.pretrained_path:
        return
    from common.learning.model import check_checkpoint  # torch model code: only when a checkpoint is given

    path = Path(cfg.pretrained_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"run-config key 'pretrained-path' = {cfg.pretrained_path!r}: no such file; give the "
                          "MedicalNet checkpoint's path on this host (check it with `fedpd check-checkpoint`), or "
                          "pretrained-path='' to train from scratch")
    try:
        check_checkpoint(path, depth=cfg.model_depth)
    except CheckpointError as exc:
        raise CheckpointError(f"run-config key 'pretrained-path': {exc}") from exc


def _read_partition(partition: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    files = sorted((partition / "sites").glob("*.csv"))
    server_csv = partition / "server.csv"
    if not files or not server_csv.is_file():
        raise ConfigError(f"{partition}: expected sites/*.csv and server.csv; run `fedpd partition` first (its --out "
                          "is this folder)")
    return ({f.stem: read_manifest(f, require_split=True) for f in files},
            read_manifest(server_csv, require_split=True))


def preflight_partition(partition: Path, cfg: RunConfig, out: Path, *, progress: bool = True,
                        check_run: bool = True, federated: bool = True) -> Preflight:
    """Run every check of the module docstring; raise at the first failing stage, listing all its problems.

    Args:
        partition: folder from ``fedpd partition``.
        cfg: the run's checked run-config.
        out: the run folder (checked only when ``check_run``; created when it passes).
        progress: show a progress bar while scans are read.
        check_run: check the run folder (the local baseline arm checks one folder per site itself).
        federated: check ``min-nodes`` against the sites (not for the non-federated baselines).
    """
    start = time.perf_counter()
    partition = Path(partition)
    if check_run:
        check_run_dir(out, cfg.resume, create=False)  # an earlier run: refused first, it is the common slip
    sites, server = _read_partition(partition)
    check_subjects(sites, server, partition)
    if federated:
        check_min_nodes(cfg, len(sites), partition)
    check_pretrained(cfg)
    rows = [{"image_id": r["image_id"], "path": r["path"], "where": f"sites/{name}.csv"}
            for name, df in sites.items() for r in df.to_dict("records")]
    rows += [{"image_id": r["image_id"], "path": r["path"], "where": "server.csv"} for r in server.to_dict("records")]
    seen, unique = set(), []
    for r in rows:  # a validation scan is in a site file and in server.csv: check (and list) it once
        if r["image_id"] not in seen:
            seen.add(r["image_id"])
            unique.append(r)
    problems = check_scans(unique, cache_file=partition / SCAN_CACHE, progress=progress, desc="preflight scan check")
    if problems:
        raise DataError(f"{partition}: " + format_problems(problems, total=len(unique))
                        + "\nNothing was started. Fix the files (or drop their rows and re-run `fedpd partition`).")
    if check_run:
        check_run_dir(out, cfg.resume)  # created (and proven writable) only once everything else passed
    return Preflight(sites=sites, server=server, scans=len(unique), seconds=time.perf_counter() - start)

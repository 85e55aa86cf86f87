"""``fedpd split`` and ``fedpd partition``: subject-level splits and site partitions of a manifest.

Split: the manifest's subjects (sorted ids, one row each, carrying the subject's label and site) are
split in two seeded stages with scikit-learn's ``StratifiedShuffleSplit``: test off all subjects, then
val off the rest. Because the table being split has one row per subject, every scan of a subject gets
the subject's split: a grouped split by construction. Fractions are of subjects. Strata are
``label x site``; a stratum with a single subject is pooled with its label's other small strata (or
its label's largest stratum). If the strata still cannot be honoured (too few subjects for the number
of strata), the stage falls back to label-only strata, then to an unstratified ``ShuffleSplit``, and
says so. The split is deterministic for a seed and written into the ``split`` column.

Partition: sites get the train+val rows of whole subjects, ``server.csv`` gets all val+test rows.
Schemes: ``natural`` (the manifest's ``site``), ``iid`` (subjects dealt round-robin over K virtual sites
within each split x label group) and ``dirichlet`` (per-class Dirichlet(alpha) site shares, whole
subjects, every site at least one train subject).

Bad input: ``split`` refuses a manifest with only one class (PD-vs-control needs both); ``partition``
refuses an ``out`` folder that holds the input manifest (it writes ``server.csv``, ``sites/*.csv`` and
``partition.json`` there) and warns about every site whose train rows hold one class only.
"""

from __future__ import annotations

import logging
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

from common.cohort.manifest import SPLITS, UNSAFE_SCAN_SPLIT, read_manifest, validate_manifest, write_manifest
from common.errors import DataError
from common.keys import PARTITION_SCHEMES

log = logging.getLogger("fedpd.split")

__all__ = ["split_manifest", "split_audit", "format_audit", "partition_manifest", "SCHEMES"]

SCHEMES = PARTITION_SCHEMES
_IN_MEMORY = "<manifest table>"


def _load(manifest, require_split: bool) -> tuple[pd.DataFrame, object]:
    """(rows, path or None). Without ``require_split`` (i.e. for ``split``) an old split column is not checked."""
    if isinstance(manifest, pd.DataFrame):
        df = manifest.copy()
        validate_manifest(df if require_split or "split" not in df.columns else df.drop(columns=["split"]),
                          _IN_MEMORY, require_split=require_split)
        df["label"] = df["label"].astype(int)
        return df, None
    path = Path(manifest)
    return read_manifest(path, require_split=require_split, ignore_split=not require_split), path


def _subjects(df: pd.DataFrame) -> pd.DataFrame:
    """One row per subject (sorted ids) with its label and site."""
    return (df.groupby("subject_id", sort=True).agg(label=("label", "first"), site=("site", "first"))
            .reset_index())


def _strata(sub: pd.DataFrame) -> np.ndarray:
    """label x site keys; single-subject strata pooled per label, then into the label's largest stratum."""
    keys = (sub["label"].astype(str) + "|" + sub["site"].astype(str)).to_numpy(dtype=object)
    for lone in [k for k, n in pd.Series(keys).value_counts().items() if n < 2]:
        keys[keys == lone] = lone.split("|")[0] + "|*"
    counts = pd.Series(keys).value_counts()
    for pooled in [k for k, n in counts.items() if k.endswith("|*") and n < 2]:
        label = pooled.split("|")[0]
        others = counts[[k for k in counts.index if k.startswith(label + "|") and k != pooled]]
        if len(others) == 0:
            others = counts[[k for k in counts.index if k != pooled]]
        if len(others):
            keys[keys == pooled] = sorted(others.index, key=lambda k: (-others[k], k))[0]
    return keys


def _pick(sub: pd.DataFrame, frac: float, seed: int, stage: str, source) -> np.ndarray:
    """Positions (into ``sub``) of a seeded, stratified ``frac`` share of the subjects."""
    n = len(sub)
    if frac == 0 or n == 0:
        return np.array([], dtype=int)
    if n < 2 or math.ceil(frac * n) >= n:
        raise DataError(f"{source}: {n} subject(s) left for the {stage} share {frac:.3f}: too few subjects to split; "
                        "lower --val/--test or add subjects.")
    x = np.zeros((n, 1))
    for level, y in (("label x site", _strata(sub)), ("label", sub["label"].to_numpy())):
        try:
            _, picked = next(StratifiedShuffleSplit(n_splits=1, test_size=frac, random_state=seed).split(x, y))
        except ValueError as exc:
            log.info(f"split: {stage}: cannot stratify by {level} ({exc}); trying coarser strata")
            continue
        log.info(f"split: {stage}: stratified by {level}")
        return np.sort(picked)
    log.info(f"split: {stage}: unstratified (too few subjects per label)")
    _, picked = next(ShuffleSplit(n_splits=1, test_size=frac, random_state=seed).split(x))
    return np.sort(picked)


UNSAFE_WARNING = ("*** UNSAFE: splitting by SCAN, not by subject. Visits of one subject land in train and test, so every "
                  "test figure is inflated by leakage. Use this only to demonstrate that leakage; never report it. ***")


def split_manifest(manifest, val: float = 0.15, test: float = 0.15, seed: int = 0, out=None,
                   unsafe_by_scan: bool = False) -> pd.DataFrame:
    """Assign every subject to train/val/test (see the module docstring) and write the ``split`` column.

    Args:
        manifest: a manifest CSV path (or a manifest DataFrame).
        val, test: shares of subjects, each in [0, 1), summing to less than 1.
        seed: random seed (>= 0); the same seed gives the same split.
        out: write the split manifest here; default: update ``manifest`` in place (nothing is written for
            a DataFrame without ``out``).
        unsafe_by_scan: assign scans, not subjects (leakage demonstration only): every row gets
            ``unsafe_split = by-scan`` so validation lets subjects span splits and the audit and report flag it.

    Returns:
        The manifest rows with ``split`` filled in.
    """
    for name, v in (("val", val), ("test", test)):
        if not 0.0 <= float(v) < 1.0:
            raise DataError(f"--{name} {v} is out of range; it must be in [0, 1) (a share of subjects).")
    if val + test >= 1.0:
        raise DataError(f"--val {val} + --test {test} = {val + test:g} leaves no training subjects; "
                        "their sum must be < 1.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"--seed {seed!r} must be an integer >= 0.")
    df, path = _load(manifest, require_split=False)
    source = path or _IN_MEMORY
    _require_both_classes(df, source)
    if "split" in df.columns and df["split"].notna().any():
        log.info("split: replacing the existing split column")
    if "unsafe_split" in df.columns:
        df = df.drop(columns=["unsafe_split"])
    if unsafe_by_scan:
        log.info("split: " + UNSAFE_WARNING)
        unit = df.assign(subject_id=df["image_id"].astype(str))  # each scan its own unit: the leak on purpose
        sub = _subjects(unit)
    else:
        sub = _subjects(df)
    assign = np.full(len(sub), "train", dtype=object)
    assign[_pick(sub, test, seed, "test", source)] = "test"
    rest = np.flatnonzero(assign == "train")
    rest_frac = val / (1.0 - test) if val else 0.0
    assign[rest[_pick(sub.iloc[rest].reset_index(drop=True), rest_frac, seed, "val", source)]] = "val"
    key = "image_id" if unsafe_by_scan else "subject_id"
    df["split"] = df[key].astype(str).map(dict(zip(sub["subject_id"], assign)))
    if unsafe_by_scan:
        df["unsafe_split"] = UNSAFE_SCAN_SPLIT
    target = Path(out) if out is not None else path
    validate_manifest(df, target or _IN_MEMORY, require_split=True)
    if target is not None:
        write_manifest(df, target)
        log.info(f"split: wrote {target}")
    log.info(format_audit(split_audit(df)))
    return df


def _require_both_classes(df: pd.DataFrame, source) -> None:
    sub = _subjects(df)
    n = {lab: int((sub["label"] == lab).sum()) for lab in (0, 1)}
    if min(n.values()) > 0:
        return
    missing = "control" if n[0] == 0 else "PD"
    raise DataError(f"{source}: only one class: {n[1]} PD and {n[0]} control subject(s) ({len(df)} scans); a "
                    f"PD-vs-control model needs both: add {missing} subjects (include them in the IDA CSV and re-run "
                    "fedpd ingest) before splitting.")


def _counts(part: pd.DataFrame) -> dict:
    return {"subjects": int(part["subject_id"].nunique()), "scans": int(len(part))}


def split_audit(df: pd.DataFrame) -> dict:
    """JSON-ready counts of subjects and scans per split, per split x label and per split x label x site.

    Keys: ``total``, ``splits`` (``{split: {subjects, scans, labels: {"0"|"1": {subjects, scans}}}}``),
    ``strata`` (records ``{split, label, site, subjects, scans}``) and ``subjects_shared_across_splits``.
    """
    shared = int((df.groupby("subject_id")["split"].nunique() > 1).sum())
    splits, strata = {}, []
    for s in SPLITS:
        part = df[df["split"] == s]
        splits[s] = {**_counts(part), "labels": {str(lab): _counts(part[part["label"] == lab]) for lab in (0, 1)}}
        for (lab, site), g in sorted(part.groupby(["label", "site"]), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            strata.append({"split": s, "label": int(lab), "site": str(site), **_counts(g)})
    unsafe = "unsafe_split" in df.columns and bool((df["unsafe_split"].astype(str) == UNSAFE_SCAN_SPLIT).any())
    return {"total": _counts(df), "splits": splits, "strata": strata, "subjects_shared_across_splits": shared,
            "unsafe_split_by_scan": unsafe}


def format_audit(audit: dict) -> str:
    """The audit as a text table, ending with the line ``subjects shared across splits: N``."""
    lines = [f"{'split':<6} {'label':<8} {'site':<20} {'subjects':>8} {'scans':>6}"]
    for r in audit["strata"]:
        lines.append(f"{r['split']:<6} {('PD' if r['label'] == 1 else 'control'):<8} {r['site'][:20]:<20} "
                     f"{r['subjects']:>8} {r['scans']:>6}")
    total = max(audit["total"]["subjects"], 1)
    for s, c in audit["splits"].items():
        lab = c["labels"]
        lines.append(f"{s}: {c['subjects']} subjects ({100 * c['subjects'] / total:.1f} %; {lab['1']['subjects']} PD, "
                     f"{lab['0']['subjects']} control), {c['scans']} scans")
    if audit.get("unsafe_split_by_scan"):
        lines.append(UNSAFE_WARNING)
    lines.append(f"subjects shared across splits: {audit['subjects_shared_across_splits']}")
    return "\n".join(lines)


def _safe(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(site)).strip("._") or "site"


def _iid(sub: pd.DataFrame, k: int, rng: np.random.Generator) -> np.ndarray:
    """Round-robin over K sites within each split x label group (sorted ids, seeded shuffle)."""
    out = np.empty(len(sub), dtype=int)
    counter = 0
    for split in ("train", "val"):
        for lab in (0, 1):
            pos = np.flatnonzero(((sub["split"] == split) & (sub["label"] == lab)).to_numpy())
            for p in rng.permutation(pos):
                out[p] = counter % k
                counter += 1
    return out


def _dirichlet(sub: pd.DataFrame, k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per-class Dirichlet(alpha) shares over K sites; whole subjects; every site >= 1 train subject."""
    groups = {(s, lab): rng.permutation(np.flatnonzero(((sub["split"] == s) & (sub["label"] == lab)).to_numpy()))
              for s in ("train", "val") for lab in (0, 1)}
    out = np.empty(len(sub), dtype=int)
    for _ in range(100):  # re-draw until every site has a train subject (usual for moderate alpha)
        shares = {lab: rng.dirichlet(np.full(k, alpha)) for lab in (0, 1)}
        for (s, lab), pos in groups.items():
            cuts = (np.cumsum(shares[lab]) * len(pos)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(pos, cuts)):
                out[chunk] = site
        train = (sub["split"] == "train").to_numpy()
        if len(set(out[train])) == k:
            return out
    # Deterministic fix-up: each empty site takes one train subject from the currently largest site.
    train_pos = np.flatnonzero(train)
    for site in range(k):
        sizes = np.bincount(out[train_pos], minlength=k)
        if sizes[site] == 0:
            donor = int(np.argmax(sizes))
            out[train_pos[out[train_pos] == donor][-1]] = site
    return out


def partition_manifest(manifest, scheme: str = "natural", out="partition", sites: int | None = None,
                       alpha: float = 0.5, seed: int = 0) -> dict:
    """Write ``out/sites/<site>.csv`` (train+val rows per site), ``out/server.csv`` and ``out/partition.json``.

    Args:
        manifest: a split manifest CSV path (or DataFrame).
        scheme: ``natural`` | ``iid`` | ``dirichlet`` (module docstring).
        out: output folder.
        sites: number of virtual sites (iid, dirichlet; must be left out for natural).
        alpha: Dirichlet concentration (> 0; small = skewed class shares).
        seed: random seed.

    Returns:
        The ``partition.json`` content: scheme, seed, alpha, per-site files and class counts, server counts.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    if scheme == "natural" and sites is not None:
        raise DataError("--sites is for iid/dirichlet only; natural uses the manifest's site column.")
    if scheme != "natural" and (sites is None or int(sites) < 1):
        raise DataError(f"scheme {scheme} needs --sites K (K >= 1 virtual sites), got {sites!r}.")
    if scheme == "dirichlet" and not alpha > 0:
        raise DataError(f"--alpha {alpha} must be > 0 (small = skewed class shares per site).")
    if not isinstance(manifest, pd.DataFrame):
        m, o = Path(manifest).resolve(), Path(out).resolve()
        if m == o or o in m.parents:
            raise DataError(f"{manifest}: the input manifest lies inside the --out folder {out}; partition writes "
                            "server.csv, sites/*.csv and partition.json there and must not overwrite its input: "
                            f"choose a separate folder, e.g. --out {m.parent / 'partition'}.")
    df, path = _load(manifest, require_split=True)
    source = path or _IN_MEMORY
    pool = df[df["split"].isin(["train", "val"])].copy()
    sub = (pool.groupby("subject_id", sort=True).agg(label=("label", "first"), site=("site", "first"),
                                                     split=("split", "first")).reset_index())
    if scheme == "natural":
        site_of = dict(zip(sub["subject_id"], sub["site"].astype(str)))
    else:
        k = int(sites)
        n_train = int((sub["split"] == "train").sum())
        if n_train < k:
            raise DataError(f"{source}: {k} sites but only {n_train} train subjects; use --sites <= {n_train}.")
        rng = np.random.default_rng(seed)
        idx = _iid(sub, k, rng) if scheme == "iid" else _dirichlet(sub, k, float(alpha), rng)
        site_of = {s: f"site-{i + 1}" for s, i in zip(sub["subject_id"], idx)}
        pool["origin_site"] = pool["site"]
    pool["site"] = pool["subject_id"].map(site_of)
    return _write_partition(df, pool, Path(out), scheme, seed, alpha if scheme == "dirichlet" else None, source)


def _label_counts(part: pd.DataFrame, what: str) -> dict:
    """{"0": n, "1": n}: scans (``what="scans"``) or distinct subjects per label."""
    per = part.groupby("label")["subject_id"].nunique() if what == "subjects" else part["label"].value_counts()
    return {str(lab): int(per.get(lab, 0)) for lab in (0, 1)}


def _write_partition(df, pool, out: Path, scheme, seed, alpha, source) -> dict:
    names, skipped, per_site = {}, [], {}
    for site in sorted(pool["site"].unique(), key=str):
        rows = pool[pool["site"] == site]
        if not (rows["split"] == "train").any():
            skipped.append(site)  # no training data: its val rows stay in server.csv only
            continue
        fname = _safe(site) + ".csv"
        if fname in names.values():
            raise DataError(f"{source}: sites {site!r} and {[s for s, f in names.items() if f == fname][0]!r} map "
                            f"to the same file name {fname}; rename one in the manifest's site column.")
        names[site] = fname
    site_dir = out / "sites"
    previous = _previous_files(out)
    _mkdir(site_dir)
    stray = sorted(p.name for p in site_dir.glob("*.csv") if p.name not in names.values() and p.name not in previous)
    if stray:
        raise DataError(f"{site_dir} holds site files this partition would not write ({', '.join(stray)}); "
                        "simulations read every sites/*.csv, so delete them or choose another --out.")
    for p in site_dir.glob("*.csv"):
        if p.name in previous and p.name not in names.values():
            p.unlink()
            log.info(f"partition: removed {p} from the previous partition")
    for site, fname in names.items():
        rows = pool[pool["site"] == site]
        write_manifest(rows, site_dir / fname)
        per_site[str(site)] = {"file": f"sites/{fname}", "subjects": int(rows["subject_id"].nunique()),
                               "scans": int(len(rows)),
                               **{f"{s}_{w}": _label_counts(rows[rows["split"] == s], w)
                                  for s in ("train", "val") for w in ("scans", "subjects")}}
    server = df[df["split"].isin(["val", "test"])]
    write_manifest(server, out / "server.csv")
    info = {"scheme": scheme, "seed": int(seed), "alpha": alpha, "num_sites": len(names), "sites": per_site,
            "skipped_sites": [str(s) for s in skipped],
            "server": {"file": "server.csv", "scans": int(len(server)),
                       **{f"{s}_scans": _label_counts(server[server["split"] == s], "scans") for s in ("val", "test")}}}
    tmp = out / ".partition.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / "partition.json")
    _print_partition(info, out)
    return info


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {folder} ({exc.strerror or exc}); choose a writable --out.") from exc


def _previous_files(out: Path) -> set[str]:
    """Site file names listed by an earlier partition.json in ``out`` (ours to replace)."""
    try:
        prev = json.loads((out / "partition.json").read_text())
        return {Path(v["file"]).name for v in prev.get("sites", {}).values()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return set()


def _print_partition(info: dict, out: Path) -> None:
    lines = [f"partition: scheme {info['scheme']} (seed {info['seed']}"
             + (f", alpha {info['alpha']}" if info["alpha"] is not None else "") + f") -> {out}",
             f"{'site':<20} {'train PD':>8} {'train HC':>8} {'val PD':>7} {'val HC':>7} {'subjects':>8}"]
    for site, c in info["sites"].items():
        lines.append(f"{site[:20]:<20} {c['train_scans']['1']:>8} {c['train_scans']['0']:>8} {c['val_scans']['1']:>7} "
                     f"{c['val_scans']['0']:>7} {c['subjects']:>8}")
    s = info["server"]
    lines.append(f"server: val {s['val_scans']['1']} PD / {s['val_scans']['0']} HC scans, test {s['test_scans']['1']} "
                 f"PD / {s['test_scans']['0']} HC scans")
    if info["skipped_sites"]:
        lines.append(f"warning: site(s) with no train subject get no site file (their val rows stay in server.csv): "
                     f"{', '.join(info['skipped_sites'])}")
    log.info("\n".join(lines))
    for site, c in info["sites"].items():
        pd_, hc = c["train_scans"]["1"], c["train_scans"]["0"]
        if min(pd_, hc) == 0:
            only = "PD" if hc == 0 else "control"
            log.warning(f"partition: warning: site {site}: its train rows hold only one class ({pd_} PD / {hc} control "
                        f"scans of {c['train_subjects']['1'] + c['train_subjects']['0']} subject(s)): it trains on "
                        f"{only} only and local class balancing cannot help; "
                        + ("to compare, try --scheme iid or dirichlet" if info["scheme"] == "natural"
                           else "fewer --sites give each site both classes"))

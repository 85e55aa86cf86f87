"""``fedpd baseline``: the comparison arms, trained and evaluated by the same code as the federated app.

Every arm reads the same partition (``sites/*.csv`` train rows, ``server.csv`` val and test rows), picks
its best round on the same server validation rows, chooses its threshold there and looks at the same
test rows once, through :func:`common.runs.finalize.finalize_run` (subject-level bootstrap CIs):

- ``centralized``: all sites' train rows pooled in one place (the upper reference: what pooling the
  scans would give). One "round" = ``local-epochs`` passes, so the arms see the same number of epochs.
- ``local``: each site alone on its own train rows, one run folder per site (``OUT/<site>/``): what a
  hospital gets without federation.
- ``scratch``: the federated run from random initialisation (``pretrained-path=''``), to set beside the
  pretrained FedAvg run when a MedicalNet checkpoint is given.

The training loop is :func:`common.learning.train.train_local` and the loaders are the ClientApp's
(:func:`common.learning.train.train_loader`, class balancing included); a fresh AdamW per round as at a site.
``holdout_partition`` derives a leave-one-site-out partition for ``fedpd simulate --holdout-site``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from common import keys
from common.cohort.manifest import read_manifest, write_manifest
from common.cohort.splits import split_audit
from common.config import RunConfig, parse_overrides
from common.device import Runtime, runtime
from common.errors import ConfigError, DataError
from common.learning.model import make_model
from common.learning.train import train_loader, train_local
from common.preprocessing.provenance import scan_preparation
from common.report.render import render_report
from common.runs.finalize import finalize_run
from common.runs.preflight import preflight_partition
from common.runs.rounds import close_round
from common.runs.rundir import RunDir

__all__ = ["MODES", "run_baseline", "holdout_partition"]

MODES = keys.BASELINE_MODES
log = logging.getLogger("fedpd.baselines")


def _load_partition(partition: Path) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    partition = Path(partition).resolve()
    files = sorted((partition / "sites").glob("*.csv"))
    server_csv = partition / "server.csv"
    if not files or not server_csv.is_file():
        raise ConfigError(f"{partition}: expected sites/*.csv and server.csv (run fedpd partition first)")
    sites = {}
    for f in files:
        rows = read_manifest(f, require_split=True)
        name = str(rows["site"].iloc[0]) if len(rows) else f.stem
        sites[name] = rows
    server = read_manifest(server_csv, require_split=True)
    info_file = partition / "partition.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return sites, server, info


def _config(run_config: str, out: Path, partition: Path) -> RunConfig:
    values = parse_overrides(run_config)
    values.update({"out-dir": str(out), "partition-dir": str(partition), "server-manifest": str(partition / "server.csv")})
    return RunConfig.from_mapping(values)


def _train_arm(arm: str, train_rows: pd.DataFrame, server: pd.DataFrame, cfg: RunConfig, out: Path, rt: Runtime,
               data_info: dict, preparation: dict) -> dict:
    """Rounds of ``train_local`` on ``train_rows``, each validated and checkpointed like a federated round;
    ``preparation`` (how the server's scans were prepared) goes into every checkpoint, model.pt and report.json."""
    run = RunDir(out).prepare()
    if run.saved_rounds() or run.rounds_file.exists():
        raise ConfigError(f"{out} already holds a run; choose a new --out (baselines do not resume)")
    if train_rows.empty:
        raise DataError(f"arm {arm}: no train rows; every arm needs at least one training scan")
    val_rows = server[server["split"] == "val"].reset_index(drop=True)
    test_rows = server[server["split"] == "test"].reset_index(drop=True)
    run.write_json("config.json", cfg.to_dict() | {"arm": arm})
    model = make_model(cfg, pretrained=True)
    train_cache, server_cache = out / "cache" / "train", out / "cache" / "server"
    counts = {}
    for r in range(1, cfg.num_server_rounds + 1):
        start = time.time()
        seed = cfg.seed + r
        torch.manual_seed(seed)
        loader, counts, weights = train_loader(train_rows, cfg, train_cache, seed)
        res = train_local(model, loader, epochs=cfg.local_epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, rt=rt,
                          class_weights=weights, num_examples=len(train_rows))
        site = {keys.NUM_EXAMPLES: res.num_examples, keys.TRAIN_LOSS: res.loss,
                keys.class_count_key(0): int(counts.get(0, 0)), keys.class_count_key(1): int(counts.get(1, 0))}
        record = close_round(run, model, r, cfg=cfg, rt=rt, val_rows=val_rows, cache_dir=server_cache, started=start,
                             strategy=arm, sites={arm: site}, preparation=preparation)
        log.info(f"baseline {arm}: round {r}/{cfg.num_server_rounds}: train loss {res.loss:.4f}, "
                 f"val AUC {record.val['auc']:.3f}, {record.wall_seconds:.0f}s")
    info = data_info | {"site_train_counts": {arm: {"control": int(counts.get(0, 0)), "pd": int(counts.get(1, 0)),
                                                    "num_examples": len(train_rows)}}}
    return finalize_run(run, cfg, rt, val_rows, test_rows, server_cache, extra={"data": info}, arm=arm,
                        render=render_report, preparation=preparation)


def run_baseline(mode: str, partition, out, run_config: str = "", echo: bool = True) -> dict:
    """Run one comparison arm; returns ``{arm name: report}``.

    Raises:
        ConfigError: unknown mode, bad partition folder, an existing run in ``out``, or ``scratch``
            without a ``pretrained-path`` (then the federated run already is the from-scratch arm).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    partition, out = Path(partition).resolve(), Path(out).resolve()
    cfg = _config(run_config, out, partition)
    if mode != "scratch":  # scratch is a federated run: fedpd simulate runs the same preflight
        checked = preflight_partition(partition, cfg, out, progress=echo, check_run=mode == "centralized", federated=False)
        if echo:
            log.info(checked.summary())
    sites, server, info = _load_partition(partition)
    if mode == "scratch":
        if not cfg.pretrained_path:
            raise ConfigError("--mode scratch is the federated run from random initialisation, set beside a pretrained "
                              "run; this run-config has no pretrained-path, so your FedAvg run already is from scratch "
                              "(add --run-config \"pretrained-path='/abs/resnet_10.pth'\" to compare)")
        from simulation.simulate import simulate

        report = simulate(partition, None, out, run_config=f"{run_config} pretrained-path=''", echo=echo)
        return {report.arm: report}
    try:  # as the ServerApp does (server.setup.prepare): how the server's scans were prepared, for fedpd predict
        preparation = scan_preparation(server["path"])
    except DataError as exc:
        raise DataError(f"{partition / 'server.csv'}: {exc}") from exc
    rt = runtime(cfg.amp)
    data_info = {"server_split_audit": split_audit(server), "partition": info, "baseline": mode,
                 "unsafe_scan_split": split_audit(server)["unsafe_split_by_scan"]}
    if mode == "centralized":
        rows = pd.concat([r[r["split"] == "train"] for r in sites.values()], ignore_index=True)
        return {"centralized": _train_arm("centralized", rows, server, cfg, out, rt, data_info, preparation)}
    reports = {}
    for name, rows in sites.items():
        arm = f"local:{name}"
        site_cfg = cfg.replace(out_dir=str(out / name))
        reports[arm] = _train_arm(arm, rows[rows["split"] == "train"].reset_index(drop=True), server, site_cfg,
                                  out / name, rt, data_info, preparation)
    return reports


def holdout_partition(partition, site: str, out) -> Path:
    """A leave-one-site-out copy of a natural partition: train on the other sites, test on ``site`` only.

    The other sites keep their files; ``server.csv`` gets the other sites' server validation rows (the
    best round and the threshold are chosen without site ``site``) and every row of ``site``'s subjects
    (its train, val and test scans) as ``test``. ``partition.json`` records ``holdout_site``.
    """
    partition, out = Path(partition).resolve(), Path(out).resolve()
    sites, server, info = _load_partition(partition)
    if info.get("scheme", "natural") != "natural":
        raise ConfigError(f"{partition}: --holdout-site needs a natural partition (sites = acquisition sites); this one "
                          f"is {info.get('scheme')!r}")
    if site not in sites:
        raise ConfigError(f"--holdout-site {site!r} is not a site of {partition}; choose one of {', '.join(sorted(sites))}")
    if len(sites) < 2:
        raise ConfigError(f"{partition}: leave-one-site-out needs at least 2 sites")
    (out / "sites").mkdir(parents=True, exist_ok=True)
    for stale in (out / "sites").glob("*.csv"):
        stale.unlink()
    names = {}
    for f in sorted((partition / "sites").glob("*.csv")):
        rows = read_manifest(f, require_split=True)
        if str(rows["site"].iloc[0]) != site:
            write_manifest(rows, out / "sites" / f.name)
            names[str(rows["site"].iloc[0])] = f.name
    keep_val = server[(server["site"].astype(str) != site) & (server["split"] == "val")]
    held = pd.concat([server[server["site"].astype(str) == site], sites[site]], ignore_index=True)
    held = held.drop_duplicates(subset="image_id").assign(split="test")
    new_server = pd.concat([keep_val, held], ignore_index=True)
    write_manifest(new_server, out / "server.csv")
    new_info = dict(info) | {"holdout_site": site, "source_partition": str(partition),
                             "sites": {k: v for k, v in info.get("sites", {}).items() if k != site},
                             "num_sites": len(names),
                             "server": {"file": "server.csv", "scans": int(len(new_server)),
                                        "val_scans": int(len(keep_val)), "test_scans": int(len(held)),
                                        "test_subjects": int(held["subject_id"].nunique())}}
    (out / "partition.json").write_text(json.dumps(new_info, indent=2) + "\n")
    log.info(f"holdout: training on {', '.join(sorted(names))}; testing on {site} only "
             f"({held['subject_id'].nunique()} subjects, {len(held)} scans); validation on the other sites' server rows "
             f"({len(keep_val)} scans)")
    return out

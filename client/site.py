"""Which site this ClientApp is, and where its data and cache live.

Deployment: the SuperNode's ``--node-config "data-path='/site/site.csv' cache-dir='/site/cache'"``.
Simulation: Flower gives only ``partition-id``; it is mapped onto the sorted ``sites/*.csv`` of the
run-config's ``partition-dir``. Everything after this lookup is the same code path.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from common import keys
from common.cohort.manifest import read_manifest
from common.config import RunConfig
from common.errors import ConfigError, DataError
from common.preprocessing import QC_CSV

__all__ = ["Site", "resolve_site", "NODE_CONFIG_FLAG"]

NODE_CONFIG_FLAG = "--node-config \"data-path='/path/to/site.csv' cache-dir='/path/to/cache'\""


@dataclass(frozen=True)
class Site:
    name: str
    index: int  # stable small integer, for seeding
    manifest: Path
    cache_dir: Path

    def rows(self, split: str) -> pd.DataFrame:
        df = read_manifest(self.manifest, require_split=True)
        return df[df["split"] == split].reset_index(drop=True)

    def preprocessing_qc(self) -> dict[str, int] | None:
        """How many of this site's scans its preprocessing QC kept and excluded, or ``None``.

        Read from the ``qc.csv`` that ``fedpd preprocess`` wrote beside the scans this site's manifest
        points at (all of the site's scans, before the split: the test scans the server holds included),
        counting the rows whose ``site`` is this site's name. ``None`` when the scans did not come from
        ``fedpd preprocess`` or the site name is not an acquisition site (a virtual iid/dirichlet site).
        Kept per process while neither file changes (each cache is keyed by its file and that file's mtime):
        a simulation's ClientApp actors answer many messages.
        """
        manifest_mtime = _mtime(self.manifest)
        qc_file = _qc_file(self.manifest, manifest_mtime) if manifest_mtime is not None else None
        qc_mtime = _mtime(qc_file) if qc_file is not None else None
        return _qc_counts(qc_file, qc_mtime, self.name) if qc_mtime is not None else None


@lru_cache(maxsize=4)
def _qc_file(manifest: Path, _mtime_ns: int) -> Path | None:
    """The ``qc.csv`` beside the scans a manifest points at (one folder only), or ``None``."""
    try:
        df = read_manifest(manifest, require_split=False)
    except (OSError, ValueError, KeyError, DataError):
        return None
    folders = {Path(str(p)).parent for p in df["path"]}
    return folders.pop() / QC_CSV if len(folders) == 1 else None


@lru_cache(maxsize=4)
def _qc_counts(qc_file: Path, _mtime_ns: int, site: str) -> dict[str, int] | None:
    """``{kept, excluded}`` of ``site``'s rows in a ``qc.csv``, or ``None`` (unreadable, or no rows of it)."""
    try:
        qc = pd.read_csv(qc_file, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    if not {"site", "status"} <= set(qc.columns):
        return None
    mine = qc[qc["site"] == site]
    if mine.empty:
        return None
    kept = int((mine["status"] == "ok").sum())
    return {"kept": kept, "excluded": int(len(mine) - kept)}


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def resolve_site(node_config: Mapping[str, Any], cfg: RunConfig) -> Site:
    """Find this node's site manifest and cache folder.

    Raises:
        ConfigError: a node-config key is missing (naming the key and the ``--node-config`` flag), or the
            simulation partition folder does not have enough site files.
    """
    if keys.NODE_DATA_PATH in node_config or keys.NODE_PARTITION_ID not in node_config:
        for key in (keys.NODE_DATA_PATH, keys.NODE_CACHE_DIR):
            if not str(node_config.get(key, "")).strip():
                raise ConfigError(f"node-config key {key!r} is missing; start the SuperNode with {NODE_CONFIG_FLAG}")
        manifest = Path(str(node_config[keys.NODE_DATA_PATH])).expanduser()
        if not manifest.is_file():
            raise ConfigError(f"node-config data-path {manifest} does not exist; point it at this site's manifest CSV (from fedpd partition)")
        name = str(node_config.get(keys.NODE_SITE_NAME) or manifest.stem)
        # a stable per-site seed offset, so sites never share sampler/augmentation draws
        index = int(node_config.get(keys.NODE_SITE_INDEX, zlib.crc32(name.encode()) % 100_000))
        return Site(name=name, index=index, manifest=manifest,
                    cache_dir=Path(str(node_config[keys.NODE_CACHE_DIR])).expanduser())
    pid = int(node_config[keys.NODE_PARTITION_ID])
    if not cfg.partition_dir:
        raise ConfigError("simulation node without data-path: set run-config partition-dir to a folder from fedpd partition")
    files = sorted((Path(cfg.partition_dir) / "sites").glob("*.csv"))
    expected = node_config.get(keys.NODE_NUM_PARTITIONS)
    if expected is not None and int(expected) != len(files):
        raise ConfigError(f"the simulation has {expected} virtual SuperNodes but {cfg.partition_dir}/sites holds "
                          f"{len(files)} site file(s); run it with num-supernodes={len(files)}")
    if pid < 0 or pid >= len(files):
        raise ConfigError(f"partition-id {pid} but {cfg.partition_dir}/sites holds {len(files)} site file(s); run the simulation with num-supernodes={len(files)}")
    manifest = files[pid]
    return Site(name=manifest.stem, index=pid, manifest=manifest, cache_dir=Path(cfg.partition_dir) / "cache" / manifest.stem)

"""Is the phantom's PD signal learnable by the real pipeline at demo size? One effect, one seed, one line.

Generates a demo-sized phantom (120 subjects, 3 sites, 48^3 voxels of 4 mm) with ``--effect`` and
``--seed`` into a temporary folder, ingests it, splits it by subject (val 0.15, test 0.15), then trains
Med3D resnet_10 CENTRALIZED on all train rows with the federated code path (``make_model``,
``train_loader`` with the class-balancing sampler and augmentation, ``train_local``) and the demo's
run-config (input 48^3 at 4 mm, batch 8, lr 0.0001, pyproject defaults otherwise), one epoch at a time
for ``--epochs`` epochs. The epoch with the highest validation AUC is selected, the threshold is chosen
on validation (Youden), and test is evaluated once with subject-level bootstrap CIs.

``--proxy`` skips the CNN: logistic regression on the cached pipeline tensors (z-scored 48^3, mean-pooled
to ``--pool``^3) with 5-fold subject-grouped CV over all PD/Control scans -- a cheap screen of the
phantom's constants. ``--shrink/--ventricle/--darken`` override the phantom's PD constants for a
screening run (the line says so).

    .venv/bin/python benchmarks/phantom_signal.py --effect 1 --seed 0 --epochs 12
    .venv/bin/python benchmarks/phantom_signal.py --effect 0 --seed 0 --proxy

Synthetic data: never a clinical result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common.cohort.ingest import ingest
from common.cohort.manifest import read_manifest
from common.cohort.splits import split_manifest
from common.config import RunConfig
from common.device import runtime
from common.learning.metrics import best_threshold, bootstrap_ci
from common.learning.model import make_model
from common.learning.train import evaluate_rows, train_loader, train_local
from simulation import phantom

DEMO_COHORT = {"subjects": 120, "sites": 3, "shape": 48}
DEMO_RUN_CONFIG = {"input-shape": "48,48,48", "spacing": "4.0,4.0,4.0", "batch-size": 8, "lr": 0.0001,
                   "class-balancing": "sampler"}


def prepare(root: Path, effect: float, seed: int, val: float, test: float):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # no progress bars
        phantom.generate_phantom(root / "dl", effect=effect, seed=seed, **DEMO_COHORT)
        ingest(root / "dl", csv=root / "dl" / "idaSearch.csv", sites_csv=root / "dl" / "centres.csv",
               out=root / "manifest.csv")
        split_manifest(root / "manifest.csv", val=val, test=test, seed=seed)
    return read_manifest(root / "manifest.csv", require_split=True)


def proxy_auc(rows, cfg: RunConfig, pool: int, seed: int) -> float:
    """Grouped-CV AUC of a logistic regression on the pipeline's deterministic tensors, pooled to pool^3."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from common.learning.transforms import deterministic_transforms

    tf = deterministic_transforms(cfg.input_shape, cfg.spacing)
    x = []
    for path in rows["path"]:
        img = tf({"image": path})["image"][None]  # [1,1,D,H,W]
        x.append(torch.nn.functional.adaptive_avg_pool3d(img, pool).ravel().numpy())
    x, y = np.stack(x), rows["label"].astype(int).to_numpy()
    groups = rows["subject_id"].astype(str).to_numpy()
    score = np.zeros(len(y))
    for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(x, y, groups):
        m = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=5000, class_weight="balanced"))
        score[te] = m.fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
    return float(roc_auc_score(y, score))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--effect", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--val", type=float, default=0.15)
    p.add_argument("--test", type=float, default=0.15)
    p.add_argument("--proxy", action="store_true", help="logistic-regression screen instead of the CNN")
    p.add_argument("--pool", type=int, default=16, help="--proxy: pooled edge in voxels")
    p.add_argument("--shrink", type=float, default=None, help="screening: override phantom.PD_SHRINK")
    p.add_argument("--ventricle", type=float, default=None, help="screening: override phantom.PD_VENTRICLE")
    p.add_argument("--darken", type=float, default=None, help="screening: override phantom.PD_DARKEN")
    a = p.parse_args()
    for name, v in (("PD_SHRINK", a.shrink), ("PD_VENTRICLE", a.ventricle), ("PD_DARKEN", a.darken)):
        if v is not None:
            setattr(phantom, name, v)
    consts = f"shrink {phantom.PD_SHRINK:g} ventricle {phantom.PD_VENTRICLE:g} darken {phantom.PD_DARKEN:g}"
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    cfg = RunConfig.from_mapping({**DEMO_RUN_CONFIG, "seed": a.seed})
    rt = runtime(amp=cfg.amp)
    with tempfile.TemporaryDirectory(prefix="phantom_signal_") as tmp:
        root = Path(tmp)
        rows = prepare(root, a.effect, a.seed, a.val, a.test)
        if a.proxy:
            auc = proxy_auc(rows, cfg, a.pool, a.seed)
            print(f"proxy effect {a.effect:g} seed {a.seed} ({consts}): logistic regression on pipeline tensors "
                  f"pooled to {a.pool}^3, 5-fold subject-grouped CV AUC {auc:.3f} over {len(rows)} scans; "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            return
        train, val, test = (rows[rows["split"] == s].reset_index(drop=True) for s in ("train", "val", "test"))
        cache = root / "cache"
        model = make_model(cfg)
        best = (-1.0, -1, None)
        for epoch in range(a.epochs):
            loader, _, weights = train_loader(train, cfg, cache, seed=cfg.seed + 1000 * (epoch + 1))
            res = train_local(model, loader, epochs=1, lr=cfg.lr, weight_decay=cfg.weight_decay, rt=rt,
                              class_weights=weights)
            v = evaluate_rows(model, val, cfg, rt, cache)
            auc = float(roc_auc_score(v.y_true, v.y_score))
            print(f"  epoch {epoch + 1}: train loss {res.loss:.3f}, val loss {v.loss:.3f}, val AUC {auc:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if auc > best[0]:
                best = (auc, epoch + 1, copy.deepcopy(model.state_dict()))
        model.load_state_dict(best[2])
        v = evaluate_rows(model, val, cfg, rt, cache)
        threshold = float(best_threshold(v.y_true, v.y_score))
        t = evaluate_rows(model, test, cfg, rt, cache)  # the one look at test
        ci = bootstrap_ci(t.y_true, t.y_score, test["subject_id"].astype(str).to_numpy(), threshold=threshold,
                          n_boot=1000, seed=a.seed)["auc"]
        lo, hi = ci["ci95"]
        n_sub = test.groupby("label")["subject_id"].nunique().to_dict()
        print(f"effect {a.effect:g} seed {a.seed} ({consts}): val AUC {best[0]:.3f} (epoch {best[1]}/{a.epochs}), "
              f"test AUC {ci['value']:.3f} [95% CI {lo:.3f}-{hi:.3f}] ({len(test)} scans, {n_sub.get(1, 0)} PD / "
              f"{n_sub.get(0, 0)} control subjects), {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""``fedpd preprocess`` on every real scan of a folder, at the 2 mm and 1 mm templates: one markdown table.

Per scan: grid, voxel size, verdict (status and reason), QC figures and seconds per scan (one worker, one
SimpleITK thread, as ``fedpd preprocess`` runs each scan). Provenance and licences of the default folder are
in ``../shared/realmri/README.md``.

    .venv/bin/python benchmarks/realmri_table.py --out /tmp/realmri   # default folder ../shared/realmri
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.preprocessing.pipeline import preprocess_manifest  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "realmri"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=REAL)
    ap.add_argument("--out", type=Path, required=True, help="a new folder for the preprocessing outputs")
    ap.add_argument("--template-mm", type=int, nargs="+", default=[2, 1])
    a = ap.parse_args(argv)
    files = sorted(a.real.glob("*.nii*"))
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": f"R{k}", "subject_id": f"S{k}", "visit": "BL", "label": 0, "site": "real", "path": str(f)}
            for k, f in enumerate(files)]
    pd.DataFrame(rows).to_csv(a.out / "manifest.csv", index=False)
    qcs = {mm: preprocess_manifest(a.out / "manifest.csv", a.out / f"mni{mm}", template_mm=mm, workers=1,
                                   progress=False).set_index("image_id") for mm in a.template_mm}
    mms = a.template_mm
    head = ["scan", "grid", "voxel mm", "verdict"] + [f"corr {mm} mm" for mm in mms] + ["scale"] + \
        [f"s/scan {mm} mm" for mm in mms]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row, f in zip(rows, files):
        img = nib.load(str(f))
        vox = np.linalg.norm(img.affine[:3, :3], axis=0)
        q = {mm: qcs[mm].loc[row["image_id"]] for mm in mms}
        first = q[mms[0]]
        verdict = "kept" if first["status"] == "ok" else f"excluded: {first['reason'].split(';')[0]}"
        if any(q[mm]["status"] != first["status"] for mm in mms):
            verdict += " (" + ", ".join(f"{mm} mm: {q[mm]['status']}" for mm in mms) + ")"
        cells = [f.name.split(".nii")[0], "x".join(str(n) for n in img.shape[:3]), "x".join(f"{v:.2f}" for v in vox),
                 verdict] + ["" if pd.isna(q[mm]["correlation"]) else f"{q[mm]['correlation']:.3f}" for mm in mms] + \
                [("" if pd.isna(first["scale"]) else f"{first['scale']:.3f}")] + [f"{q[mm]['seconds']:.1f}" for mm in mms]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

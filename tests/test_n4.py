"""N4 removes a known bias field (benchmarks/n4_bias.py at 3 mm, N4 alone, the true transform; ~15 s).

The template-derived head with skull, scalp and neck is written in LPS, PIR and ILA voxel orders (3 x 3 x 3.6 mm)
times a +-20 % field; the slope of log(N4 output / template) on log(bias) over the template's white matter must be
~1 without N4 and <= 0.3 with it, for a linear and a coil-like field. The quadratic field is not asserted: N4 at
fedpd's settings leaves 0.56-0.63 there (EXPERIMENTS.md "N4 and a known bias"); settings that left 0.37-0.41
(8 mm grid, 50 iterations per level, all run) misregistered a strongly biased 4 mm test head, so they were not
adopted. The quadratic case is printed for the record.
"""

import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.n4_bias import ORIENTATIONS, bias_slope, oriented_scan, run_n4_only, wm_mask  # noqa: E402
from benchmarks.preprocess import synthetic_head  # noqa: E402
from common.preprocessing.registration import load_template  # noqa: E402

MM = 3


@pytest.fixture(scope="module")
def setup():
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    template = load_template(MM)
    head, _ = synthetic_head(MM)
    return template, head, wm_mask(template)


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_n4_removes_bias(setup, orientation, tmp_path):
    template, head, wm = setup
    kw = dict(slice_mm=1.2 * MM, inplane_mm=MM)
    for k, bias in enumerate(("linear", "coil", "quadratic")):
        path = tmp_path / f"{bias}.nii.gz"
        truth, field = oriented_scan(head, path, orientation, bias, seed=k, **kw)
        to_native = truth.GetInverse()
        without = bias_slope(run_n4_only(path, truth, template, False), field, to_native, template, wm)
        with_n4 = bias_slope(run_n4_only(path, truth, template, True), field, to_native, template, wm)
        print(orientation, bias, round(without, 3), round(with_n4, 3))
        assert 0.85 < without < 1.15, (bias, without)
        if bias != "quadratic":
            assert with_n4 <= 0.3, (bias, with_n4)

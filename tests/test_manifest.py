"""The manifest contract: read/write round trip and every validation rule (common/cohort/manifest.py)."""

from pathlib import Path

import pandas as pd
import pytest

from common.errors import DataError
from common.cohort.manifest import (REQUIRED_COLUMNS, SPLITS, read_manifest, validate_manifest,
                             write_manifest)

try:
    from data_factory import make_manifest, write_nifti
except ImportError:  # tests/ imported as a package
    from tests.data_factory import make_manifest, write_nifti


def _rows(**over):
    df = pd.DataFrame({"image_id": ["I1", "I2", "I3"], "subject_id": ["0012", "0012", "0340"],
                       "visit": ["BL", "V04", "BL"], "label": [1, 1, 0], "site": ["10", "10", "11"],
                       "path": ["a.nii.gz", "b.nii.gz", "c.nii.gz"]})
    for k, v in over.items():
        df[k] = v
    return df


def test_round_trip_keeps_ids_and_resolves_paths(tmp_path):
    write_nifti(tmp_path / "img" / "a.nii.gz")
    df = _rows(path=[str(tmp_path / "img" / "a.nii.gz"), "/elsewhere/b.nii.gz", "img/c.nii.gz"], sex="F", age=61.5)
    out = write_manifest(df, tmp_path / "m.csv")
    text = out.read_text()
    assert "img/a.nii.gz" in text and str(tmp_path) not in text  # relative under the manifest's folder
    assert "/elsewhere/b.nii.gz" in text
    back = read_manifest(tmp_path / "m.csv")
    assert list(back.columns[:6]) == list(REQUIRED_COLUMNS)
    assert back["subject_id"].tolist() == ["0012", "0012", "0340"]  # text ids keep their zeros
    assert back["label"].tolist() == [1, 1, 0] and str(back["label"].dtype).startswith("int")
    assert back["path"][0] == str(tmp_path.resolve() / "img" / "a.nii.gz")
    assert back["path"][2] == str(tmp_path.resolve() / "img" / "c.nii.gz")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_missing_column_is_named_with_the_required_list():
    with pytest.raises(DataError) as err:
        validate_manifest(_rows().drop(columns=["site"]), "m.csv")
    msg = str(err.value)
    assert "m.csv" in msg and "missing required column(s) site" in msg and ", ".join(REQUIRED_COLUMNS) in msg


def test_duplicate_image_id_lists_ids_and_lines():
    with pytest.raises(DataError) as err:
        validate_manifest(_rows(image_id=["I1", "I2", "I1"]), "m.csv")
    assert "duplicate image_id I1 (lines 2, 4)" in str(err.value)


@pytest.mark.parametrize("bad,shown", [(2, "2"), ("PD", "'PD'"), (-1, "-1"), (None, "(empty)"), (0.5, "0.5")])
def test_bad_label_names_line_and_value(bad, shown):
    with pytest.raises(DataError) as err:
        validate_manifest(_rows(label=[1, 1, bad]), "m.csv")
    msg = str(err.value)
    assert "m.csv" in msg and f"line 4: {shown}" in msg and "0 (control) or 1 (PD)" in msg


def test_labels_as_text_or_float_are_accepted(tmp_path):
    validate_manifest(_rows(label=["1", "1", "0"]), "m.csv")
    validate_manifest(_rows(label=[1.0, 1.0, 0.0]), "m.csv")


@pytest.mark.parametrize("col", ["subject_id", "site", "image_id", "path"])
def test_empty_key_columns_are_rejected(col):
    df = _rows()
    df.loc[1, col] = " "
    with pytest.raises(DataError, match=rf"empty {col} on line\(s\) 3"):
        validate_manifest(df, "m.csv")


def test_subject_in_two_splits_is_named():
    with pytest.raises(DataError) as err:
        validate_manifest(_rows(split=["train", "test", "val"]), "m.csv", require_split=True)
    msg = str(err.value)
    assert "0012 (test/train)" in msg and "different splits" in msg and "subjects shared across splits" in msg


def test_split_rules():
    with pytest.raises(DataError, match="no split column; run `fedpd split"):
        validate_manifest(_rows(), "m.csv", require_split=True)
    with pytest.raises(DataError, match="split must be one of train, val, test; bad values at line 4: 'holdout'"):
        validate_manifest(_rows(split=["train", "train", "holdout"]), "m.csv")
    with pytest.raises(DataError, match=r"empty split on line\(s\) 4"):
        validate_manifest(_rows(split=["train", "train", None]), "m.csv", require_split=True)
    validate_manifest(_rows(split=[None, None, None]), "m.csv")  # an unfilled split column is fine before `split`
    assert SPLITS == ("train", "val", "test")


def test_subject_with_two_labels_or_two_sites():
    with pytest.raises(DataError, match=r"different labels: 0012 \(0/1\)"):
        validate_manifest(_rows(label=[1, 0, 0]), "m.csv")
    with pytest.raises(DataError, match=r"different sites: 0012 \(10/12\)"):
        validate_manifest(_rows(site=["10", "12", "11"]), "m.csv")


def test_read_missing_file_and_write_unwritable(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError) as err:
        write_manifest(_rows(), tmp_path / "file.txt" / "m.csv")
    assert str(tmp_path / "file.txt") in str(err.value)


def test_extra_columns_survive_a_round_trip(tmp_path):
    df = make_manifest({(1, "A"): 2, (0, "A"): 1})
    df["origin_site"] = "X"
    write_manifest(df, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv")
    assert back["origin_site"].eq("X").all() and Path(back["path"][0]).is_absolute()

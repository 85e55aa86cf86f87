"""The run folder (``common/runs/rundir.py``): self-describing checkpoints written atomically, clear errors for
files that are not fedpd checkpoints, ``rounds.jsonl`` bookkeeping, and round selection on validation.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.errors import CheckpointError, ConfigError, DataError
from common.files import atomic_write_text
from common.runs.records import REPORT_SCHEMA, ROUNDS_SCHEMA, RoundRecord, RunReport, load_report
from common.runs.rundir import CHECKPOINT_FORMAT, RunDir, dumps, select_round


def small_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3, 3)).astype(np.float32),
        "bn.running_var": rng.random(4).astype(np.float32) + 0.1,
        "bn.num_batches_tracked": np.asarray(7, dtype=np.int64),
    }


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path / "run").prepare()


@pytest.fixture
def cfg_dict():
    return RunConfig.from_mapping({"input-shape": "16,16,16", "out-dir": "/tmp/x"}).to_dict()


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trip(run, cfg_dict):
    state = small_state()
    metrics = {"round": 3, "val": {"auc": 0.75, "loss": np.float64(0.5), "n": np.int64(12), "ece": float("nan")}}
    path = run.save_checkpoint(3, state, config=cfg_dict, metrics=metrics, model={"depth": 10, "num_classes": 2},
                               strategy={"name": "fedavg", "round": 3})
    assert path == run.checkpoint_path(3) == run.root / "checkpoints" / "round-3.pt"

    # a plain weights_only load works: nothing in the payload needs pickle's arbitrary classes
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT

    ckpt = RunDir.load_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["round"] == 3
    assert set(ckpt["state_dict"]) == set(state)
    for k, v in state.items():
        assert isinstance(ckpt["state_dict"][k], torch.Tensor)
        np.testing.assert_array_equal(ckpt["state_dict"][k].numpy(), v)
        assert ckpt["state_dict"][k].numpy().dtype == v.dtype
    assert ckpt["config"] == cfg_dict
    assert RunConfig.from_mapping(ckpt["config"], defaults={}).input_shape == (16, 16, 16)
    assert ckpt["model"] == {"depth": 10, "num_classes": 2}
    assert ckpt["strategy"] == {"name": "fedavg", "round": 3}
    # metrics are stored as plain JSON values: numpy scalars converted, NaN as None
    assert ckpt["metrics"] == {"round": 3, "val": {"auc": 0.75, "loss": 0.5, "n": 12, "ece": None}}
    assert type(ckpt["metrics"]["val"]["n"]) is int
    assert isinstance(ckpt["git_commit"], str) and ckpt["git_commit"]


def test_checkpoint_files_atomic_and_readable(run, cfg_dict):
    for r in (1, 2, 2):  # saving the same round twice replaces it
        run.save_checkpoint(r, small_state(r), config=cfg_dict, metrics={}, model={"depth": 10})
    files = sorted(p.name for p in run.checkpoints.iterdir())
    assert files == ["round-1.pt", "round-2.pt"]  # no leftover .tmp files
    assert not list(run.root.rglob("*.tmp"))
    for p in run.checkpoints.iterdir():
        assert mode(p) == 0o644
    assert run.saved_rounds() == [1, 2]


def test_saved_rounds_ignores_other_files(run, cfg_dict):
    for r in (10, 2):
        run.save_checkpoint(r, small_state(), config=cfg_dict, metrics={}, model={})
    (run.checkpoints / "round-best.pt").write_bytes(b"x")
    (run.checkpoints / ".round-11.pt.abc.tmp").write_bytes(b"x")
    assert run.saved_rounds() == [2, 10]  # numeric order, not string order


def test_load_checkpoint_missing_file(run):
    with pytest.raises(CheckpointError, match="no such checkpoint file") as exc:
        RunDir.load_checkpoint(run.checkpoint_path(4))
    assert "round-4.pt" in str(exc.value)


def test_load_checkpoint_truncated_file(run, cfg_dict):
    path = run.save_checkpoint(1, small_state(), config=cfg_dict, metrics={}, model={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as exc:
        RunDir.load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_load_checkpoint_garbage_file(tmp_path):
    path = tmp_path / "round-1.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable fedpd checkpoint"):
        RunDir.load_checkpoint(path)


def test_load_checkpoint_medicalnet_file_has_no_format(tmp_path):
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(2, 1, 7, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="not a fedpd run checkpoint") as exc:
        RunDir.load_checkpoint(path)
    msg = str(exc.value)
    assert str(path) in msg and CHECKPOINT_FORMAT in msg and "pretrained-path" in msg


def test_load_checkpoint_bare_tensor_dict(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a fedpd run checkpoint"):
        RunDir.load_checkpoint(path)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# --- rounds.jsonl ------------------------------------------------------------------------------


def test_append_read_truncate_rounds(run):
    assert run.read_rounds() == []
    for r in (1, 2, 3, 4):
        run.append_round(RoundRecord.from_dict({"round": r, "val": {"auc": r / 10, "loss": float("nan")}}))
    lines = run.rounds_file.read_text().splitlines()
    assert len(lines) == 4
    assert all("NaN" not in line for line in lines)
    for line in lines:
        json.loads(line)  # strict JSON, one object per line
    records = run.read_rounds()
    assert [r.round for r in records] == [1, 2, 3, 4]
    assert records[0].val["auc"] == 0.1 and records[0].val["loss"] is None  # NaN is written as null
    assert records[0].schema == ROUNDS_SCHEMA and '"schema": 1' in lines[0]

    kept = run.truncate_rounds(2)
    assert [r.round for r in kept] == [1, 2]
    assert [r.round for r in run.read_rounds()] == [1, 2]
    assert mode(run.rounds_file) == 0o644
    assert not list(run.root.glob(".*.tmp"))

    run.append_round(RoundRecord(round=3, val={}))  # appending after a truncation continues the file
    assert [r.round for r in run.read_rounds()] == [1, 2, 3]
    assert run.truncate_rounds(0) == []
    assert run.read_rounds() == []


@pytest.mark.parametrize("losses, kept_after", [
    # the lowest validation loss so far and the last round stay, whatever came before
    ([0.9, 0.5, 0.7, 0.4, 0.6], [[1], [2], [2, 3], [4], [4, 5]]),
    # no validation figure yet (a one-class or empty validation split): nothing to select by, nothing deleted
    ([None, None, 0.8], [[1], [1, 2], [3]]),
])
def test_keep_selected_and_last(run, cfg_dict, losses, kept_after):
    """keep-checkpoints = selected-and-last (common.runs.rounds): after each round's checkpoint lands, the
    other rounds' go, except the one select_round picks from the records so far, which finalize then loads."""
    from common.runs.rounds import _keep_selected_and_last

    for g, loss in enumerate(losses, 1):
        val = {"loss": loss, "auc": None} if loss is not None else {}
        run.append_round(RoundRecord.from_dict({"round": g, "val": val}))
        run.save_checkpoint(g, small_state(g), config=cfg_dict, metrics={"round": g}, model={"depth": 10})
        _keep_selected_and_last(run, g)
        assert run.saved_rounds() == kept_after[g - 1]
    selected = select_round(run.read_rounds())
    assert selected == min((loss, g) for g, loss in enumerate(losses, 1) if loss is not None)[1]
    assert RunDir.load_checkpoint(run.checkpoint_path(selected))["round"] == selected  # what finalize loads


def test_keep_checkpoints_is_a_choice():
    with pytest.raises(ConfigError, match="keep-checkpoints.*all.*selected-and-last"):
        RunConfig.from_mapping({"keep-checkpoints": "best"})


def test_read_rounds_skips_blank_lines(run):
    run.rounds_file.write_text('{"round": 1}\n\n{"round": 2}\n')
    assert [r.round for r in run.read_rounds()] == [1, 2]


def test_rounds_written_before_the_schema_still_load(run):
    """A line as fedpd wrote it before rounds.jsonl had a schema (no "schema" key, no site_qc)."""
    old = {"round": 1, "train_loss": 0.61, "num_examples": 12, "sites": {"A": {"num-examples": 12, "train-loss": 0.61}},
           "site_eval": {}, "missing_sites": [], "failures": [], "rejected": [],
           "val": {"n": 6, "accuracy": 0.5, "balanced_accuracy": 0.5, "sensitivity": 1.0, "specificity": 0.0,
                   "auc": None, "loss": 0.69}, "wall_seconds": 3.2}
    run.rounds_file.write_text(json.dumps(old) + "\n")
    (rec,) = run.read_rounds()
    assert rec.round == 1 and rec.schema == 1 and rec.sites == old["sites"] and rec.val["auc"] is None
    assert rec.site_qc == {} and "site_qc" not in rec.to_dict()
    assert {k: v for k, v in rec.to_dict().items() if k != "schema"} == old  # nothing lost or invented


@pytest.mark.parametrize("line, needle", [
    ("[1, 2]", "must be a JSON object"),
    ('{"round": "1"}', "integer 'round'"),
    ('{"round": 1, "colour": "red"}', "unknown key(s) in a round record: colour"),
    ('{"round": 1, "schema": 99}', "newer than this fedpd"),
    ('{"round": 1', "not JSON"),
])
def test_a_bad_round_line_is_named_with_file_and_line(run, line, needle):
    run.rounds_file.write_text('{"round": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(needle)) as err:
        run.read_rounds()
    assert f"{run.rounds_file}:2" in str(err.value)


def test_write_json_and_atomic_write_text(run):
    path = run.write_json("report.json", {"a": float("nan"), "b": np.int64(2), "c": [np.float32(0.5)]})
    assert json.loads(path.read_text()) == {"a": None, "b": 2, "c": [0.5]}
    assert mode(path) == 0o644
    target = run.root / "sub" / "x.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello" and mode(target) == 0o644
    assert not list(run.root.rglob("*.tmp"))


def test_prepare_unwritable_folder_names_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="out-dir"):
        RunDir(blocker / "run").prepare()


# --- dumps -------------------------------------------------------------------------------------


def test_dumps_writes_nan_and_inf_as_null():
    text = dumps({"nan": float("nan"), "inf": float("inf"), "np": np.float64("nan"),
                  "nested": [1, {"x": -math.inf}], "ok": 0.25, "arr": np.array([1.0, np.nan])})
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nan": None, "inf": None, "np": None, "nested": [1, {"x": None}], "ok": 0.25,
                                "arr": [1.0, None]}


def test_dumps_rejects_unknown_types():
    with pytest.raises(TypeError, match="not JSON serialisable"):
        dumps({"x": object()})


# --- select_round ------------------------------------------------------------------------------


def rec(round_, auc, loss=0.5):
    return RoundRecord(round=round_, val={"auc": auc, "loss": loss})


def recs(*dicts):
    return [RoundRecord.from_dict(d) for d in dicts]


def test_select_round_lowest_val_loss_by_default():
    assert select_round([rec(1, 0.9, loss=0.6), rec(2, 0.7, loss=0.3), rec(3, 0.95, loss=0.5)]) == 2


def test_select_round_a_lucky_early_auc_does_not_win():
    """The demo-size case that changed the rule: an early round with near-constant scores ranked 9 control
    scans almost perfectly (AUC 0.98), a later, learned model had AUC 0.93 and a lower loss."""
    records = [rec(1, 0.746, 0.608), rec(2, 0.976, 0.482), rec(3, 0.966, 0.654), rec(6, 0.934, 0.365),
               rec(7, 0.939, 2.508)]
    assert select_round(records) == 6
    assert select_round(records, by="auc") == 2


def test_select_round_loss_tie_goes_to_higher_auc_then_earlier_round():
    assert select_round([rec(1, 0.7, loss=0.4), rec(2, 0.8, loss=0.4), rec(3, 0.6, loss=0.9)]) == 2
    assert select_round([rec(3, 0.8, 0.5), rec(1, 0.8, 0.5), rec(2, 0.8, 0.5)]) == 1
    assert select_round([rec(1, None, 0.5), rec(2, 0.6, 0.5)]) == 2


@pytest.mark.parametrize("missing", [float("nan"), None])
def test_select_round_nan_or_none_loss_never_wins(missing):
    assert select_round([rec(1, 0.99, loss=missing), rec(2, 0.6, loss=0.9)]) == 2


def test_select_round_by_auc_tie_goes_to_lower_val_loss_then_earlier_round():
    assert select_round([rec(1, 0.8, loss=0.7), rec(2, 0.8, loss=0.4), rec(3, 0.8, loss=0.6)], by="auc") == 2
    assert select_round([rec(3, 0.8, 0.5), rec(1, 0.8, 0.5), rec(2, 0.8, 0.5)], by="auc") == 1
    assert select_round([rec(1, 0.8, loss=float("nan")), rec(2, 0.8, loss=0.9)], by="auc") == 2


@pytest.mark.parametrize("missing", [float("nan"), None])
def test_select_round_by_auc_nan_or_none_auc_never_wins(missing):
    records = [rec(1, missing, loss=0.01), rec(2, 0.51, loss=5.0), rec(3, missing, loss=0.001)]
    assert select_round(records, by="auc") == 2


def test_select_round_after_json_round_trip(run):
    """rounds.jsonl stores NaN as null; selection must still skip it."""
    for r in (rec(1, 0.9, float("nan")), rec(2, 0.55, 0.9), rec(3, 0.7, 0.8)):
        run.append_round(r)
    assert run.read_rounds()[0].val["loss"] is None
    assert select_round(run.read_rounds()) == 3


def test_select_round_other_metric():
    records = recs({"round": 1, "val": {"auc": 0.9, "balanced_accuracy": 0.5, "loss": 0.5}},
                   {"round": 2, "val": {"auc": 0.6, "balanced_accuracy": 0.7, "loss": 0.5}})
    assert select_round(records, by="balanced_accuracy") == 2


def test_select_round_empty_raises():
    with pytest.raises(ValueError, match="no round has a validation auc or loss"):
        select_round([])
    with pytest.raises(ValueError, match="no round has"):
        select_round(recs({"round": 1}, {"round": 2, "val": {}}))


def test_select_round_falls_back_to_the_other_criterion_with_warning():
    records = recs({"round": 1, "val": {"auc": None, "loss": 0.7}}, {"round": 2, "val": {"auc": float("nan"), "loss": 0.6}})
    with pytest.warns(RuntimeWarning, match="undefined in every round"):
        assert select_round(records, by="auc") == 2
    records = recs({"round": 1, "val": {"auc": 0.7, "loss": None}}, {"round": 2, "val": {"auc": 0.6, "loss": float("nan")}})
    with pytest.warns(RuntimeWarning, match="undefined in every round"):
        assert select_round(records) == 1


# --- report.json: RunReport -------------------------------------------------------------------------------

PRE_SCHEMA = Path(__file__).parent / "fixtures" / "run-pre-schema"


def test_a_report_written_before_the_schema_loads_renders_and_round_trips(tmp_path):
    """A run folder written by fedpd before report.json had a schema (tests/fixtures/run-pre-schema) loads as
    schema 1, writes back the same keys and values plus the version, and renders with every section."""
    from common.report.render import render_report

    raw = json.loads((PRE_SCHEMA / "report.json").read_text())
    assert "schema" not in raw
    report = load_report(PRE_SCHEMA / "report.json")
    assert report.schema == REPORT_SCHEMA == 1
    assert report.to_dict() == raw | {"schema": 1}
    assert list(report.to_dict())[:len(raw)] == list(raw)  # same key order: the file reads the same
    assert report.source == "phantom" and report.arm == raw["arm"] and report.threshold == raw["threshold"]
    assert report.participation == raw["participation"] and report.held_out_site is None
    assert RunReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report

    run = tmp_path / "old"
    shutil.copytree(PRE_SCHEMA, run)
    page = render_report(run, saliency_scans=0).read_text()
    assert 'class="error"' not in page  # no section failed
    assert "PHANTOM DATA" in page and raw["arm"] in page


@pytest.mark.parametrize("change, needle", [
    ({"schema": 2}, "newer than this fedpd reads (1)"),
    ({"schema": "1"}, "schema '1'"),
    ({"surprise": 1}, "unknown key(s) in a run report: surprise"),
    ({"test": [0.9]}, "'test' must be an object, got list"),
])
def test_a_bad_report_is_named_with_its_file(tmp_path, change, needle):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(json.loads((PRE_SCHEMA / "report.json").read_text()) | change))
    with pytest.raises(DataError) as info:
        load_report(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_a_partial_report_takes_defaults_and_a_missing_one_says_what_to_do(tmp_path):
    report = RunReport.from_dict({"test": {"auc": {"value": 0.9}}})
    assert report.arm == "run" and report.source == "unknown" and report.threshold is None and report.config == {}
    assert "participation" not in report.to_dict() and report.to_dict()["schema"] == REPORT_SCHEMA
    assert RunReport.from_dict({"data": {"partition": {"holdout_site": "20"}}}).held_out_site == "20"
    with pytest.raises(DataError, match="no such file; a run folder gets its report.json"):
        load_report(tmp_path / "report.json")
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="holds a list, not a run report object"):
        load_report(tmp_path / "report.json")


def test_received_bytes_round_trips_and_is_left_out_when_unknown(run):
    """Federated rounds record the bytes the server received from the sites; baseline arms have none, and
    their lines carry no such key."""
    run.append_round(RoundRecord(round=1, val={"auc": 0.5}, received_bytes=172_400_000))
    run.append_round(RoundRecord(round=2, val={"auc": 0.5}))
    first, second = run.read_rounds()
    assert first.received_bytes == 172_400_000 and first.to_dict()["received_bytes"] == 172_400_000
    assert second.received_bytes is None and "received_bytes" not in second.to_dict()
    assert "received_bytes" not in json.loads(run.rounds_file.read_text().splitlines()[1])

"""Units of the Flower app, with the real flwr record/message classes and real files under tmp_path:

- FedAvg weights on uneven sites (Flower's own ``aggregate_arrayrecords``) and ``nan_aware_mean``;
- ``RecordingFedAvg`` fed with replies shaped exactly as the ClientApp builds them;
- ``client/site.py``: node-config (deployment) and partition-id (simulation) lookups;
- ``server/setup.py``: absolute paths, refusing to overwrite a run, resuming from the last checkpoint;
- ``common/keys.py``;
- the ClientApp handlers called directly on a tiny 16^3 cohort.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, validate_message_reply_consistency

from client.site import NODE_CONFIG_FLAG, Site, resolve_site
from common import keys
from common.cohort.manifest import read_manifest, write_manifest
from common.config import RunConfig
from common.device import runtime
from common.errors import ConfigError
from common.learning.model import model_args, build_med3d, state_dict_numpy
from common.runs.records import RoundRecord
from common.runs.rundir import RunDir
from server.setup import absolute, prepare
from server.strategy import RecordingFedAvg, nan_aware_mean

try:
    from data_factory import make_manifest, write_nifti
except ImportError:  # run as a package
    from tests.data_factory import make_manifest, write_nifti

torch.set_num_threads(2)

SIZES = (10, 30, 60)


# --- helpers -----------------------------------------------------------------------------------


def cohort(folder: Path, strata: dict[tuple[int, str], int], splits: tuple[str, ...], seed: int = 0) -> pd.DataFrame:
    """A manifest of one scan per subject with real 16^3 NIfTI files; splits assigned round-robin."""
    df = make_manifest(strata, visits=(1, 1), seed=seed, folder=folder / "images")
    df["split"] = [splits[i % len(splits)] for i in range(len(df))]
    for i, p in enumerate(df["path"]):
        write_nifti(Path(p), shape=(16, 16, 16), seed=seed * 100 + i)
    return df


def make_cfg(**values) -> RunConfig:
    base = {"input-shape": "16,16,16", "spacing": "1.0,1.0,1.0", "batch-size": 2, "amp": False}
    base.update(values)
    return RunConfig.from_mapping(base)


def instruction(node_id: int, content: RecordDict, message_type: str = "train") -> Message:
    """A server -> node message as the SuperLink would deliver it (explicit metadata: no running run)."""
    meta = Metadata(run_id=1, message_id=f"msg-{node_id}", src_node_id=0, dst_node_id=node_id,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=DEFAULT_TTL,
                    message_type=message_type)
    return Message(content, metadata=meta)


def site_metrics(n: int, loss: float) -> dict:
    return {keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: loss, keys.TRAIN_SECONDS: 1.0, keys.SAMPLES_PER_SECOND: n / 1.0,
            keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5,
            keys.class_count_key(0): n // 5, keys.class_count_key(1): n - n // 5}


# --- 2. aggregation weights on uneven sites ----------------------------------------------------


def test_fedavg_weights_by_num_examples_on_uneven_sites():
    values = [np.full((2, 3), v, dtype=np.float32) for v in (1.0, 2.0, 10.0)]
    records = [
        RecordDict({"arrays": ArrayRecord({"w": Array(v), "nbt": Array(np.asarray(i + 1, dtype=np.int64))}),
                    "metrics": MetricRecord({keys.NUM_EXAMPLES: n})})
        for i, (v, n) in enumerate(zip(values, SIZES))
    ]
    out = aggregate_arrayrecords(records, keys.NUM_EXAMPLES)
    w = out["w"].numpy()
    expected = (10 * 1.0 + 30 * 2.0 + 60 * 10.0) / 100  # 6.7
    np.testing.assert_allclose(w, np.full((2, 3), expected), rtol=1e-6)
    assert not np.allclose(w, np.mean([1.0, 2.0, 10.0]))  # not the plain mean (4.33)
    # the BatchNorm counter comes back as a float (FLOWER.md §1): load_state_numpy casts it back
    assert out["nbt"].numpy().dtype.kind == "f"
    assert float(out["nbt"].numpy()) == pytest.approx((10 * 1 + 30 * 2 + 60 * 3) / 100)


def test_fedavg_default_weighting_key_is_ours():
    assert FedAvg().weighted_by_key == keys.NUM_EXAMPLES == "num-examples"


def test_nan_aware_mean_leaves_out_nan_per_metric_and_sums_weights():
    records = [
        RecordDict({"metrics": MetricRecord({keys.NUM_EXAMPLES: 10, "val-auc": float("nan"), "val-loss": 1.0})}),
        RecordDict({"metrics": MetricRecord({keys.NUM_EXAMPLES: 30, "val-auc": 0.6, "val-loss": 2.0})}),
        RecordDict({"metrics": MetricRecord({keys.NUM_EXAMPLES: 60, "val-auc": 0.9, "val-loss": float("nan")})}),
    ]
    out = nan_aware_mean(records, keys.NUM_EXAMPLES)
    assert isinstance(out, MetricRecord)
    assert out["val-auc"] == pytest.approx((30 * 0.6 + 60 * 0.9) / 90)
    assert out["val-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert out[keys.NUM_EXAMPLES] == 100


def test_nan_aware_mean_skips_sites_without_examples_and_all_nan_metrics():
    records = [
        RecordDict({"metrics": MetricRecord({keys.NUM_EXAMPLES: 0, "val-auc": float("nan"), "val-n": 0.0})}),
        RecordDict({"metrics": MetricRecord({keys.NUM_EXAMPLES: 20, "val-auc": float("nan"), "val-n": 20.0})}),
    ]
    out = nan_aware_mean(records, keys.NUM_EXAMPLES)
    assert "val-auc" not in out  # no site defines it: absent, not NaN and not 0
    assert out["val-n"] == pytest.approx(20.0)
    assert out[keys.NUM_EXAMPLES] == 20


def _train_replies(sites: list[tuple[int, str, float, float]]) -> list[Message]:
    """Replies built by the ClientApp's own ``_reply`` (weights + metrics + site record)."""
    from client.handlers import _reply

    replies = []
    for node, name, value, loss in sites:
        n = SIZES[len(replies)]
        ins = instruction(node, RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}))
        site = Site(name=name, index=0, manifest=Path("/x.csv"), cache_dir=Path("/c"))
        arrays = ArrayRecord({"w": Array(np.full(4, value, dtype=np.float32))})
        replies.append(_reply(ins, site, site_metrics(n, loss), arrays))
    return replies


def test_client_reply_shape_passes_flower_consistency_check():
    replies = _train_replies([(101, "A", 1.0, 0.5), (102, "B", 2.0, 0.7)])
    for r in replies:
        assert r.metadata.src_node_id in (101, 102)
        assert set(r.content.metric_records[keys.METRICS]) == set(keys.TRAIN_METRIC_KEYS)
    validate_message_reply_consistency([r.content for r in replies], keys.NUM_EXAMPLES, check_arrayrecord=True)


def test_recording_fedavg_aggregates_by_samples_and_records_sites():
    strategy = RecordingFedAvg(round_offset=4)
    replies = _train_replies([(101, "A", 1.0, 0.5), (102, "B", 2.0, 0.7), (103, "C", 10.0, 0.9)])
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 6.7, rtol=1e-6)
    assert keys.NUM_EXAMPLES not in metrics  # Flower drops the weighting key from the train average
    assert metrics[keys.TRAIN_LOSS] == pytest.approx((10 * 0.5 + 30 * 0.7 + 60 * 0.9) / 100)
    assert set(strategy.train_sites) == {5}  # global round = offset + Flower's round
    assert set(strategy.train_sites[5]) == {"A", "B", "C"}
    assert strategy.train_sites[5]["C"][keys.NUM_EXAMPLES] == 60
    assert strategy.node_sites == {101: "A", 102: "B", 103: "C"}
    strategy.sampled[5] = [101, 102, 103, 104]
    assert strategy.missing_sites(5) == ["node-104"]


def test_recording_fedavg_evaluate_uses_nan_aware_mean():
    from client.handlers import _reply

    strategy = RecordingFedAvg()
    replies = []
    for node, n, auc in ((101, 10, float("nan")), (102, 30, 0.6), (103, 60, 0.9)):
        ins = instruction(node, RecordDict({keys.CONFIG: ConfigRecord({})}), message_type="evaluate")
        site = Site(name=f"S{node}", index=0, manifest=Path("/x.csv"), cache_dir=Path("/c"))
        metrics = {keys.NUM_EXAMPLES: n, **{keys.eval_key(m): 0.5 for m in keys.EVAL_METRICS},
               keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5, keys.EVAL_SECONDS: 0.2}
        metrics[keys.eval_key("auc")] = auc
        replies.append(_reply(ins, site, metrics))
    out = strategy.aggregate_evaluate(1, replies)
    assert out[keys.eval_key("auc")] == pytest.approx((30 * 0.6 + 60 * 0.9) / 90)
    assert out[keys.NUM_EXAMPLES] == 100
    assert set(strategy.eval_sites[1]) == {"S101", "S102", "S103"}


# --- 4. client/site.py -------------------------------------------------------------------------


@pytest.fixture
def site_csv(tmp_path) -> Path:
    df = cohort(tmp_path / "siteA", {(0, "A"): 3, (1, "A"): 3}, ("train", "train", "val"))
    return write_manifest(df, tmp_path / "siteA" / "site.csv")


def test_resolve_site_deployment(site_csv, tmp_path):
    cfg = make_cfg()
    site = resolve_site({"data-path": str(site_csv), "cache-dir": str(tmp_path / "cache")}, cfg)
    assert site.manifest == site_csv
    assert site.cache_dir == tmp_path / "cache"
    assert site.name == "site"  # the manifest's stem unless site-name is given
    assert len(site.rows("train")) == 4 and len(site.rows("val")) == 2
    assert set(site.rows("val")["split"]) == {"val"}

    named = resolve_site({"data-path": str(site_csv), "cache-dir": str(tmp_path / "c"), "site-name": "Hospital A",
                          "site-index": 3}, cfg)
    assert named.name == "Hospital A" and named.index == 3


@pytest.mark.parametrize("missing", ["data-path", "cache-dir"])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_resolve_site_missing_node_config_key(site_csv, tmp_path, missing, how):
    node_config = {"data-path": str(site_csv), "cache-dir": str(tmp_path / "cache")}
    if how == "absent":
        del node_config[missing]
    else:
        node_config[missing] = "  "
    with pytest.raises(ConfigError) as exc:
        resolve_site(node_config, make_cfg())
    msg = str(exc.value)
    assert repr(missing) in msg
    assert "--node-config" in msg and NODE_CONFIG_FLAG in msg


def test_resolve_site_empty_node_config_names_data_path():
    with pytest.raises(ConfigError, match="'data-path'.*--node-config"):
        resolve_site({}, make_cfg())


def test_resolve_site_data_path_does_not_exist(tmp_path):
    missing = tmp_path / "nope" / "site.csv"
    with pytest.raises(ConfigError, match="does not exist") as exc:
        resolve_site({"data-path": str(missing), "cache-dir": str(tmp_path / "cache")}, make_cfg())
    assert str(missing) in str(exc.value)


@pytest.fixture
def partition_dir(tmp_path) -> Path:
    part = tmp_path / "partition"
    for name in ("site-c", "site-a", "site-b"):  # created out of order on purpose
        df = cohort(part / name, {(0, name): 1, (1, name): 2}, ("train", "val"))
        write_manifest(df, part / "sites" / f"{name}.csv")
    (part / "sites" / "notes.txt").write_text("not a site")
    return part


@pytest.mark.parametrize("pid, name", [(0, "site-a"), (1, "site-b"), (2, "site-c")])
def test_resolve_site_simulation_maps_partition_id_onto_sorted_files(partition_dir, pid, name):
    cfg = make_cfg(**{"partition-dir": str(partition_dir)})
    site = resolve_site({"partition-id": pid, "num-partitions": 3}, cfg)
    assert site.name == name and site.index == pid
    assert site.manifest == partition_dir / "sites" / f"{name}.csv"
    assert site.cache_dir == partition_dir / "cache" / name
    assert set(site.rows("train")["site"]) == {name}


def test_resolve_site_simulation_partition_id_beyond_files(partition_dir):
    cfg = make_cfg(**{"partition-dir": str(partition_dir)})
    with pytest.raises(ConfigError, match="num-supernodes=3") as exc:
        resolve_site({"partition-id": 3}, cfg)
    assert "partition-id 3" in str(exc.value)
    # more virtual SuperNodes than site files, or fewer (a site that would silently never train)
    for n in (2, 4):
        with pytest.raises(ConfigError, match="num-supernodes=3"):
            resolve_site({"partition-id": 0, "num-partitions": n}, cfg)
    with pytest.raises(ConfigError, match="partition-id -1"):
        resolve_site({"partition-id": -1}, cfg)


def test_resolve_site_simulation_without_partition_dir():
    with pytest.raises(ConfigError, match="partition-dir"):
        resolve_site({"partition-id": 0, "num-partitions": 2}, make_cfg())


def test_resolve_site_data_path_wins_over_partition_id(site_csv, tmp_path, partition_dir):
    cfg = make_cfg(**{"partition-dir": str(partition_dir)})
    site = resolve_site({"partition-id": 1, "data-path": str(site_csv), "cache-dir": str(tmp_path / "c")}, cfg)
    assert site.manifest == site_csv


# --- 5. server/setup.py ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["out-dir", "server-manifest"])
def test_absolute_rejects_empty_and_relative(key):
    with pytest.raises(ConfigError, match=repr(key)) as exc:
        absolute("", key)
    assert "is empty" in str(exc.value)
    with pytest.raises(ConfigError, match=repr(key)) as exc:
        absolute("runs/demo", key)
    assert "absolute path" in str(exc.value) and "'runs/demo'" in str(exc.value)


def test_absolute_accepts_absolute(tmp_path):
    assert absolute(str(tmp_path / "x"), "out-dir") == tmp_path / "x"


@pytest.fixture
def server_csv(tmp_path) -> Path:
    df = cohort(tmp_path / "server", {(0, "A"): 2, (1, "A"): 2, (0, "B"): 2, (1, "B"): 2}, ("val", "test"))
    return write_manifest(df, tmp_path / "server" / "server.csv")


def server_cfg(server_csv: Path, out: Path, **extra) -> RunConfig:
    return make_cfg(**{"server-manifest": str(server_csv), "out-dir": str(out), **extra})


CPU = runtime(amp=False, requested="cpu")


def test_prepare_fresh_run(server_csv, tmp_path):
    out = tmp_path / "runs" / "demo"
    cfg = server_cfg(server_csv, out)
    setup = prepare(cfg, CPU)
    assert setup.start_round == 0
    assert setup.run.root == out and (out / "checkpoints").is_dir()
    assert set(setup.val_rows["split"]) == {"val"} and set(setup.test_rows["split"]) == {"test"}
    assert len(setup.val_rows) + len(setup.test_rows) == len(read_manifest(server_csv))
    assert setup.cache_dir == out / "cache" / "server"
    assert model_args(cfg) == {"depth": 10, "num_classes": 2, "dropout": cfg.dropout}
    assert (out / "config.json").is_file()
    assert setup.data_info["server_split_audit"]["total"]
    state = setup.model.state_dict()
    assert "backbone.conv1.weight" in state and "head.fc.weight" in state


@pytest.mark.parametrize("key", ["out-dir", "server-manifest"])
def test_prepare_rejects_relative_paths(server_csv, tmp_path, key):
    cfg = server_cfg(server_csv, tmp_path / "out", **{key: "relative/path"})
    with pytest.raises(ConfigError, match=repr(key)):
        prepare(cfg, CPU)


def test_prepare_needs_val_and_test_rows(tmp_path):
    df = cohort(tmp_path / "s", {(0, "A"): 2, (1, "A"): 2}, ("val",))
    csv = write_manifest(df, tmp_path / "s" / "server.csv")
    with pytest.raises(ConfigError, match="no 'test' rows"):
        prepare(server_cfg(csv, tmp_path / "out"), CPU)


@pytest.fixture(scope="module")
def med3d_state() -> dict[str, np.ndarray]:
    torch.manual_seed(123)
    return state_dict_numpy(build_med3d(depth=10))


def _finished_rounds(out: Path, cfg: RunConfig, state: dict[str, np.ndarray], saved=(1, 2), logged=(1, 2, 3)) -> RunDir:
    """A run folder as a crashed ServerApp leaves it: checkpoints for ``saved``, records for ``logged``."""
    run = RunDir(out).prepare()
    for r in saved:
        run.save_checkpoint(r, state, config=cfg.to_dict(), metrics={"round": r}, model={"depth": 10, "num_classes": 2},
                            strategy={"name": "fedavg", "round": r})
    for r in logged:
        run.append_round(RoundRecord(round=r, val={"auc": 0.5 + r / 10, "loss": 0.5}))
    return run


def test_prepare_refuses_existing_run_without_resume(server_csv, tmp_path, med3d_state):
    out = tmp_path / "out"
    cfg = server_cfg(server_csv, out)
    _finished_rounds(out, cfg, med3d_state)
    with pytest.raises(ConfigError, match="already holds a run") as exc:
        prepare(cfg, CPU)
    assert "resume=true" in str(exc.value) and "round(s) 1..2" in str(exc.value)
    assert [r.round for r in RunDir(out).read_rounds()] == [1, 2, 3]  # nothing was touched


def test_prepare_refuses_folder_with_only_rounds_log(server_csv, tmp_path):
    out = tmp_path / "out"
    RunDir(out).append_round(RoundRecord(round=1, val={}))
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare(server_cfg(server_csv, out), CPU)


def test_prepare_resume_from_last_checkpoint(server_csv, tmp_path, med3d_state):
    out = tmp_path / "out"
    cfg = server_cfg(server_csv, out, resume=True)
    _finished_rounds(out, cfg, med3d_state, saved=(1, 2), logged=(1, 2, 3))
    setup = prepare(cfg, CPU)
    assert setup.start_round == 2
    assert [r.round for r in setup.run.read_rounds()] == [1, 2]  # round 3 had no checkpoint: dropped
    initial_state = setup.model.state_dict()
    assert set(initial_state) == set(med3d_state)
    for k, v in med3d_state.items():
        t = initial_state[k]
        assert t.dtype == torch.as_tensor(v).dtype
        np.testing.assert_array_equal(t.numpy(), v)


def test_prepare_resume_on_empty_folder_starts_fresh(server_csv, tmp_path):
    setup = prepare(server_cfg(server_csv, tmp_path / "new", resume=True), CPU)
    assert setup.start_round == 0


def test_prepare_resume_with_other_model_depth(server_csv, tmp_path, med3d_state):
    out = tmp_path / "out"
    cfg = server_cfg(server_csv, out, resume=True)
    run = RunDir(out).prepare()
    run.save_checkpoint(1, {"x": np.zeros(1, dtype=np.float32)}, config=cfg.to_dict(), metrics={}, model={"depth": 18})
    with pytest.raises(ConfigError, match="model-depth 18.*says 10"):
        prepare(cfg, CPU)


# --- 6. common/keys.py -------------------------------------------------------------------------


def test_keys():
    assert keys.eval_key("balanced_accuracy") == "val-balanced-accuracy"
    assert keys.eval_key("auc") == "val-auc"
    assert keys.class_count_key(1) == "class-count-1"
    assert keys.class_count_key(np.int64(0)) == "class-count-0"
    assert keys.NUM_EXAMPLES == "num-examples"
    assert len(set(keys.TRAIN_METRIC_KEYS)) == len(keys.TRAIN_METRIC_KEYS)
    for k in keys.TRAIN_METRIC_KEYS + tuple(keys.eval_key(m) for m in keys.EVAL_METRICS):
        assert k == k.lower() and "_" not in k and " " not in k, k


# --- the ClientApp handlers on a tiny cohort ---------------------------------------------------


def _context(node_config: dict, cfg: RunConfig) -> Context:
    from flwr.app import RecordDict as State

    return Context(run_id=1, node_id=101, node_config=node_config, state=State(), run_config=cfg.to_dict())


def test_startup_seconds_is_the_process_age_for_its_first_message_only(monkeypatch):
    """Deployment starts a process per message, so each reply carries the process's start-up (interpreter,
    Flower, imports); a simulation actor answers many messages and pays it once."""
    import client.process as client_process

    monkeypatch.setattr(client_process, "_ANSWERED", False)
    age = client_process.process_age()
    assert age is not None and age > 0  # Linux /proc
    first = client_process.startup_seconds()
    assert age <= first <= age + 5
    assert client_process.startup_seconds() == 0.0


@pytest.mark.filterwarnings("ignore::common.learning.metrics.MetricUndefinedWarning")  # an untrained model may predict no PD
def test_client_handlers_reply_with_contract_keys(tmp_path, med3d_state):
    """train: num-examples = number of train rows (samples), all TRAIN_METRIC_KEYS, updated weights.
    evaluate: num-examples = val rows, every val-<metric> key; an empty val split gives the same keys."""
    from client.app import evaluate, train

    df = cohort(tmp_path / "siteA", {(0, "A"): 2, (1, "A"): 3}, ("val", "train", "train", "val", "train"))
    csv = write_manifest(df, tmp_path / "siteA" / "site.csv")
    cfg = make_cfg(**{"class-balancing": "loss", "lr": 1e-3})
    ctx = _context({"data-path": str(csv), "cache-dir": str(tmp_path / "cache")}, cfg)
    arrays = ArrayRecord({k: torch.as_tensor(v) for k, v in med3d_state.items()})  # as the server sends it

    reply = train(instruction(101, RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})})), ctx)
    metrics = reply.content[keys.METRICS]
    assert set(metrics) == set(keys.TRAIN_METRIC_KEYS)
    assert metrics[keys.NUM_EXAMPLES] == 3  # train rows, not batches (batch-size 2 -> 2 batches)
    assert metrics[keys.class_count_key(0)] + metrics[keys.class_count_key(1)] == 3
    assert math.isfinite(metrics[keys.TRAIN_LOSS])
    assert metrics[keys.SETUP_SECONDS] > 0 and metrics[keys.TRAIN_SECONDS] > 0
    assert metrics[keys.STARTUP_SECONDS] >= 0  # this process may have answered before (0), or not (its age)
    assert reply.content[keys.SITE][keys.SITE_NAME] == "site"
    new = reply.content[keys.ARRAYS]
    assert set(new) == set(med3d_state)
    assert not np.array_equal(new["backbone.conv1.weight"].numpy(), med3d_state["backbone.conv1.weight"])

    reply = evaluate(instruction(101, RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({})}), "evaluate"), ctx)
    metrics = reply.content[keys.METRICS]
    expected_keys = ({keys.NUM_EXAMPLES} | {keys.eval_key(m) for m in keys.EVAL_METRICS}
                     | {keys.STARTUP_SECONDS, keys.SETUP_SECONDS, keys.EVAL_SECONDS})
    assert set(metrics) == expected_keys
    assert metrics[keys.STARTUP_SECONDS] == 0.0  # the train message above paid this process's start-up
    assert metrics[keys.SETUP_SECONDS] > 0 and metrics[keys.EVAL_SECONDS] > 0
    assert metrics[keys.NUM_EXAMPLES] == 2  # one control + one PD val scan
    assert 0.0 <= metrics[keys.eval_key("auc")] <= 1.0
    assert keys.ARRAYS not in reply.content  # evaluation sends no weights

    only_train = df.assign(split="train")
    csv2 = write_manifest(only_train, tmp_path / "siteB" / "site.csv")
    ctx2 = _context({"data-path": str(csv2), "cache-dir": str(tmp_path / "cache2")}, cfg)
    reply = evaluate(instruction(102, RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({})}), "evaluate"), ctx2)
    metrics = reply.content[keys.METRICS]
    assert set(metrics) == expected_keys
    assert metrics[keys.NUM_EXAMPLES] == 0
    assert math.isnan(metrics[keys.eval_key("auc")])


def test_make_model_initialisation_follows_the_run_seed():
    from common.learning.model import make_model

    cfg = make_cfg()
    a, b, c = make_model(cfg), make_model(cfg), make_model(cfg.replace(seed=cfg.seed + 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values())
               if x.dtype.is_floating_point)


# --- the ClientApp under fedbn, DP, secure aggregation and the simulated attack --------------------


def _site_context(tmp_path: Path, cfg: RunConfig, extra_node_config: dict | None = None) -> Context:
    df = cohort(tmp_path / "siteA", {(0, "A"): 2, (1, "A"): 3}, ("val", "train", "train", "val", "train"))
    csv = write_manifest(df, tmp_path / "siteA" / "site.csv")
    return _context({"data-path": str(csv), "cache-dir": str(tmp_path / "cache")} | (extra_node_config or {}), cfg)


def _bn_weights(state) -> dict:
    from common.learning.model import batchnorm_keys

    model = build_med3d(depth=10, num_classes=2)
    return {k: np.asarray(state[k]) for k in batchnorm_keys(model) if k.endswith(".weight")}


def test_fedbn_site_keeps_its_own_batchnorm_between_rounds(tmp_path, med3d_state):
    """fedbn: after round 1 the site keeps every BatchNorm tensor in context.state; in round 2 it trains from
    its own BatchNorm, not the server's (here the server's BatchNorm weights are all 5)."""
    from client.app import train
    from client.handlers import SITE_BATCHNORM
    from common.learning.model import batchnorm_keys

    cfg = make_cfg(strategy="fedbn", lr=1e-3)
    ctx = _site_context(tmp_path, cfg)
    arrays = ArrayRecord({k: torch.as_tensor(v) for k, v in med3d_state.items()})
    train(instruction(101, RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: 1})})), ctx)
    kept = ctx.state[SITE_BATCHNORM].to_torch_state_dict()
    assert list(kept) == batchnorm_keys(build_med3d(depth=10, num_classes=2))
    server = {k: (np.full_like(v, 5.0) if k in _bn_weights(med3d_state) else v) for k, v in med3d_state.items()}
    reply = train(instruction(101, RecordDict({keys.ARRAYS: ArrayRecord({k: torch.as_tensor(v) for k, v in server.items()}),
                                               keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: 2})})), ctx)
    sent = reply.content[keys.ARRAYS].to_torch_state_dict()
    for k in _bn_weights(med3d_state):  # trained a few steps from the site's own (~1), far from the server's 5
        assert float((sent[k] - 5.0).abs().min()) > 1.0, k
        assert torch.allclose(sent[k], kept[k], atol=0.1), k


def test_recalibrate_batchnorm_estimates_the_rows_statistics(tmp_path):
    """The server's BatchNorm statistics under DP and secure aggregation: recalibrate_batchnorm resets every
    BatchNorm and averages it over one pass of the rows' un-augmented images, the same at every call; the
    first BatchNorm's mean and variance are those of its inputs, batch by batch."""
    from common.learning.train import eval_loader, recalibrate_batchnorm

    cfg = make_cfg()
    rows = cohort(tmp_path, {(0, "A"): 2, (1, "A"): 2}, ("val",))
    rt, cache = runtime(False), tmp_path / "cache"
    torch.manual_seed(0)
    model = build_med3d(depth=10, num_classes=2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert recalibrate_batchnorm(model, rows, cfg, rt, cache) == 4
    assert not model.training
    assert all(int(m.num_batches_tracked) == 2 for m in norms)  # 4 rows in batches of 2, counted from zero
    assert all(m.momentum == 0.1 for m in norms)  # torch's update_bn restores the momentum
    first = {k: v.clone() for k, v in model.state_dict().items()}

    seen = []
    hook = norms[0].register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].detach()))
    with torch.no_grad():
        for batch in eval_loader(rows, cfg, cache):
            model(batch["image"])
    hook.remove()
    means = torch.stack([x.mean(dim=(0, 2, 3, 4)) for x in seen]).mean(0)
    variances = torch.stack([x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1) for x in seen]).mean(0)
    assert torch.allclose(norms[0].running_mean, means, rtol=1e-4, atol=1e-6)
    assert torch.allclose(norms[0].running_var, variances, rtol=1e-4, atol=1e-6)

    recalibrate_batchnorm(model, rows, cfg, rt, cache)  # reset and re-estimated, not accumulated
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    assert recalibrate_batchnorm(model, rows.iloc[:0], cfg, rt, cache) == 0  # no rows: statistics kept
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())


def test_dp_site_sends_trained_parameters_only_and_keeps_its_statistics(tmp_path, med3d_state):
    """dp: the server sends the parameters without BatchNorm statistics; the site trains with batch statistics,
    replies with exactly the keys sent, in order, and a unit weight, and keeps its running statistics in its
    context.state (never sent): its evaluation normalises with them, and its next round starts from them."""
    from client.app import evaluate, train
    from client.handlers import SITE_BATCHNORM
    from common.learning.model import load_state_numpy, statistics_keys
    from common.learning.train import validation_metrics

    cfg = make_cfg(dp="client-fixed", lr=1e-3)
    ctx = _site_context(tmp_path, cfg)
    model = build_med3d(depth=10, num_classes=2)
    stats = statistics_keys(model)
    params = ArrayRecord({k: torch.as_tensor(v) for k, v in med3d_state.items() if k not in set(stats)})
    message = lambda g: instruction(101, RecordDict({keys.ARRAYS: params, keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: g})}))
    reply = train(message(1), ctx)
    assert list(reply.content[keys.ARRAYS]) == list(params)
    assert reply.content[keys.METRICS][keys.UNIT_WEIGHT] == 1
    kept = ctx.state[SITE_BATCHNORM].to_torch_state_dict()
    assert list(kept) == stats
    counts = [k for k in stats if k.endswith("num_batches_tracked")]
    assert all(int(kept[k]) > 0 for k in counts)  # trained with batch statistics, which moved the running ones
    assert not any(torch.allclose(kept[k], torch.as_tensor(med3d_state[k])) for k in stats if k.endswith("running_mean"))

    # evaluate: the site's own statistics, exactly (a model given the same weights and statistics scores the same)
    ev = evaluate(instruction(102, RecordDict({keys.ARRAYS: params, keys.CONFIG: ConfigRecord({})}), "evaluate"), ctx)
    load_state_numpy(model, {k: torch.as_tensor(v) for k, v in med3d_state.items()} | kept)
    rows = read_manifest(Path(ctx.node_config["data-path"]))
    own = validation_metrics(model, rows[rows["split"] == "val"], cfg, runtime(False), Path(ctx.node_config["cache-dir"]))
    assert ev.content[keys.METRICS][keys.eval_key("loss")] == pytest.approx(own["loss"], rel=1e-5)

    train(message(2), ctx)  # round 2 goes on from round 1's statistics: its batch counts add up
    again = ctx.state[SITE_BATCHNORM].to_torch_state_dict()
    assert all(int(again[k]) == 2 * int(kept[k]) for k in counts)
    with pytest.raises(RuntimeError, match="exchanged keys"):  # the whole state (statistics too) is refused
        train(instruction(101, RecordDict({keys.ARRAYS: ArrayRecord({k: torch.as_tensor(v) for k, v in med3d_state.items()}),
                                           keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: 1})})), ctx)


def test_secure_aggregation_site_answers_a_legacy_fitins_with_a_fitres(tmp_path, med3d_state):
    """secure-aggregation: the SecAgg+ training message is Flower's legacy FitIns (weights as an ordered list);
    the site replies with a FitRes: its weights in the same order, num-examples as the protocol weight, and its
    metrics and name in the clear. A value outside SecAgg+'s +-8 range is refused, not cut."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from client.app import train
    from common.learning.model import exchanged_keys

    cfg = make_cfg(**{"secure-aggregation": True, "min-nodes": 3, "lr": 1e-3})
    ctx = _site_context(tmp_path, cfg)
    names = exchanged_keys(build_med3d(depth=10, num_classes=2), statistics=False)
    fitins = FitIns(ndarrays_to_parameters([med3d_state[k] for k in names]), {keys.GLOBAL_ROUND: 1})
    reply = train(instruction(101, compat.fitins_to_recorddict(fitins, keep_input=True)), ctx)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    values = parameters_to_ndarrays(fitres.parameters)
    assert [v.shape for v in values] == [med3d_state[k].shape for k in names]
    assert fitres.num_examples == fitres.metrics[keys.NUM_EXAMPLES] == 3
    assert fitres.metrics[keys.SITE_NAME] == "site"
    big = dict(med3d_state)
    big[names[0]] = np.full_like(big[names[0]], 50.0)
    with pytest.raises(ValueError, match=r"outside the SecAgg\+ quantization range"):
        train(instruction(101, compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([big[k] for k in names]),
                                                                   {keys.GLOBAL_ROUND: 1}), keep_input=True)), ctx)


def test_attack_keys_are_refused_at_a_deployed_site(tmp_path, med3d_state):
    """attack: a deployed site (node-config data-path, no partition-id) refuses to play the attacker."""
    from client.app import train

    cfg = make_cfg(attack="sign-flip", **{"attack-site": "site"})
    ctx = _site_context(tmp_path, cfg)
    arrays = ArrayRecord({k: torch.as_tensor(v) for k, v in med3d_state.items()})
    with pytest.raises(ConfigError, match="simulations only"):
        train(instruction(101, RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.GLOBAL_ROUND: 1})})), ctx)

"""Reproducible numbers and a readable console (issue 12, items 7 and 9), with real flwr messages, a real
16^3 cohort under tmp_path and real log text:

- ``RecordingFedAvg`` aggregates replies in a fixed order (site name, then node id): the global model and
  the aggregated metrics are bitwise the same whatever order the replies arrived in;
- Flower's aggregated training metrics are meaningful: class counts summed, loss weighted by samples;
- one site's local training (the ClientApp's ``train`` handler) is bitwise repeatable from its seed, and
  logs one line;
- ``simulation.flower.console_lines``: repeated warnings counted, tracebacks shortened to their last line.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from client.handlers import _reply
from client.site import Site
from common import keys
from common.cohort.manifest import write_manifest
from common.config import RunConfig
from common.errors import DataError
from common.learning.model import make_model
from server.strategy import RecordingFedAvg, nan_aware_mean, train_metrics_summary
from simulation.flower import console_lines

try:
    from data_factory import make_manifest, write_nifti
except ImportError:  # run as a package
    from tests.data_factory import make_manifest, write_nifti

torch.set_num_threads(2)


# --- helpers -----------------------------------------------------------------------------------


def _instruction(node: int, message_type: str = "train") -> Message:
    meta = Metadata(run_id=1, message_id=f"msg-{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), metadata=meta)


# (node, site, num-examples): two nodes share a site name, so the node id decides between them
SITES = [(103, "C", 7), (101, "A", 13), (104, "B", 29), (102, "A", 3)]
SHAPES = {"w": (64, 33), "b": (257,)}


def _train_reply(node: int, site: str, n: int) -> Message:
    rng = np.random.default_rng(node)  # values whose float sum depends on the order it is taken in
    arrays = ArrayRecord({k: Array((rng.standard_normal(shape) * 10 ** rng.uniform(-3, 3, shape)).astype(np.float32))
                          for k, shape in SHAPES.items()})
    metrics = {keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: float(rng.uniform(0.1, 2.0)), keys.TRAIN_SECONDS: 1.5,
               keys.SAMPLES_PER_SECOND: n / 1.5,
               keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5, keys.class_count_key(0): n // 3, keys.class_count_key(1): n - n // 3}
    s = Site(name=site, index=0, manifest=Path("/x.csv"), cache_dir=Path("/c"))
    return _reply(_instruction(node), s, metrics, arrays)


def _eval_reply(node: int, site: str, n: int) -> Message:
    rng = np.random.default_rng(1000 + node)
    metrics = {keys.NUM_EXAMPLES: n, **{keys.eval_key(m): float(rng.uniform()) for m in keys.EVAL_METRICS},
               keys.STARTUP_SECONDS: 3.0, keys.SETUP_SECONDS: 0.5, keys.EVAL_SECONDS: 0.2}
    metrics[keys.eval_key("n")] = float(n)
    s = Site(name=site, index=0, manifest=Path("/x.csv"), cache_dir=Path("/c"))
    return _reply(_instruction(node, "evaluate"), s, metrics)


def _error_reply(node: int) -> Message:
    return Message(Error(code=0, reason="ClientAppException: training loss is nan"), reply_to=_instruction(node))


def _bytes(arrays: ArrayRecord) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in arrays.items()}


# --- A. aggregation does not depend on the order of the replies --------------------------------


def test_aggregate_train_is_bitwise_the_same_in_any_reply_order():
    replies = [_train_reply(*s) for s in SITES] + [_error_reply(105)]
    results = []
    for order in itertools.permutations(range(len(replies))):
        strategy = RecordingFedAvg()
        arrays, metrics = strategy.aggregate_train(1, [replies[i] for i in order])
        results.append((_bytes(arrays), dict(metrics), list(strategy.train_sites[1]), strategy.failed[1]))
    first = results[0]
    assert all(r == first for r in results[1:])  # weights bit for bit, metrics, site order, failures
    assert first[2] == ["A", "B", "C"]  # sorted by site name (two nodes of site A: one entry)
    # the fixed order matters: Flower's own sum over the same replies in another order differs in the last bits
    contents = [r.content for r in replies[:-1]]
    plain = {tuple(sorted(_bytes(aggregate_arrayrecords([contents[i] for i in order], keys.NUM_EXAMPLES)).items()))
             for order in itertools.permutations(range(len(contents)))}
    assert len(plain) > 1


def test_aggregate_evaluate_is_the_same_in_any_reply_order():
    replies = [_eval_reply(*s) for s in SITES]
    outs = []
    for order in itertools.permutations(range(len(replies))):
        strategy = RecordingFedAvg()
        outs.append((dict(strategy.aggregate_evaluate(1, [replies[i] for i in order])), list(strategy.eval_sites[1])))
    assert all(o == outs[0] for o in outs[1:])
    assert outs[0][1] == ["A", "B", "C"]


# --- C. aggregated metrics that mean something ---------------------------------------------------


def test_train_metrics_sum_class_counts_and_weight_the_loss():
    replies = [_train_reply(*s) for s in SITES]
    strategy = RecordingFedAvg()
    assert strategy.train_metrics_aggr_fn is train_metrics_summary
    _, metrics = strategy.aggregate_train(1, replies)
    sites = [r.content[keys.METRICS] for r in replies]
    n = sum(m[keys.NUM_EXAMPLES] for m in sites)
    assert metrics[keys.class_count_key(0)] == sum(m[keys.class_count_key(0)] for m in sites)  # 2+4+9+1 = 16, not 10.03
    assert metrics[keys.class_count_key(1)] == sum(m[keys.class_count_key(1)] for m in sites)
    assert isinstance(metrics[keys.class_count_key(0)], int)
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(sum(m[keys.NUM_EXAMPLES] * m[keys.TRAIN_LOSS] for m in sites) / n)
    assert set(metrics) == {keys.TRAIN_LOSS, keys.class_count_key(0), keys.class_count_key(1)}  # no averaged timings


def test_evaluate_metrics_sum_the_val_counts():
    replies = [_eval_reply(*s) for s in SITES]
    out = nan_aware_mean([r.content for r in replies], keys.NUM_EXAMPLES)
    assert out[keys.eval_key("n")] == sum(s[2] for s in SITES) == out[keys.NUM_EXAMPLES]


# --- B. one site's local training is repeatable from its seed ----------------------------------


def _context(csv: Path, cache: Path, cfg: RunConfig) -> Context:
    return Context(run_id=1, node_id=101, node_config={"data-path": str(csv), "cache-dir": str(cache)},
                   state=RecordDict(), run_config=cfg.to_dict())


def _train(ctx: Context, arrays: ArrayRecord, server_round: int) -> Message:
    from client.app import train

    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
    return train(Message(content, metadata=_instruction(101).metadata), ctx)


@pytest.fixture
def restore_determinism():
    """The ClientApp turns on torch's deterministic mode for its process; give the test process its own back."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_local_training_is_bitwise_repeatable_and_logs_one_line(tmp_path, caplog, restore_determinism):
    """Same seed, site and round: the same weights bit for bit, whatever the ambient RNG state, and with a
    cold or a warm preprocessing cache (sampler, augmentation and dropout all follow the seed). Another
    round draws anew."""
    df = make_manifest({(0, "A"): 2, (1, "A"): 2}, visits=(1, 1), folder=tmp_path / "images")
    df["split"] = "train"
    for i, p in enumerate(df["path"]):
        write_nifti(Path(p), shape=(16, 16, 16), seed=i)
    csv = write_manifest(df, tmp_path / "site" / "site.csv")
    cfg = RunConfig.from_mapping({"input-shape": "16,16,16", "spacing": "1.0,1.0,1.0", "batch-size": 2, "amp": False,
                                  "lr": 1e-3})  # 2 steps; class-balancing=sampler, augmentation, dropout: the defaults
    ctx = _context(csv, tmp_path / "cache", cfg)
    arrays = ArrayRecord(make_model(cfg).state_dict())

    with caplog.at_level(logging.INFO, logger="flwr"):
        first = _train(ctx, arrays, 1)  # cold cache
    lines = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    assert lines == ["site site, round 1: trained on 4 scans (2 control, 2 PD), loss "
                     f"{first.content[keys.METRICS][keys.TRAIN_LOSS]:.4f}, "
                     f"{first.content[keys.METRICS][keys.TRAIN_SECONDS]:.1f} s"]

    torch.rand(17)  # another ambient RNG state: the handler seeds what it draws
    np.random.default_rng().random()
    again = _train(ctx, arrays, 1)  # warm cache
    assert _bytes(again.content[keys.ARRAYS]) == _bytes(first.content[keys.ARRAYS])
    assert again.content[keys.METRICS][keys.TRAIN_LOSS] == first.content[keys.METRICS][keys.TRAIN_LOSS]
    assert torch.are_deterministic_algorithms_enabled()  # set by the ClientApp on CPU (common/device.py)

    other = _train(ctx, arrays, 2)
    assert _bytes(other.content[keys.ARRAYS]) != _bytes(first.content[keys.ARRAYS])


# --- C. the console echo of a Flower log ---------------------------------------------------------

INFO = "\x1b[92mINFO \x1b[0m:      "
WARN = "\x1b[93mWARNING \x1b[0m:   "
ERROR = "\x1b[91mERROR \x1b[0m:     "


def _python_warning(message: str, category: type[Warning], filename: str, lineno: int, source: str) -> list[str]:
    """The two lines Python's warnings module writes to stderr."""
    text = warnings.formatwarning(message, category, filename, lineno, line=source)
    return text.splitlines()


def _flower_traceback() -> list[str]:
    """A real chained traceback, logged the way Flower logs one (level prefix on its first line only)."""
    try:
        try:
            raise FileNotFoundError("/data/site/I1.nii.gz")
        except FileNotFoundError as err:
            raise DataError("image_id I1: /data/site/I1.nii.gz: image file not found; restore the file") from err
    except DataError as exc:
        text = "".join(traceback.format_exception(exc))
    lines = text.rstrip("\n").splitlines()
    return [ERROR + lines[0], *lines[1:]]


# From a real `fedpd simulate` log: a site's error reply whose reason holds Ray's remote traceback.
RAY_REASON = [
    WARN + "round 1: site 2269592913238353903 failed in train: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:"
           "<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=11191, ip=192.0.2.2, actor_id=ffba21f5a135723523aacd4d01000000)",
    "                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    '  File "/work/main/.venv/lib/python3.11/site-packages/flwr/clientapp/client_app.py", line 161, in __call__',
    "    return self._registered_funcs[full_name](message, context)",
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    '  File "/tmp/det/fail1/.flwr/apps/fedpd.fedpd.0.1.0.63475120/common/train.py", line 110, in train_local',
    '    raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch + 1}; lower lr or check the inputs")',
    "FloatingPointError: training loss is nan at epoch 1; lower lr or check the inputs",
    "",
    "The above exception was the direct cause of the following exception:",
    "",
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=11191, ip=192.0.2.2, actor_id=ffba21f5a135723523aacd4d01000000)",
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    '  File "/work/main/.venv/lib/python3.11/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 65, in run',
    "    raise ClientAppException(str(ex)) from ex",
    "flwr.clientapp.client_app.ClientAppException: ",
    "Exception ClientAppException occurred. Message: training loss is nan at epoch 1; lower lr or check the inputs'>",
]


def test_console_passes_ordinary_lines_unchanged():
    lines = [INFO + "[ROUND 1/2]", INFO + "configure_train: Sampled 3 nodes (out of 3)",
             "(ClientAppActor pid=4242) " + INFO + "site 10, round 1: trained on 12 scans (0 control, 12 PD), loss 0.65, 3.1 s",
             INFO + "round 1: 3 site update(s) accepted", ""]
    assert list(console_lines(lines)) == lines
    assert list(console_lines(line + "\n" for line in lines)) == lines  # line ends as read from a pipe


def test_console_drops_flowers_info_detail():
    """Flower's strategy banner, metric dumps and Final results tables stay in the log only."""
    detail = [INFO + "Starting RecordingFedAvg strategy:", INFO + "\t├── Number of rounds: 2", INFO,
              INFO + "\t└──> Aggregated MetricRecord: {'train-loss': 0.69}", INFO + "Final results:",
              INFO + "\t\tArrayRecord (54.797 MB)", INFO + "Initial global evaluation results: None"]
    kept = [INFO + "[ROUND 1/2]", INFO + "round 1: val AUC 0.700, val loss 0.6000, checkpoint c.pt"]
    assert list(console_lines(detail[:3] + kept[:1] + detail[3:] + kept[1:])) == kept


def test_console_shows_a_repeated_warning_once_and_counts_it():
    metric = [_python_warning(f"binary_metrics: undefined, reported as nan: npv; data: {k} PD, 1 control",
                              UserWarning, "/run/.flwr/apps/fedpd/common/metrics.py", 301,
                              "point = binary_metrics(y, p, threshold=t)") for k in (6, 2, 3)]
    sklearn = [_python_warning("Precision is ill-defined and being set to 0.0 due to no predicted samples.", UserWarning,
                               "/venv/sklearn/metrics/_classification.py", 1565, "_warn_prf(average, modifier, msg_start, len(result))")
               for _ in range(2)]
    ray = _python_warning("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
                          FutureWarning, "/venv/ray/_private/worker.py", 2051, "warnings.warn(")
    flwr = WARN + "Since flwr 1.32, default simulated SuperNodes changed from 10 to 2."
    lines = [*ray, INFO + "[ROUND 1/2]", flwr, *metric[0], *sklearn[0], INFO + "[ROUND 2/2]", *ray, flwr, *metric[1],
             *sklearn[1], *metric[2], WARN + "round 2: site 10 failed in train: loss is nan",
             WARN + "round 3: site 10 failed in train: loss is nan", INFO + "done"]
    out = list(console_lines(lines, log_name="/run/flower.log"))
    assert out[:6] == [ray[0], INFO + "[ROUND 1/2]", flwr, metric[0][0], sklearn[0][0], INFO + "[ROUND 2/2]"]
    assert out[6:9] == [WARN + "round 2: site 10 failed in train: loss is nan",  # our own warnings differ: all shown
                        WARN + "round 3: site 10 failed in train: loss is nan", INFO + "done"]
    assert out[9:] == [
        "(repeated 1 more time, not shown: FutureWarning at worker.py:2051; all in /run/flower.log)",
        "(repeated 1 more time, not shown: WARNING Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.; all in /run/flower.log)",
        "(repeated 2 more times, not shown: UserWarning at metrics.py:301; all in /run/flower.log)",
        "(repeated 1 more time, not shown: UserWarning at _classification.py:1565; all in /run/flower.log)",
    ]


def test_console_shortens_a_chained_traceback_to_its_last_line():
    tb = _flower_traceback()
    assert len(tb) > 8 and "The above exception was the direct cause of the following exception:" in tb
    lines = [INFO + "[ROUND 1/1]", *tb, INFO + "round 1: 0 site update(s) accepted"]
    out = list(console_lines(lines, log_name="flower.log"))
    assert out == [INFO + "[ROUND 1/1]",
                   "common.errors.DataError: image_id I1: /data/site/I1.nii.gz: image file not found; restore the file"
                   "  [traceback in flower.log]",
                   INFO + "round 1: 0 site update(s) accepted",
                   "(1 traceback(s) shortened to their last line; full text in flower.log)"]


def test_console_keeps_the_indented_message_lines_after_a_traceback():
    try:
        raise RuntimeError("no site update was aggregated. The sites' reasons:\n  round 1, site 20 (train): loss is nan\n"
                           "Fix the cause and start a new run.")
    except RuntimeError as exc:
        tb = "".join(traceback.format_exception(exc)).rstrip("\n").splitlines()
    out = list(console_lines([ERROR + "Simulation raised an exception", *tb, ERROR + "Exit Code: 700"]))
    assert out[:5] == [ERROR + "Simulation raised an exception",
                       "RuntimeError: no site update was aggregated. The sites' reasons:  [traceback in flower.log]",
                       "  round 1, site 20 (train): loss is nan", "Fix the cause and start a new run.", ERROR + "Exit Code: 700"]


def test_console_shortens_a_remote_traceback_inside_a_logged_reason():
    out = list(console_lines([*RAY_REASON, INFO + "round 1: 0 site update(s) accepted"]))
    assert out == [RAY_REASON[0],
                   "flwr.clientapp.client_app.ClientAppException:   [traceback in flower.log]",
                   RAY_REASON[-1], INFO + "round 1: 0 site update(s) accepted",
                   "(1 traceback(s) shortened to their last line; full text in flower.log)"]


def test_console_ends_a_traceback_at_the_end_of_the_stream():
    out = list(console_lines(_flower_traceback()))
    assert out[0].startswith("common.errors.DataError: image_id I1") and len(out) == 2

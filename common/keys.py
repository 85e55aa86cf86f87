"""Message and metric keys, defined once. Kebab-case, as Flower's own ``num-examples``.

Everything a site sends is listed here: weight arrays under ``ARRAYS``, scalar metrics and counts
under ``METRICS``, and its site name under ``SITE``. Nothing per-sample has a key.
"""

__all__ = [
    "ARRAYS", "CONFIG", "METRICS", "SITE", "SITE_NAME", "QC_KEPT", "QC_EXCLUDED",
    "SERVER_ROUND", "NUM_EXAMPLES", "TRAIN_LOSS", "TRAIN_SECONDS", "SAMPLES_PER_SECOND",
    "class_count_key", "TRAIN_METRIC_KEYS", "EVAL_PREFIX", "eval_key", "EVAL_METRICS",
]

# Record names inside a Message's RecordDict
ARRAYS = "arrays"  # ArrayRecord: model state_dict (FedAvg default key)
CONFIG = "config"  # ConfigRecord: server -> site instructions (FedAvg default key)
METRICS = "metrics"  # MetricRecord: site -> server scalars
SITE = "site"  # ConfigRecord: site -> server identity
SITE_NAME = "site-name"  # key inside the SITE record
# Also inside the SITE record, when the site's scans came from `fedpd preprocess`: how many of the site's
# scans its preprocessing QC kept and excluded (counts only; the reasons stay in the site's qc.csv).
QC_KEPT = "qc-kept"
QC_EXCLUDED = "qc-excluded"

# ConfigRecord keys
SERVER_ROUND = "server-round"  # injected by FedAvg into every config

# MetricRecord keys of a train reply
NUM_EXAMPLES = "num-examples"  # training samples (len(dataset)), the FedAvg weight
TRAIN_LOSS = "train-loss"  # mean cross-entropy per sample over the local epochs
TRAIN_SECONDS = "train-seconds"
SAMPLES_PER_SECOND = "samples-per-second"


def class_count_key(label: int) -> str:
    """Key of the local training-class count, e.g. ``class-count-1`` for PD."""
    return f"class-count-{int(label)}"


TRAIN_METRIC_KEYS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, SAMPLES_PER_SECOND, class_count_key(0), class_count_key(1))

# MetricRecord keys of an evaluate reply: "val-<metric>" for aggregate metrics on local val rows
EVAL_PREFIX = "val-"
EVAL_METRICS = ("n", "loss", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")


def eval_key(metric: str) -> str:
    """``val-auc``, ``val-balanced-accuracy``, ...: underscores in metric names become dashes."""
    return EVAL_PREFIX + metric.replace("_", "-")

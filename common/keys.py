"""Message and metric keys, class names and the run-config choices, each defined once. Keys are kebab-case,
as Flower's own ``num-examples``.

Everything a site sends is listed here: weight arrays under ``ARRAYS``, scalar metrics and counts
under ``METRICS``, and its site name under ``SITE``. Nothing per-sample has a key.
"""

__all__ = [
    "ARRAYS", "CONFIG", "METRICS", "SITE", "SITE_NAME", "QC_KEPT", "QC_EXCLUDED",
    "SERVER_ROUND", "NUM_EXAMPLES", "TRAIN_LOSS", "TRAIN_SECONDS", "SAMPLES_PER_SECOND", "STARTUP_SECONDS",
    "SETUP_SECONDS", "EVAL_SECONDS", "TIMING_KEYS",
    "class_count_key", "CLASS_COUNT_PREFIX", "TRAIN_METRIC_KEYS", "EVAL_PREFIX", "eval_key", "EVAL_METRICS",
    "GLOBAL_ROUND", "VAL_AUC", "VAL_LOSS", "CLASS_NAMES", "NUM_CLASSES", "CLASS_BALANCING", "MODEL_DEPTHS",
    "PARTITION_SCHEMES", "BASELINE_MODES", "STRATEGIES", "DP_MODES", "ATTACKS", "TRANSPORT_DTYPES", "CHECKPOINT_RETENTION", "PROXIMAL_MU", "UNIT_WEIGHT", "SECAGG_CLIPPING_RANGE", "NODE_DATA_PATH", "NODE_CACHE_DIR", "NODE_SITE_NAME", "NODE_SITE_INDEX", "NODE_SITE_WORKER", "NODE_SITE_WORKER_IDLE",
    "NODE_PARTITION_ID", "NODE_NUM_PARTITIONS",
]

# The two classes: label 0 and label 1, in this order everywhere (manifests, model outputs, reports).
CLASS_NAMES = ("control", "PD")
NUM_CLASSES = len(CLASS_NAMES)
# run-config choices that other modules validate or offer (the CLI reuses them)
CLASS_BALANCING = ("sampler", "loss", "none")  # local class balancing: weighted sampler, weighted loss, none
MODEL_DEPTHS = (10, 18, 34, 50, 101, 152, 200)  # the Med3D / MedicalNet ResNet depths
PARTITION_SCHEMES = ("natural", "iid", "dirichlet")  # fedpd partition: acquisition sites, random, label-skewed
BASELINE_MODES = ("centralized", "local", "scratch")  # fedpd baseline: pooled, each site alone, random init
# aggregation strategies (run-config `strategy`); fedbn is FedAvg with every BatchNorm tensor kept at the site
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "fedbn")
# differential privacy (run-config `dp`): off, central noise with server-side clipping, central noise with
# clipping at the site (fixed or adaptive norm)
DP_MODES = ("none", "server-fixed", "client-fixed", "client-adaptive")
# a simulated harmful site (run-config `attack`, simulation only): update scaled, or scaled and sign-flipped
ATTACKS = ("none", "scale", "sign-flip")
# how weights travel: float32 as they are; float16: the server sends its float32 weights rounded to float16, a site
# sends its update (trained - received) in float16, and the server adds it to its float32 weights
TRANSPORT_DTYPES = ("float32", "float16")
# which round checkpoints a run keeps (run-config `keep-checkpoints`): every round's, or only the round the
# selection rule picks so far (common.runs.rundir.select_round) and the last one (what resume starts from)
CHECKPOINT_RETENTION = ("all", "selected-and-last")

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

# node-config keys (flower-supernode --node-config "k='v' ..."): a deployed site gives its manifest and cache
NODE_DATA_PATH = "data-path"  # the site's manifest CSV (from fedpd partition)
NODE_CACHE_DIR = "cache-dir"  # the site's preprocessed-volume cache folder
NODE_SITE_NAME = "site-name"  # optional: the site's name (default: the manifest's file stem)
NODE_SITE_INDEX = "site-index"  # optional: the site's seed offset (default: from its name)
NODE_SITE_WORKER = "site-worker"  # optional: 'false' runs every message in its own ClientApp process (client/worker.py)
NODE_SITE_WORKER_IDLE = "site-worker-idle"  # optional: seconds the site worker waits for a message before it exits
# ... and what Flower's simulation gives each virtual SuperNode instead
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

# ConfigRecord keys
SERVER_ROUND = "server-round"  # injected by FedAvg into every config
GLOBAL_ROUND = "global-round"  # fedpd's round number across resumed runs (server-round restarts at 1)
PROXIMAL_MU = "proximal-mu"  # put into the train config by Flower's FedProx
# SecAgg+ quantizes every exchanged value within +-this range (Flower's default clipping_range): sites refuse to
# send a value outside it rather than have it cut silently
SECAGG_CLIPPING_RANGE = 8.0

# MetricRecord keys of a train reply
NUM_EXAMPLES = "num-examples"  # training samples (len(dataset)), the FedAvg weight
TRAIN_LOSS = "train-loss"  # mean cross-entropy per sample over the local epochs
TRAIN_SECONDS = "train-seconds"
SAMPLES_PER_SECOND = "samples-per-second"
# where a site's message time goes besides its training or validation loop (train and evaluate replies): the
# process's start-up before the handler ran (interpreter, Flower, torch/MONAI/fedpd imports, message pull;
# 0 for a process that already answered a message, as simulation actors do) and the handler's own set-up
# (config, model build, loading the weights, opening the manifest and the cache)
STARTUP_SECONDS = "startup-seconds"
SETUP_SECONDS = "setup-seconds"
EVAL_SECONDS = "eval-seconds"  # evaluate replies: the validation loop
# DP runs only, in train and evaluate replies: 1, the site's weight in the average (Flower's privacy accounting
# needs every site weighted equally); num-examples stays the count of samples
UNIT_WEIGHT = "unit-weight"


CLASS_COUNT_PREFIX = "class-count-"


def class_count_key(label: int) -> str:
    """Key of the local training-class count, e.g. ``class-count-1`` for PD."""
    return f"{CLASS_COUNT_PREFIX}{int(label)}"


TRAIN_METRIC_KEYS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, SAMPLES_PER_SECOND, class_count_key(0), class_count_key(1),
                     STARTUP_SECONDS, SETUP_SECONDS)
# timings a site reports (per site in rounds.jsonl; never averaged into the round's figures)
TIMING_KEYS = (TRAIN_SECONDS, SAMPLES_PER_SECOND, STARTUP_SECONDS, SETUP_SECONDS, EVAL_SECONDS)

# MetricRecord keys of an evaluate reply: "val-<metric>" for aggregate metrics on local val rows
EVAL_PREFIX = "val-"
EVAL_METRICS = ("n", "loss", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")


def eval_key(metric: str) -> str:
    """``val-auc``, ``val-balanced-accuracy``, ...: underscores in metric names become dashes."""
    return EVAL_PREFIX + metric.replace("_", "-")


# MetricRecord keys of the server-side evaluation (the global model on the server's val rows), per round
VAL_AUC = eval_key("auc")
VAL_LOSS = eval_key("loss")

"""Run-config parsing: pyproject defaults, unknown keys, types, ranges; the device helper."""

import dataclasses

import pytest
import torch

from common.config import RunConfig, load_defaults, parse_overrides
from common.device import runtime, select_device
from common.errors import ConfigError


def test_pyproject_defaults_parse_and_are_frozen():
    cfg = RunConfig.from_mapping({})
    assert cfg.to_dict() == {k: (float(v) if isinstance(cfg.to_dict()[k], float) else v) for k, v in load_defaults().items()}
    assert cfg.class_balancing == "sampler" and cfg.model_depth == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    assert not hasattr(cfg, "__dict__")  # slotted


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"learning-rate": 0.1})
    msg = str(err.value)
    assert "learning-rate" in msg and "Valid keys:" in msg and "lr" in msg and "class-balancing" in msg


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("lr", "fast", "must be float"),
        ("amp", 1, "must be bool"),
        ("num-server-rounds", 2.5, "must be int"),
        ("batch-size", True, "must be int"),
    ],
)
def test_wrong_type_is_named(key, value, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        RunConfig.from_mapping({key: value})
    assert repr(key) in str(err.value)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("model-depth", 11, "10, 18, 34, 50, 101, 152, 200"),
        ("class-balancing", "oversample", "sampler, loss, none"),
        ("strategy", "fedsgd", "fedavg"),
        ("fraction-train", 0.0, "(0, 1]"),
        ("lr", 0.0, "> 0.0"),
        ("num-server-rounds", 0, ">= 1"),
        ("input-shape", "64,64", "three comma-separated"),
        ("input-shape", "64,x,64", "three comma-separated"),
        ("dropout", 1.0, "[0, 1)"),
    ],
)
def test_out_of_range_lists_choices(key, value, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert needle in str(err.value) and key in str(err.value)


def test_int_accepted_for_float_and_shapes_parsed_into_tuples():
    cfg = RunConfig.from_mapping({"lr": 1, "input-shape": "32,40,48", "spacing": "1.5,1.5,2"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.input_shape == (32, 40, 48) and cfg.spacing == (1.5, 1.5, 2.0)  # tuples from the start
    # written back as the run-config's text, so config.json and checkpoints read like Flower's run_config
    assert cfg.to_dict()["input-shape"] == "32,40,48" and cfg.to_dict()["spacing"] == "1.5,1.5,2.0"
    assert RunConfig.from_mapping(cfg.to_dict(), defaults={}) == cfg


def test_every_key_is_declared_once_with_its_help():
    declared = RunConfig.keys()
    assert list(declared) == list(RunConfig.from_mapping({}).to_dict())
    assert set(declared) == set(load_defaults())  # pyproject's defaults cover exactly the declared keys
    assert all(k.help for k in declared.values())


def test_missing_key_without_defaults_is_named():
    with pytest.raises(ConfigError, match="'lr'.*missing"):
        d = load_defaults()
        d.pop("lr")
        RunConfig.from_mapping(d, defaults={})


def test_replace_revalidates():
    cfg = RunConfig.from_mapping({})
    assert cfg.replace(batch_size=8).batch_size == 8
    with pytest.raises(ConfigError):
        cfg.replace(batch_size=0)


def test_parse_overrides_like_flwr_run_c():
    got = parse_overrides("lr=0.01 amp=false out-dir='runs/x y' pretrained-path=/a/b.pth num-server-rounds=3")
    assert got == {"lr": 0.01, "amp": False, "out-dir": "runs/x y", "pretrained-path": "/a/b.pth", "num-server-rounds": 3}
    cfg = RunConfig.from_mapping(got)
    assert cfg.num_server_rounds == 3 and cfg.amp is False
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides("lr")
    # a quoted value stays a string even when it reads as a number (a site named 10); quotes group spaces
    assert parse_overrides("attack-site='10' seed=10 a=\"x y\" b='' c=abc") == {
        "attack-site": "10", "seed": 10, "a": "x y", "b": "", "c": "abc"}
    with pytest.raises(ConfigError, match="unbalanced"):
        parse_overrides("out-dir='runs/x")


def test_device_helper_cpu_and_amp_policy(monkeypatch):
    monkeypatch.setenv("FEDPD_DEVICE", "cpu")
    rt = runtime(amp=True)
    assert rt.device == torch.device("cpu") and rt.amp is False  # AMP only ever on CUDA
    assert "cpu" in rt.describe()
    with rt.autocast():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    assert not rt.grad_scaler().is_enabled()
    monkeypatch.delenv("FEDPD_DEVICE")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device("cuda")

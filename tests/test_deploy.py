"""deploy/: provisioning (CA, SuperLink certificate, site kits) and a secure deployment run with the kits'
own scripts.

Unit tests run ``deploy/provision.py`` and the generated scripts (``--dry-run``) as subprocesses.
The integration tests share one module fixture: one SuperLink started by ``start-superlink.sh`` (TLS +
SuperNode authentication), sites registered by ``register-sites.sh``, four SuperNodes started by
``start-supernode.sh``: site-A and site-B (registered), site-X (its key never registered) and site-C
(registered, but started without the CA certificate). site-A and site-B run with ``FEDPD_AUDIT_LOG`` set to
a file of their own (start-supernode.sh -> flower-supernode -> SuperExec -> flwr-clientapp inherit it), so
the same run also checks what the sites sent. Every process runs on 127.0.0.1 on free ports with its own
state folder and is stopped by PID in ``finally``. The cohort is the phantom at 32^3.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from client.audit import AUDIT_ENV
from common import keys
from common.learning.model import build_med3d
from server.strategy import EVALUATE_METRIC_KEYS
from simulation.flower import (APP_DIR, BIN, Proc, flwr_env, flwr_run, free_port, stop, wait_for_port,
                               write_run_config)

try:
    from data_factory import phantom_cohort
    from deploy_helpers import audit_lines, forbidden_strings, record_strings, rounds as _rounds
except ImportError:  # run as a package
    from tests.data_factory import phantom_cohort
    from tests.deploy_helpers import audit_lines, forbidden_strings, record_strings, rounds as _rounds

PROVISION = APP_DIR / "deploy" / "provision.py"
SMALL = {"input-shape": "16,16,16", "spacing": "12.0,12.0,12.0", "batch-size": 4, "local-epochs": 1}
slow = pytest.mark.slow  # only the tests that start a federation; the provisioning tests take about a second


def _provision(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROVISION), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120)


def _script(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120,
                          env=flwr_env(path.parent / "cli-home", **env))


def _fill_node_config(kit: Path, data: Path, cache: Path) -> None:
    """What site IT does by hand: replace the two REPLACE-ME paths in node-config.toml."""
    path = kit / "node-config.toml"
    text = re.sub(r"^data-path = .*$", f'data-path = "{data}"', path.read_text(), flags=re.M)
    path.write_text(re.sub(r"^cache-dir = .*$", f'cache-dir = "{cache}"', text, flags=re.M))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def kit(tmp_path):
    result = _provision(tmp_path / "kit", "--host", "127.0.0.1", "--host", "fl.example.org", "--port", "9443",
                        "--site", "site-A", "--site", "site-B")
    assert result.returncode == 0, result.stderr
    return tmp_path / "kit"


# ---------------------------------------------------------------------------------------------------
# Provisioning

def test_server_certificate_has_sans_and_chains_to_ca(kit):
    ca = x509.load_pem_x509_certificate((kit / "coordinator" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((kit / "coordinator" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = serialization.load_pem_private_key((kit / "coordinator" / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()
    for site in ("site-A", "site-B"):  # every site gets the same CA certificate, and nothing secret of the coordinator
        assert (kit / "sites" / site / "ca.crt").read_bytes() == (kit / "coordinator" / "ca.crt").read_bytes()
    assert not [p for p in (kit / "sites").rglob("*") if p.name in {"ca.key", "server.key", "server.pem"}]


def test_site_keys_are_openssh_ec_nist_and_private_keys_0600(kit):
    from flwr.cli.supernode.register import try_load_public_key  # Flower's own check in `flwr supernode register`

    for name in ("ca.key", "server.key"):
        assert _mode(kit / "coordinator" / name) == 0o600
    for site in ("site-A", "site-B"):
        folder = kit / "sites" / site
        private = serialization.load_ssh_private_key((folder / f"{site}.key").read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert (folder / f"{site}.key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert _mode(folder / f"{site}.key") == 0o600
        assert _mode(folder) == 0o700
        pub = (folder / f"{site}.pub").read_bytes()
        assert pub.startswith(b"ecdsa-sha2-nistp384 ")
        assert serialization.load_ssh_public_key(pub) == private.public_key()
        assert try_load_public_key(folder / f"{site}.pub")
        assert (kit / "coordinator" / "site-keys" / f"{site}.pub").read_bytes() == pub
        assert os.access(folder / "start-supernode.sh", os.X_OK)
        node_config = (folder / "node-config.toml").read_text()
        assert f'site-name = "{site}"' in node_config and node_config.count("REPLACE-ME") == 2
        assert "127.0.0.1:9443" in (folder / "start-supernode.sh").read_text()
    config = (kit / "coordinator" / "flwr-home" / "config.toml").read_text()
    assert 'address = "127.0.0.1:9443"' in config
    assert f'root-certificates = "{(kit / "coordinator" / "ca.crt").resolve()}"' in config
    assert json.loads((kit / "coordinator" / "kit.json").read_text())["sites"] == ["site-A", "site-B"]


def test_refuses_to_overwrite_ca_unless_force(kit):
    ca_key = (kit / "coordinator" / "ca.key").read_bytes()
    again = _provision(kit, "--host", "127.0.0.1", "--site", "site-A")
    assert again.returncode == 2
    assert str(kit / "coordinator" / "ca.key") in again.stderr
    assert "--force" in again.stderr and "--add-site" in again.stderr
    assert (kit / "coordinator" / "ca.key").read_bytes() == ca_key

    forced = _provision(kit, "--host", "127.0.0.1", "--site", "site-A", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (kit / "coordinator" / "ca.key").read_bytes() != ca_key
    (backup,) = kit.glob("replaced-*")  # nothing is lost: the old CA and kits moved aside
    assert (backup / "coordinator" / "ca.key").read_bytes() == ca_key
    assert (backup / "sites" / "site-B" / "site-B.key").is_file()
    assert sorted(p.name for p in (kit / "sites").iterdir()) == ["site-A"]


def _rsa_public_key(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path


@pytest.mark.parametrize("args, message", [
    (["--host", "not a host!", "--site", "site-A"], "--host 'not a host!'"),
    (["--host", "127.0.0.1", "--site", "../etc"], "site name '../etc'"),
    (["--host", "127.0.0.1", "--site", "site-A", "--site", "site-A"], "given twice: site-A"),
    (["--site", "site-A"], "at least one --host"),
    (["--host", "127.0.0.1", "--site", "site-A", "--public-key", "site-A=RSA"], "ssh-keygen -t ecdsa -b 384"),
    (["--host", "127.0.0.1", "--site", "site-A", "--public-key", "site-Z=x.pub"], "SITE one of the sites"),
])
def test_bad_input_is_named_and_writes_nothing(tmp_path, args, message):
    args = [a.replace("RSA", str(_rsa_public_key(tmp_path / "rsa.pub"))) for a in args]
    result = _provision(tmp_path / "kit", *args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "kit" / "coordinator").exists() and not (tmp_path / "kit" / "sites").exists()


def test_add_site_and_site_made_key(kit, tmp_path):
    before = {p: p.read_bytes() for p in kit.rglob("*") if p.is_file()}
    own = ec.generate_private_key(ec.SECP256R1())  # a site that made its own key (P-256 is a NIST curve too)
    pub = tmp_path / "site-C.pub"
    pub.write_bytes(own.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    added = _provision(kit, "--add-site", "site-C", "--add-site", "site-D", "--public-key", f"site-C={pub}")
    assert added.returncode == 0, added.stderr
    assert not (kit / "sites" / "site-C" / "site-C.key").exists()  # the private key never left the site
    assert serialization.load_ssh_public_key((kit / "coordinator" / "site-keys" / "site-C.pub").read_bytes()) \
        == own.public_key()
    assert _mode(kit / "sites" / "site-D" / "site-D.key") == 0o600
    assert (kit / "sites" / "site-D" / "ca.crt").read_bytes() == (kit / "coordinator" / "ca.crt").read_bytes()
    assert json.loads((kit / "coordinator" / "kit.json").read_text())["sites"] == ["site-A", "site-B", "site-C", "site-D"]
    assert all(p.read_bytes() == data for p, data in before.items() if p.name != "kit.json")

    again = _provision(kit, "--add-site", "site-A")
    assert again.returncode == 2 and str(kit / "sites" / "site-A") in again.stderr


def test_start_scripts_secure_by_default_and_insecure_warns(kit, tmp_path):
    link = kit / "coordinator" / "start-superlink.sh"
    secure = _script(link, "--dry-run")
    assert secure.returncode == 0, secure.stderr
    assert "--enable-supernode-auth" in secure.stdout and "--ssl-certfile" in secure.stdout
    assert "--insecure" not in secure.stdout and "WARNING" not in secure.stderr
    insecure = _script(link, "--insecure", "--dry-run")
    assert insecure.returncode == 0 and "--insecure" in insecure.stdout
    assert "--enable-supernode-auth" not in insecure.stdout
    assert "WARNING: --insecure: TLS and SuperNode authentication are OFF" in insecure.stderr

    node = kit / "sites" / "site-A" / "start-supernode.sh"
    unfilled = _script(node, "--dry-run")
    assert unfilled.returncode == 1 and "REPLACE-ME" in unfilled.stderr and "data-path" in unfilled.stderr
    manifest = tmp_path / "site-A.csv"
    manifest.write_text("image_id\n")
    _fill_node_config(node.parent, manifest, tmp_path / "cache")
    secure = _script(node, "--dry-run")
    assert secure.returncode == 0, secure.stderr
    for flag in ("--root-certificates", "--auth-supernode-private-key", "--node-config", "127.0.0.1:9443"):
        assert flag in secure.stdout
    insecure = _script(node, "--insecure", "--dry-run")
    assert "--insecure" in insecure.stdout and "--auth-supernode-private-key" not in insecure.stdout
    assert "WARNING: --insecure" in insecure.stderr
    config = node.parent / "node-config.toml"
    filled = config.read_text()
    for line, named in (('site-worker = "maybe"', 'site-worker = \'maybe\''), ("site-worker-idle = 0", "site-worker-idle = 0")):
        config.write_text(filled + line + "\n")
        bad = _script(node, "--dry-run")
        assert bad.returncode == 1 and named in bad.stderr and "node-config.toml" in bad.stderr, bad.stderr
    config.write_text(filled + 'site-worker = "false"\nsite-worker-idle = 60\n')
    assert _script(node, "--dry-run").returncode == 0
    config.write_text(filled)
    os.chmod(node.parent / "site-A.key", 0o644)
    loose = _script(node, "--dry-run")
    assert loose.returncode == 1 and "chmod 600" in loose.stderr


# ---------------------------------------------------------------------------------------------------
# A secure federation from the kits

def _start(script: Path, name: str, log: Path, port: int, **env: str) -> Proc:
    """Run a kit script in its own session (it execs the Flower process, so the PID is Flower's)."""
    with open(log, "ab") as fh:
        popen = subprocess.Popen([str(script)], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=flwr_env(log.parent / f"{name}-home", **env), cwd=script.parent)
    return Proc(name=name, popen=popen, log=log, port=port)


def _wait_exit(proc: Proc, timeout: float = 90.0) -> int:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} still runs after {timeout:.0f}s; log:\n{proc.log_text()[-3000:]}")


def _flwr_json(home: Path, *args: str) -> dict:
    res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=flwr_env(home), capture_output=True,
                         text=True, timeout=60)
    return json.loads(res.stdout[res.stdout.index("{"):])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    phantom_cohort(root, subjects=20, sites=2, shape=32, effect=1.0, seed=1)
    manifests = sorted((root / "partition" / "sites").glob("*.csv"))
    assert len(manifests) == 2

    port = free_port()
    kit = root / "kit"
    made = _provision(kit, "--host", "127.0.0.1", "--host", "localhost", "--port", str(port),
                      *[a for s in ("site-A", "site-B", "site-X", "site-C") for a in ("--site", s)])
    assert made.returncode == 0, made.stderr
    coordinator, sites = kit / "coordinator", kit / "sites"
    data = {"site-A": manifests[0], "site-B": manifests[1], "site-X": manifests[0], "site-C": manifests[1]}
    for site, manifest in data.items():
        _fill_node_config(sites / site, manifest, root / "cache" / site)

    logs = root / "logs"
    logs.mkdir()
    procs: dict[str, Proc] = {}
    try:
        procs["link"] = _start(coordinator / "start-superlink.sh", "link", logs / "superlink.log", port,
                               FEDPD_SUPERLINK_HOST="127.0.0.1")
        wait_for_port(port, timeout=60, proc=procs["link"])
        reg = subprocess.run([str(coordinator / "register-sites.sh"), "site-A", "site-B", "site-C"],
                             env=flwr_env(coordinator / "flwr-home"), capture_output=True, text=True, timeout=120)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        node_ids = dict(line.split("\t") for line in (coordinator / "registered-sites.tsv").read_text().splitlines())

        audit = root / "audit"
        for site in ("site-A", "site-B", "site-X", "site-C"):
            node_port = free_port()
            env = {"FEDPD_CA_CERT": ""} if site == "site-C" else {}  # empty: no --root-certificates
            if site in ("site-A", "site-B"):  # the audit switch, in the environment of the kit script only
                env[AUDIT_ENV] = str(audit / f"{site}.jsonl")
            procs[site] = _start(sites / site / "start-supernode.sh", site, logs / f"{site}.log", node_port,
                                 FEDPD_SUPERNODE_PORT=str(node_port), **env)
        out = root / "run"
        cfg = write_run_config(root / "rc.toml", SMALL | {
            "num-server-rounds": 1, "min-nodes": 2, "server-manifest": str(root / "partition" / "server.csv"),
            "out-dir": str(out)})
        code = flwr_run(coordinator / "flwr-home", "fedpd", run_config=cfg, log=logs / "flwr-run.log", timeout=400)
        assert code == 0, (logs / "flwr-run.log").read_text()[-3000:]
        # site-X and site-C fail within seconds, long before the ServerApp (started by the run above, with
        # fraction-train 1.0) samples the online nodes; had either been let in, it would train in the rounds
        exit_codes = {site: _wait_exit(procs[site]) for site in ("site-X", "site-C")}
        yield {
            "root": root, "audit": audit, "out": out, "node_ids": node_ids, "exit_codes": exit_codes,
            "runs": _flwr_json(coordinator / "flwr-home", "ls", "fedpd"),
            "nodes": {n["node-id"]: n["status"] for n in
                      _flwr_json(coordinator / "flwr-home", "supernode", "list", "fedpd")["nodes"]},
            "procs": procs,
        }
    finally:
        for proc in reversed(list(procs.values())):
            stop(proc)


@slow
def test_two_sites_train_over_tls_with_authentication(federation):
    procs = federation["procs"]
    link_log = procs["link"].log_text()
    assert "Uvicorn running on https://127.0.0.1" in link_log  # TLS on the one SuperLink port
    runs = federation["runs"]["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], runs
    recs = _rounds(federation["out"])
    assert [r["round"] for r in recs] == [1]
    for r in recs:
        assert set(r["sites"]) == {"site-A", "site-B"}, f"round {r['round']}: {sorted(r['sites'])}"
        assert all(s["num-examples"] > 0 for s in r["sites"].values())
    assert (federation["out"] / "report.json").is_file()
    for site in ("site-A", "site-B"):  # authenticated with the key registered for it, still up
        assert procs[site].popen.poll() is None, procs[site].log_text()[-2000:]
        assert federation["nodes"][federation["node_ids"][site]] == "online"
        assert f"SuperNode ID: {federation['node_ids'][site]}" in procs[site].log_text()
        # one site worker (client/worker.py) answered both of the round's messages: started once, not per message
        text = procs[site].log_text()
        assert text.count("Receiving: train message") == 1 and text.count("Receiving: evaluate message") == 1
        assert text.count("site worker: started pid") == 1, text[-3000:]


@slow
def test_unregistered_supernode_is_refused(federation):
    proc = federation["procs"]["site-X"]
    log = proc.log_text()
    assert federation["exit_codes"]["site-X"] != 0
    assert "Failed to activate SuperNode" in log, log[-3000:]
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in federation["procs"]["link"].log_text()
    assert "SuperNode ID:" not in log
    assert set(federation["nodes"]) == set(federation["node_ids"].values())  # site-X never got a node id
    assert all("site-X" not in r["sites"] for r in _rounds(federation["out"]))


@slow
def test_supernode_without_ca_certificate_cannot_connect(federation):
    proc = federation["procs"]["site-C"]
    log = proc.log_text()
    assert federation["exit_codes"]["site-C"] != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]
    assert "FEDPD_CA_CERT is empty" in log  # the kit script ran without --root-certificates
    assert federation["nodes"][federation["node_ids"]["site-C"]] == "registered"  # registered, never online
    assert all("site-C" not in r["sites"] for r in _rounds(federation["out"]))


@slow
def test_sites_send_only_weights_scalars_and_their_name(federation):
    """The audit logs of site-A and site-B over the run's round: every message a site sent holds only the model's
    weight arrays (keys, shapes and dtypes of the state_dict), scalar metrics and counts, and the site's name:
    no other arrays, no lists (per-sample scores), no strings but the site name, no file paths, subject ids
    or image ids of the manifests."""
    assert os.environ.get(AUDIT_ENV) is None  # set for the two SuperNodes only, not inherited from here
    assert sorted(p.name for p in federation["audit"].iterdir()) == ["site-A.jsonl", "site-B.jsonl"]
    state = build_med3d(depth=10, num_classes=2).state_dict()
    weights = {k: {"shape": list(v.shape), "dtype": str(v.numpy().dtype)} for k, v in state.items()}
    forbidden = forbidden_strings(federation["root"])
    assert len(forbidden) > 60
    (run,) = federation["runs"]["runs"]
    for name in ("site-A", "site-B"):
        log = federation["audit"] / f"{name}.jsonl"
        text = log.read_text()
        entries = audit_lines(log)
        # 1 round: one train and one evaluate reply, nothing else
        assert sorted(e["message_type"] for e in entries) == ["evaluate", "train"], entries
        assert {e["node_id"] for e in entries} == {int(federation["node_ids"][name])}  # its authenticated node id
        assert {str(e["run_id"]) for e in entries} == {run["run-id"]}  # all from the one run
        for e in entries:
            assert "error" not in e, e
            assert e["received_type"] == e["message_type"]
            records = e["records"]
            if e["message_type"] == "train":
                assert set(records) == {keys.ARRAYS, keys.METRICS, keys.SITE}
                assert records[keys.ARRAYS]["type"] == "ArrayRecord"
                assert set(records[keys.ARRAYS]["arrays"]) == set(state)
                for k, desc in records[keys.ARRAYS]["arrays"].items():
                    assert desc["shape"] == weights[k]["shape"], k
                    assert desc["dtype"] == weights[k]["dtype"], k
                expected_metrics = set(keys.TRAIN_METRIC_KEYS)
            else:
                assert set(records) == {keys.METRICS, keys.SITE}  # no arrays at all
                expected_metrics = set(EVALUATE_METRIC_KEYS)
            metrics = records[keys.METRICS]
            assert metrics["type"] == "MetricRecord" and set(metrics["metrics"]) == expected_metrics
            for k, v in metrics["metrics"].items():
                assert v["type"] in ("int", "float"), (k, v)  # scalars: no lists, so no per-sample scores
            for k in (keys.NUM_EXAMPLES, keys.class_count_key(0), keys.class_count_key(1)):
                if k in metrics["metrics"]:
                    assert metrics["metrics"][k]["type"] == "int"
            assert records[keys.SITE] == {"type": "ConfigRecord",
                                          "config": {keys.SITE_NAME: {"type": "str", "value": name}}}
            assert record_strings(e) == [name]  # the only string a site sends is its name
        for token in forbidden:
            assert f'"{token}"' not in text and (len(token) < 8 or token not in text), token

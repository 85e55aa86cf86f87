#!/usr/bin/env python3
"""Provision a secure fedpd deployment: a CA, the SuperLink's TLS certificate and one kit per site.

    python deploy/provision.py --out KIT --host fl.example.org --host 10.0.0.5 --site site-A --site site-B
    python deploy/provision.py --out KIT --add-site site-C

writes::

    KIT/coordinator/   stays with the coordinator (the SuperLink host)
        ca.crt ca.key            the CA (ca.key signs the SuperLink certificate; keep it here or offline)
        server.pem server.key    the SuperLink's TLS certificate (SANs: every --host, plus 127.0.0.1 and
                                 localhost for the SuperLink's own ServerApp runtime) and its key
        site-keys/<site>.pub     the sites' SuperNode public keys, registered by register-sites.sh
        start-superlink.sh register-sites.sh unregister-site.sh env.sh
        flwr-home/config.toml    flwr CLI connection "fedpd" (address + root-certificates)
        kit.json                 what was provisioned (address, hosts, sites)
    KIT/sites/<site>/  goes to that site, and only there
        ca.crt  <site>.key <site>.pub  node-config.toml  start-supernode.sh  README.txt

SuperNode keys are EC P-384 in OpenSSH format, as Flower 1.42 requires for SuperNode authentication
(FLOWER.md §4). Private keys are written with mode 0600. Everything is checked before anything is
written, and the files are built in a temporary folder and moved into place at the end, so bad input or
a crash leaves an existing kit untouched. An existing CA is never replaced without ``--force`` (the old
files are then moved to ``KIT/replaced-<time>-<random>/``, not deleted).

Standard library + ``cryptography`` only; nothing in the repository imports this file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_PORT = 9092
CA_DAYS = 3650  # the CA outlives several SuperLink certificates
CURVE = ec.SECP384R1
NIST_CURVES = {"secp256r1", "secp384r1", "secp521r1"}
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
LOOPBACK = ["127.0.0.1", "localhost"]  # the SuperLink's own SuperExec connects over loopback (FLOWER.md §4)
KEYGEN_FIX = 'make one with: ssh-keygen -t ecdsa -b 384 -N "" -f {name}.key'


class ProvisionError(Exception):
    """Bad input or a kit in the way; the message names the file or value and the fix."""


# ---------------------------------------------------------------------------------------------------
# Checks (all done before anything is written)

def check_site(name: str) -> str:
    if not SITE_RE.match(name):
        raise ProvisionError(f"site name {name!r} is not allowed: use 1-63 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit (it becomes a file name and the SuperNode name)")
    return name


def check_sites(sites: list[str]) -> None:
    for site in sites:
        check_site(site)
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise ProvisionError(f"site names given twice: {', '.join(dupes)}")


def check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProvisionError(f"--address {address!r}: write HOST:PORT, e.g. fl.example.org:{DEFAULT_PORT}")
    check_host(host.strip("[]"))
    return address


def check_host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if DNS_RE.match(host):
        return x509.DNSName(host.lower())
    raise ProvisionError(f"--host {host!r} is neither an IP address nor a DNS name; give the name or address "
                         "the sites will use to reach the SuperLink, e.g. --host fl.example.org --host 10.0.0.5")


def load_public_key(path: Path, site: str) -> bytes:
    """A site's own OpenSSH EC public key on a NIST curve, as Flower's ``supernode register`` accepts."""
    fix = KEYGEN_FIX.format(name=site)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ProvisionError(f"--public-key {site}={path}: cannot read it ({err.strerror}); {fix}") from err
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ProvisionError(f"{path} is not an OpenSSH public key ({err}); {fix} and pass {site}.key.pub") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise ProvisionError(f"{path} is a {kind} key; Flower needs an EC key on a NIST curve (P-256/384/521): {fix}")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" fedpd-{site}\n".encode()


# ---------------------------------------------------------------------------------------------------
# Key and certificate material

def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Create ``path`` with ``mode`` from the start (a private key is never readable by others, not even briefly)."""
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedpd federation CA")])
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.timezone.utc)
    sans = [check_host(h) for h in hosts]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpd"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_site_key(site: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) on P-384, like ``ssh-keygen -t ecdsa -b 384``."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" fedpd-{site}\n".encode()


# ---------------------------------------------------------------------------------------------------
# Kit folders

def _render(template: str, **values: str) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def write_site_kit(folder: Path, site: str, address: str, ca_pem: bytes, private: bytes | None, public: bytes) -> None:
    folder.mkdir(mode=0o700, parents=True)
    _write(folder / "ca.crt", ca_pem)
    if private is not None:
        _write(folder / f"{site}.key", private, 0o600)
    _write(folder / f"{site}.pub", public)
    values = {"SITE": site, "ADDRESS": address, "DATE": dt.date.today().isoformat()}
    _write(folder / "node-config.toml", _render("node-config.toml", **values))
    _write(folder / "start-supernode.sh", _render("start-supernode.sh", **values), 0o755)
    _write(folder / "README.txt", _render("site-README.txt", **values))


def write_coordinator(folder: Path, final: Path, address: str, port: int, hosts: list[str], days: int,
                      ) -> tuple[bytes, dict]:
    """The coordinator folder (``final`` is where it will live, for the absolute path in config.toml)."""
    folder.mkdir(mode=0o700, parents=True)
    ca_key, ca_cert = make_ca(days=CA_DAYS)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(folder / "ca.crt", ca_pem)
    _write(folder / "ca.key", _pem_private(ca_key), 0o600)
    _write(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / "server.key", _pem_private(server_key), 0o600)
    (folder / "site-keys").mkdir()
    values = {"ADDRESS": address, "PORT": str(port)}
    for script in ("start-superlink.sh", "register-sites.sh", "unregister-site.sh"):
        _write(folder / script, _render(script, **values), 0o755)
    _write(folder / "env.sh", _render("env.sh", **values))
    (folder / "flwr-home").mkdir()
    _write(folder / "flwr-home" / "config.toml",
           f'[superlink]\ndefault = "fedpd"\n\n[superlink.fedpd]\naddress = "{address}"\n'
           f'root-certificates = "{final / "ca.crt"}"\n')
    meta = {"address": address, "port": port, "hosts": hosts, "sites": [],
            "server_cert_expires": server_cert.not_valid_after_utc.date().isoformat()}
    return ca_pem, meta


def _site_material(sites: list[str], public_keys: dict[str, Path]) -> dict[str, tuple[bytes | None, bytes]]:
    return {s: ((None, load_public_key(public_keys[s], s)) if s in public_keys else make_site_key(s)) for s in sites}


def _parse_public_keys(items: list[str], sites: list[str]) -> dict[str, Path]:
    keys = {}
    for item in items:
        site, sep, path = item.partition("=")
        if not sep or site not in sites:
            raise ProvisionError(f"--public-key {item!r}: write SITE=PATH with SITE one of the sites given "
                                 f"({', '.join(sites)})")
        keys[site] = Path(path).expanduser()
    return keys


# ---------------------------------------------------------------------------------------------------
# The two commands

def provision(out: Path, hosts: list[str], sites: list[str], port: int, address: str | None, days: int,
              public_keys: list[str], force: bool) -> None:
    if not hosts:
        raise ProvisionError("give at least one --host: the name or IP address the sites use to reach the SuperLink")
    if not sites:
        raise ProvisionError("give at least one --site NAME (one per hospital)")
    check_sites(sites)
    if not 1 <= port <= 65535:
        raise ProvisionError(f"--port {port} is not a TCP port (1-65535)")
    for host in hosts:
        check_host(host)
    sans = list(dict.fromkeys(hosts + LOOPBACK))
    address = check_address(address) if address else f"{hosts[0]}:{port}"
    if days < 1:
        raise ProvisionError(f"--days {days}: the certificate must be valid for at least one day")
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"--out {out} is a file; give a folder (it is created if missing)")
    existing = [p for p in (out / "coordinator", out / "sites") if p.exists()]
    ca = out / "coordinator" / "ca.key"
    if existing and not force:
        what = f"{ca} exists (a CA was already provisioned here)" if ca.exists() else f"{existing[0]} exists"
        raise ProvisionError(f"{what}. To add a site to this kit: --add-site NAME. To start over with a new CA "
                             "(every site then needs its new kit), add --force: the old files move to "
                             f"{out}/replaced-<time>-*/")
    material = _site_material(sites, _parse_public_keys(public_keys, sites))

    out.mkdir(parents=True, exist_ok=True)
    final = out.resolve()
    with tempfile.TemporaryDirectory(dir=out, prefix=".provision-") as tmp:
        tmp = Path(tmp)
        ca_pem, meta = write_coordinator(tmp / "coordinator", final / "coordinator", address, port, sans, days)
        for site, (private, public) in material.items():
            write_site_kit(tmp / "sites" / site, site, address, ca_pem, private, public)
            _write(tmp / "coordinator" / "site-keys" / f"{site}.pub", public)
        meta["sites"] = sites
        _write(tmp / "coordinator" / "kit.json", json.dumps(meta, indent=2) + "\n")
        if existing:
            backup = Path(tempfile.mkdtemp(prefix=f"replaced-{dt.datetime.now():%Y%m%d-%H%M%S}-", dir=out))
            for path in existing:
                path.rename(backup / path.name)
            print(f"--force: the previous kit moved to {backup} (it holds private keys: delete it when sure)")
        (tmp / "coordinator").rename(out / "coordinator")
        (tmp / "sites").rename(out / "sites")
    print(f"CA and SuperLink certificate for {', '.join(sans)}; SuperLink address for the sites: {address}")
    _print_next_steps(out, sites)


def add_sites(out: Path, sites: list[str], public_keys: list[str]) -> None:
    coordinator = out / "coordinator"
    meta_path = coordinator / "kit.json"
    if not meta_path.is_file():
        raise ProvisionError(f"{meta_path} not found: --add-site needs a kit made by provision.py; "
                             f"give the same --out as then (or provision a new kit with --host and --site)")
    meta = json.loads(meta_path.read_text())
    check_sites(sites)
    for site in sites:
        for taken in (out / "sites" / site, coordinator / "site-keys" / f"{site}.pub",
                      coordinator / "site-keys" / "revoked" / f"{site}.pub"):
            if taken.exists():
                raise ProvisionError(f"{taken} exists: site {site!r} was already provisioned; choose another name "
                                     "(a revoked site gets a new kit under a new name)")
    material = _site_material(sites, _parse_public_keys(public_keys, sites))
    ca_pem = (coordinator / "ca.crt").read_bytes()
    with tempfile.TemporaryDirectory(dir=out, prefix=".provision-") as tmp:
        for site, (private, public) in material.items():
            write_site_kit(Path(tmp) / site, site, meta["address"], ca_pem, private, public)
        (out / "sites").mkdir(mode=0o700, exist_ok=True)
        for site, (_, public) in material.items():
            (Path(tmp) / site).rename(out / "sites" / site)
            _write(coordinator / "site-keys" / f"{site}.pub", public)
    meta["sites"] = meta["sites"] + sites
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_meta.replace(meta_path)
    _print_next_steps(out, sites)


def _print_next_steps(out: Path, sites: list[str]) -> None:
    print(f"Coordinator: {out / 'coordinator'} (keep it here; ca.key and server.key never leave it)")
    for site in sites:
        has_key = (out / "sites" / site / f"{site}.key").exists()
        note = "" if has_key else f" (no private key: the site puts its own {site}.key next to start-supernode.sh)"
        print(f"  kit for {site}: {out / 'sites' / site}{note}")
    print("Next: send each site its own kit folder over a secure channel, start the SuperLink with "
          f"{out / 'coordinator' / 'start-superlink.sh'}, then run "
          f"{out / 'coordinator' / 'register-sites.sh'} (deploy/README.md).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="provision.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See deploy/README.md for the whole procedure.")
    p.add_argument("--out", type=Path, required=True, help="kit folder (coordinator/ and sites/ go here)")
    p.add_argument("--host", action="append", default=[],
                   help="DNS name or IP address of the SuperLink as the sites reach it (repeatable); every one goes "
                        "into the certificate's SANs, the first one into the sites' SuperLink address")
    p.add_argument("--site", action="append", default=[], help="site name (repeatable), e.g. --site site-A")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"SuperLink port (default {DEFAULT_PORT})")
    p.add_argument("--address", help="SuperLink address host:port written into the kits (default: first --host and --port)")
    p.add_argument("--days", type=int, default=825, help="validity of the SuperLink certificate in days (default 825)")
    p.add_argument("--public-key", action="append", default=[], metavar="SITE=PATH",
                   help="use a public key the site made itself (OpenSSH EC, NIST curve) instead of generating its "
                        "key pair; the kit then holds no private key")
    p.add_argument("--add-site", action="append", default=[], metavar="NAME",
                   help="add a site kit to an existing kit folder (same CA and SuperLink address)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing CA and all kits (the old files are moved aside, not deleted)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.add_site:
            if args.site or args.host or args.force:
                raise ProvisionError("--add-site takes only --out and --public-key (the CA, hosts and address "
                                     "come from the existing kit)")
            add_sites(args.out, args.add_site, args.public_key)
        else:
            provision(args.out, args.host, args.site, args.port, args.address, args.days, args.public_key, args.force)
    except ProvisionError as err:
        print(f"provision.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

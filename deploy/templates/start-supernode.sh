#!/usr/bin/env bash
# fedpd SuperNode for site "@SITE@", provisioned by deploy/provision.py.
# Connects to the SuperLink over TLS (verified with this kit's ca.crt) and authenticates with this
# kit's private key @SITE@.key, unless --insecure is given.
#
# Usage: ./start-supernode.sh [--insecure] [--dry-run] [--help]
#   --insecure  plain HTTP, no authentication (a loud warning is printed; only for an insecure SuperLink)
#   --dry-run   check the kit and print the flower-supernode command, then exit
# Environment (all optional):
#   FEDPD_SUPERLINK        SuperLink address host:port (default @ADDRESS@)
#   FEDPD_NODE_CONFIG      node-config TOML with data-path and cache-dir (default <kit>/node-config.toml)
#   FEDPD_CA_CERT          CA certificate of the SuperLink (default <kit>/ca.crt; set it to an empty
#                          value to rely on the system trust store instead)
#   FEDPD_SUPERNODE_PORT   local port of this SuperNode's Runtime API on 127.0.0.1 (default 9094)
#   FEDPD_STATE_DIR        this SuperNode's working folder (default <kit>/state)
# Runs in the foreground; stop it with Ctrl-C or `kill -TERM <pid>`.
set -euo pipefail
KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="start-supernode.sh"
SITE="@SITE@"
die() { echo "$NAME: error: $*" >&2; exit 1; }
mode_of() { stat -c %a "$1" 2>/dev/null || stat -f %Lp "$1"; }  # GNU or BSD stat

insecure=0; dry_run=0
for arg in "$@"; do
  case "$arg" in
    --insecure) insecure=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "$NAME: unknown option '$arg' (valid: --insecure, --dry-run, --help)" >&2; exit 2 ;;
  esac
done

SUPERLINK="${FEDPD_SUPERLINK:-@ADDRESS@}"
NODE_CONFIG="${FEDPD_NODE_CONFIG:-$KIT/node-config.toml}"
CA_CERT="${FEDPD_CA_CERT-$KIT/ca.crt}"   # '-' not ':-': an empty value means "system trust store"
PORT="${FEDPD_SUPERNODE_PORT:-9094}"
STATE="${FEDPD_STATE_DIR:-$KIT/state}"
KEY="$KIT/$SITE.key"

command -v flower-supernode >/dev/null 2>&1 \
  || die "flower-supernode not found on PATH; activate the fedpd environment first (source /path/to/fedpd/.venv/bin/activate)"
case "$NODE_CONFIG" in *.toml) ;; *) die "FEDPD_NODE_CONFIG=$NODE_CONFIG must be a .toml file" ;; esac
[ -f "$NODE_CONFIG" ] || die "$NODE_CONFIG not found; copy node-config.toml from this kit and fill in data-path and cache-dir"
if grep -q "REPLACE-ME" "$NODE_CONFIG"; then
  die "$NODE_CONFIG still holds REPLACE-ME placeholders: set data-path to this site's manifest CSV and cache-dir to a writable folder"
fi

# The node-config is checked here, before anything connects, with the interpreter that runs Flower.
PY="$(dirname "$(command -v flower-supernode)")/python"
[ -x "$PY" ] || PY="python3"
"$PY" - "$NODE_CONFIG" <<'CHECK' || exit 1
import sys, tomllib
from pathlib import Path
path = sys.argv[1]
try:
    with open(path, "rb") as fh:
        cfg = tomllib.load(fh)
except tomllib.TOMLDecodeError as err:
    sys.exit(f"start-supernode.sh: error: {path} is not valid TOML ({err}); fix the line it names")
for key in ("data-path", "cache-dir"):
    if not str(cfg.get(key, "")).strip():
        sys.exit(f"start-supernode.sh: error: {path} has no {key}; add a line {key} = \"/absolute/path\"")
data = Path(str(cfg["data-path"])).expanduser()
if not data.is_file():
    sys.exit(f"start-supernode.sh: error: data-path {data} (in {path}) is not a file; point it at this site's manifest CSV")
if not data.is_absolute() or not Path(str(cfg["cache-dir"])).expanduser().is_absolute():
    sys.exit(f"start-supernode.sh: error: data-path and cache-dir in {path} must be absolute paths")
worker = str(cfg.get("site-worker", "true")).strip().lower()
if worker not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
    sys.exit(f"start-supernode.sh: error: site-worker = {cfg['site-worker']!r} in {path}: choose \"true\" (the default) or \"false\"")
try:
    idle = float(cfg.get("site-worker-idle", 900))
except (TypeError, ValueError):
    idle = -1.0
if not idle > 0:
    sys.exit(f"start-supernode.sh: error: site-worker-idle = {cfg['site-worker-idle']!r} in {path}: give seconds, a number > 0")
CHECK

args=()
if [ "$insecure" = 1 ]; then
  cat >&2 <<WARN
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: --insecure: TLS and SuperNode authentication are OFF for site $SITE.
!! Model weights and metrics travel in clear text and the SuperLink is not verified.
!! Use this only on 127.0.0.1 to try things out, never across a network.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARN
  args+=(--insecure)
else
  [ -f "$KEY" ] || die "private key $KEY not found; it is in the kit the coordinator sent (or the one you made with ssh-keygen)"
  case "$(mode_of "$KEY")" in *00) ;; *)
    die "$KEY can be read by other users; run: chmod 600 '$KEY'" ;;
  esac
  args+=(--auth-supernode-private-key "$KEY")
  if [ -n "$CA_CERT" ]; then
    [ -f "$CA_CERT" ] || die "CA certificate $CA_CERT not found; it is ca.crt in this kit"
    args+=(--root-certificates "$CA_CERT")
  else
    echo "$NAME: FEDPD_CA_CERT is empty: the SuperLink certificate is checked against the system trust store" >&2
  fi
fi

cmd=(flower-supernode --superlink "$SUPERLINK" --port "$PORT" --node-config "$NODE_CONFIG" "${args[@]}")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
mkdir -p "$STATE/flwr-home"
export FLWR_HOME="$STATE/flwr-home"
echo "$NAME: site $SITE -> SuperLink $SUPERLINK (local Runtime API 127.0.0.1:$PORT)" >&2
exec "${cmd[@]}"

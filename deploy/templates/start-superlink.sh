#!/usr/bin/env bash
# fedpd SuperLink (coordinator), provisioned by deploy/provision.py for @ADDRESS@.
# TLS with this kit's certificate and SuperNode authentication are on unless --insecure is given.
#
# Usage: ./start-superlink.sh [--insecure] [--dry-run] [--help]
#   --insecure  plain HTTP and no SuperNode authentication (a loud warning is printed; 127.0.0.1 only)
#   --dry-run   print the flower-superlink command and exit
# Environment (all optional):
#   FEDPD_SUPERLINK_HOST  interface to listen on (default 0.0.0.0; 127.0.0.1 with --insecure)
#   FEDPD_SUPERLINK_PORT  TCP port of all SuperLink APIs (default @PORT@)
#   FEDPD_STATE_DIR       SuperLink database and working folder (default <this folder>/state)
# Runs in the foreground; stop it with Ctrl-C or `kill -TERM <pid>`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="start-superlink.sh"
die() { echo "$NAME: error: $*" >&2; exit 1; }
mode_of() { stat -c %a "$1" 2>/dev/null || stat -f %Lp "$1"; }  # GNU or BSD stat

insecure=0; dry_run=0
for arg in "$@"; do
  case "$arg" in
    --insecure) insecure=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "$NAME: unknown option '$arg' (valid: --insecure, --dry-run, --help)" >&2; exit 2 ;;
  esac
done

if [ "$insecure" = 1 ]; then HOST="${FEDPD_SUPERLINK_HOST:-127.0.0.1}"; else HOST="${FEDPD_SUPERLINK_HOST:-0.0.0.0}"; fi
PORT="${FEDPD_SUPERLINK_PORT:-@PORT@}"
STATE="${FEDPD_STATE_DIR:-$HERE/state}"

command -v flower-superlink >/dev/null 2>&1 \
  || die "flower-superlink not found on PATH; activate the fedpd environment first (source /path/to/fedpd/.venv/bin/activate)"

cmd=(flower-superlink --host "$HOST" --port "$PORT" --database "$STATE/state.db" --disable-runtime-dependency-installation)
if [ "$insecure" = 1 ]; then
  cat >&2 <<WARN
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: --insecure: TLS and SuperNode authentication are OFF.
!! Model weights and metrics travel in clear text, and any machine that reaches port $PORT can
!! join the federation. Use this only on 127.0.0.1 to try things out, never across a network.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARN
  cmd+=(--insecure)
else
  for f in ca.crt server.pem server.key; do
    [ -f "$HERE/$f" ] || die "$HERE/$f not found; this folder must be the coordinator/ folder made by deploy/provision.py"
  done
  case "$(mode_of "$HERE/server.key")" in *00) ;; *)
    die "$HERE/server.key can be read by other users; run: chmod 600 '$HERE/server.key'" ;;
  esac
  cmd+=(--ssl-ca-certfile "$HERE/ca.crt" --ssl-certfile "$HERE/server.pem" --ssl-keyfile "$HERE/server.key"
        --enable-supernode-auth)
fi

if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
mkdir -p "$STATE/flwr-home"
export FLWR_HOME="$STATE/flwr-home"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
echo "$NAME: SuperLink on $HOST:$PORT, state in $STATE" >&2
exec "${cmd[@]}"

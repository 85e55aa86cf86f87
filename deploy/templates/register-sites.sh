#!/usr/bin/env bash
# Register sites' SuperNode public keys with the running SuperLink (Flower 1.42: `flwr supernode
# register <key.pub> <connection> --name <site>` through the Control API). Provisioned by
# deploy/provision.py. Only registered keys can join: any other SuperNode is refused (HTTP 412).
#
# Usage: ./register-sites.sh [SITE...]     (default: every site-keys/<site>.pub)
# Safe to run again: a site whose recorded node id the SuperLink still knows is skipped.
# Node ids are recorded in registered-sites.tsv (site<TAB>node-id), used by unregister-site.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="register-sites.sh"
die() { echo "$NAME: error: $*" >&2; exit 1; }
case "${1:-}" in -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
# shellcheck source=/dev/null
source "$HERE/env.sh"
REG="$HERE/registered-sites.tsv"
command -v flwr >/dev/null 2>&1 || die "flwr not found on PATH; activate the fedpd environment first"
PY="$(dirname "$(command -v flwr)")/python"; [ -x "$PY" ] || PY="python3"

# Read the JSON answer of a `flwr ... --format json` call on stdin; print what $1 selects, or exit 1
# with Flower's error message.
read_answer() {
  "$PY" -c '
import json, sys
text = sys.stdin.read()
try:
    answer = json.loads(text[text.index("{"):])
except ValueError:
    sys.exit(text.strip())
if not answer.get("success"):
    sys.exit(answer.get("error-message", text).strip())
if sys.argv[1] == "node-id":
    print(answer["node-id"])
else:  # ids of the nodes the SuperLink knows and has not unregistered
    print(" ".join(n["node-id"] for n in answer["nodes"] if n.get("status") not in ("unregistered", "deleted")))
' "$1" 2>&1
}
recorded() { awk -F '\t' -v s="$1" '$1 == s {id = $2} END {print id}' "$REG"; }

sites=("$@")
if [ ${#sites[@]} -eq 0 ]; then
  for pub in "$HERE"/site-keys/*.pub; do [ -f "$pub" ] && sites+=("$(basename "$pub" .pub)"); done
fi
[ ${#sites[@]} -gt 0 ] || die "no site keys in $HERE/site-keys/; add a site with: python deploy/provision.py --out <kit> --add-site NAME"
for site in "${sites[@]}"; do
  [ -f "$HERE/site-keys/$site.pub" ] \
    || die "no public key $HERE/site-keys/$site.pub; add the site first: python deploy/provision.py --out <kit> --add-site $site"
done
touch "$REG"

# Ask the SuperLink which nodes it knows only if one of these sites was registered before.
known=""
for site in "${sites[@]}"; do
  if [ -n "$(recorded "$site")" ]; then
    if ! known="$(flwr supernode list fedpd --format json 2>&1 | read_answer nodes)"; then
      die "cannot list the SuperNodes of the SuperLink at $FEDPD_SUPERLINK_ADDRESS (is start-superlink.sh running?): $known"
    fi
    break
  fi
done

for site in "${sites[@]}"; do
  id="$(recorded "$site")"
  if [ -n "$id" ] && [[ " $known " == *" $id "* ]]; then
    echo "$site: already registered as SuperNode $id"
    continue
  fi
  if ! id="$(flwr supernode register "$HERE/site-keys/$site.pub" fedpd --name "$site" --format json 2>&1 \
             | read_answer node-id)"; then
    hint=""
    [[ "$id" == *"already in use"* ]] && hint="
(a key that was registered once, even if unregistered since, cannot be registered again: give the site a new kit with provision.py --add-site NEWNAME)"
    [[ "$id" == *"unavailable"* ]] && hint="
(is start-superlink.sh running, and is $FEDPD_SUPERLINK_ADDRESS right?)"
    die "registering $site failed: $id$hint"
  fi
  printf '%s\t%s\n' "$site" "$id" >> "$REG"
  echo "$site: registered as SuperNode $id"
done

#!/usr/bin/env bash
# Revoke a site: unregister its SuperNode from the running SuperLink (`flwr supernode unregister
# <node-id> fedpd`). Its key can no longer join; its public key moves to site-keys/revoked/.
# Provisioned by deploy/provision.py.
#
# Usage: ./unregister-site.sh SITE
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="unregister-site.sh"
die() { echo "$NAME: error: $*" >&2; exit 1; }
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; "") usage >&2; exit 2 ;; esac
[ $# -eq 1 ] || die "give exactly one site name"
site="$1"
# shellcheck source=/dev/null
source "$HERE/env.sh"
REG="$HERE/registered-sites.tsv"
command -v flwr >/dev/null 2>&1 || die "flwr not found on PATH; activate the fedpd environment first"
id="$( [ -f "$REG" ] && awk -F '\t' -v s="$site" '$1 == s {id = $2} END {print id}' "$REG" )" || true
[ -n "$id" ] || die "$site is not in $REG; list the SuperLink's nodes with: source $HERE/env.sh && flwr supernode list fedpd, then run: flwr supernode unregister <node-id> fedpd"
if ! out="$(flwr supernode unregister "$id" fedpd 2>&1)"; then
  die "unregistering $site (SuperNode $id) failed:
$out"
fi
awk -F '\t' -v s="$site" '$1 != s' "$REG" > "$REG.tmp" && mv "$REG.tmp" "$REG"
if [ -f "$HERE/site-keys/$site.pub" ]; then
  mkdir -p "$HERE/site-keys/revoked"
  mv "$HERE/site-keys/$site.pub" "$HERE/site-keys/revoked/$site.pub"
fi
echo "$site: SuperNode $id unregistered; it can no longer connect"

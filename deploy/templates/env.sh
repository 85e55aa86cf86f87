# fedpd coordinator environment, provisioned by deploy/provision.py. Source it, do not run it:
#   source /path/to/coordinator/env.sh
# It points the flwr CLI at this kit (FLWR_HOME=<this folder>/flwr-home) and (re)writes the
# connection "fedpd" in $FLWR_HOME/config.toml: SuperLink @ADDRESS@, verified with this kit's ca.crt.
# Environment (optional): FEDPD_SUPERLINK_ADDRESS (default @ADDRESS@);
#   FEDPD_INSECURE=1 for a SuperLink started with --insecure.
FEDPD_COORDINATOR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export FLWR_HOME="$FEDPD_COORDINATOR/flwr-home"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
FEDPD_SUPERLINK_ADDRESS="${FEDPD_SUPERLINK_ADDRESS:-@ADDRESS@}"
mkdir -p "$FLWR_HOME"
{
  echo "# Written by $FEDPD_COORDINATOR/env.sh each time it is sourced; to change it set FEDPD_SUPERLINK_ADDRESS or FEDPD_INSECURE=1 before sourcing."
  echo "[superlink]"
  echo "default = \"fedpd\""
  echo
  echo "[superlink.fedpd]"
  echo "address = \"$FEDPD_SUPERLINK_ADDRESS\""
  if [ "${FEDPD_INSECURE:-0}" = 1 ]; then
    echo "insecure = true"
  else
    echo "root-certificates = \"$FEDPD_COORDINATOR/ca.crt\""
  fi
} > "$FLWR_HOME/config.toml"

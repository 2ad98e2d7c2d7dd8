#!/usr/bin/env bash
# Start this device's SuperNode (a Raspberry Pi or any Linux machine) for a fedrnn fleet.
#
#   SUPERLINK=superlink.lan:9093 clients/run_supernode.sh
#
# Reads (override with environment variables):
#   FEDRNN_HOME  ~/.fedrnn            where this device keeps its files
#   CA           $FEDRNN_HOME/ca.crt  the fleet's CA certificate (copied from the server)
#   KEY          $FEDRNN_HOME/node_key  this device's private key (its .pub is registered on the server)
#   NODE_CONFIG  $FEDRNN_HOME/node.toml  data-path, teacher-path, state-dir (see clients/README.md)
#   RUNTIME_PORT 9094                 local port between the SuperNode and its ClientApp processes
# Extra arguments are passed on to flower-supernode.
set -euo pipefail

FEDRNN_HOME=${FEDRNN_HOME:-$HOME/.fedrnn}
CA=${CA:-$FEDRNN_HOME/ca.crt}
KEY=${KEY:-$FEDRNN_HOME/node_key}
NODE_CONFIG=${NODE_CONFIG:-$FEDRNN_HOME/node.toml}
RUNTIME_PORT=${RUNTIME_PORT:-9094}
: "${SUPERLINK:?set SUPERLINK to the host:port of the SuperLink}"

for f in "$CA" "$KEY" "$NODE_CONFIG"; do
    if [[ ! -f "$f" ]]; then
        echo "run_supernode.sh: $f is missing (see clients/README.md)" >&2
        exit 2
    fi
done

exec flower-supernode \
    --superlink "$SUPERLINK" \
    --root-certificates "$CA" \
    --auth-supernode-private-key "$KEY" \
    --node-config "$NODE_CONFIG" \
    --host 127.0.0.1 --port "$RUNTIME_PORT" \
    "$@"

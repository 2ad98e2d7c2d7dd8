#!/usr/bin/env bash
# Start the SuperLink for a real fleet (Flower 1.42 Deployment Engine).
#
#   server/run_superlink.sh                       # 0.0.0.0:9093, certs in server/certs
#   HOST=127.0.0.1 PORT=9100 server/run_superlink.sh
#
# TLS is on (certificates from `python -m server.certs tls`), SuperNode authentication is on
# (only public keys registered with `flwr supernode register` may connect), and the link
# state lives in a SQLite file, so registered devices survive a SuperLink restart.
# The one port serves the Fleet API (devices), the Control API (`flwr run/ls/log`) and the
# ServerApp runtime. The ServerApp runs in a subprocess of this one with its working
# directory, so a relative `run-dir` (default runs/deployment) is relative to where this
# script is started. Extra arguments are passed on to flower-superlink.
set -euo pipefail

CERTS=${CERTS:-server/certs}
STATE=${STATE:-server/state}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-9093}

for f in ca.crt server.pem server.key; do
    if [[ ! -f "$CERTS/$f" ]]; then
        echo "run_superlink.sh: $CERTS/$f is missing; make certificates first:" >&2
        echo "  python -m server.certs tls --out $CERTS --host <name or IP devices use>" >&2
        exit 2
    fi
done
mkdir -p "$STATE"

# No runtime `uv sync` of the app's dependencies: this environment already has them, and
# resolving `torch` from PyPI would pull a multi-GB CUDA build.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# One intra-op thread per process unless told otherwise (see the README on shared CPUs).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec flower-superlink \
    --ssl-ca-certfile "$CERTS/ca.crt" \
    --ssl-certfile "$CERTS/server.pem" \
    --ssl-keyfile "$CERTS/server.key" \
    --enable-supernode-auth \
    --database "$STATE/superlink.db" \
    --host "$HOST" --port "$PORT" \
    --disable-runtime-dependency-installation \
    "$@"

#!/usr/bin/env bash
# `flwr run .` in Flower's Ray simulation, on a local SuperLink that this script starts and
# stops by PID (on success, failure or Ctrl-C alike).
#
#   simulations/flwr_run.sh [NUM_SUPERNODES] [flwr run options...]
#   simulations/flwr_run.sh 10 --run-config "num-server-rounds=5 target-density=0.1"
#
# Flower state stays inside the project (FLWR_HOME=.flwr), `flwr run` never installs the app's
# dependencies into a fresh environment (it uses .venv), and pyproject.toml is never rewritten.
# The run's results land in results/<run-name>/ (rounds.csv, summary.json, model.npz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

num_supernodes=10
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  num_supernodes=$1
  shift
fi

export PATH="$PWD/.venv/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0  # no calls out
command -v curl >/dev/null || { echo "error: curl is needed to wait for the SuperLink" >&2; exit 2; }
if [[ ! -x .venv/bin/flwr ]]; then
  echo "error: .venv is missing; run 'make demo' (or 'make venv') first" >&2
  exit 2
fi

# A free loopback port for the SuperLink's HTTP API; the flwr CLI reads the same variables.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$port FLWR_LOCAL_CONTROL_API_PORT=$port
mkdir -p "$FLWR_HOME/local-superlink"
log="$FLWR_HOME/local-superlink/superlink-$port.log"

# setsid: the SuperLink and the simulation processes it spawns form one process group.
setsid flower-superlink --insecure --simulation --isolation subprocess \
  --host 127.0.0.1 --port "$port" --log-file "$log" >/dev/null 2>&1 &
pid=$!
stop() {
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
}
trap stop EXIT INT TERM

healthy() { curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; }
for _ in $(seq 150); do
  healthy && break
  kill -0 "$pid" 2>/dev/null || { echo "error: SuperLink exited; see $log" >&2; exit 1; }
  sleep 0.2
done
healthy || { echo "error: SuperLink not healthy after 30 s; see $log" >&2; exit 1; }

flwr run . local --stream --federation-config "num-supernodes=$num_supernodes" "$@"

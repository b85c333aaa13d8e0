#!/usr/bin/env bash
# `flwr run .` in Flower's Ray simulation with N virtual SuperNodes, on a local SuperLink that is
# started here and stopped by PID afterwards (success, failure or Ctrl-C alike). Its database is
# the one Flower's managed local SuperLink uses, so `flwr list` / `flwr log <run-id>` show the
# run later. The process code is simulations/local_superlink.py.
#
#   simulations/flwr_run.sh [NUM_SUPERNODES] [flwr run options...]
#   simulations/flwr_run.sh 10 --run-config "num-server-rounds=5 target-density=0.1"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
num_supernodes=10
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  num_supernodes=$1
  shift
fi
python=.venv/bin/python
[[ -x $python ]] || python=python3  # e.g. another activated virtualenv with the project
exec "$python" -m simulations.local_superlink run "$num_supernodes" "$@"

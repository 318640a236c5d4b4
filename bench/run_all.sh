#!/usr/bin/env bash
# Runs every benchmark with its default arguments (about 30-40 minutes on 2 CPU cores), or with
# --quick (a smoke run of a few minutes). Each prints its table and writes bench/results/NAME.json.
#   bash bench/run_all.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for name in train_throughput dit_step jvp_cost autoencoder conv_backward sampling scheduler_overhead efficiency compile_cost quality oracle_table speed_options rng fsdp; do
  echo "=== bench/${name}.py $* (load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))"
  "$PY" "bench/${name}.py" "$@"
done

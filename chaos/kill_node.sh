#!/usr/bin/env bash
# kill -9 one node of a running cluster (started with `ragfleet up` or `ragfleet node`), watch
# the cluster keep answering, then restart it and watch it catch up.
# usage: chaos/kill_node.sh cluster.toml n3 "a query"
set -euo pipefail
cfg=${1:?cluster.toml}; node=${2:?node name}; query=${3:-"what is ownership"}
bin=${RAGFLEET:-ragfleet}
pid=$(pgrep -f -- "node --config $cfg --node $node" | head -n1) || { echo "node $node not running" >&2; exit 1; }
kill -9 "$pid"; echo "killed $node (pid $pid)"
for i in 1 2 3 4 5; do
  "$bin" retrieve --config "$cfg" --json "$query" | python3 -c 'import json,sys; c=json.load(sys.stdin)["coverage"]; print("coverage", c["shards_answered"], "/", c["shards_total"], c["left_out"])'
  sleep 1
done
"$bin" status --config "$cfg"

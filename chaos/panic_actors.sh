#!/usr/bin/env bash
# Make every actor of a role panic on one node, repeatedly: supervisors restart them, and past
# the restart intensity the failure escalates (see the node's log).
# usage: chaos/panic_actors.sh cluster.toml embedder n2 [times]
set -euo pipefail
cfg=${1:?cluster.toml}; group=${2:?group}; node=${3:?node}; times=${4:-1}
bin=${RAGFLEET:-ragfleet}
for i in $(seq "$times"); do
  "$bin" chaos --config "$cfg" --group "$group" --node "$node" --action panic || true
  sleep 0.5
done
"$bin" status --config "$cfg"

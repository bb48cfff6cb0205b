#!/usr/bin/env bash
# SIGSTOP one node for a while: queries keep answering within the shard deadline (its replicas
# are failed over, then suspected); SIGCONT brings it back.
# usage: chaos/freeze_node.sh cluster.toml n3 [seconds]
set -euo pipefail
cfg=${1:?cluster.toml}; node=${2:?node name}; secs=${3:-5}
bin=${RAGFLEET:-ragfleet}
pid=$(pgrep -f -- "node --config $cfg --node $node" | head -n1) || { echo "node $node not running" >&2; exit 1; }
kill -STOP "$pid"; echo "froze $node"
end=$((SECONDS + secs))
while [ $SECONDS -lt $end ]; do
  /usr/bin/time -f "%e s" "$bin" retrieve --config "$cfg" --json "what is a trait object" >/dev/null
done
"$bin" status --config "$cfg"
kill -CONT "$pid"; echo "thawed $node"

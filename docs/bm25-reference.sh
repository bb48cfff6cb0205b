#!/usr/bin/env bash
# The shard's BM25 beside tantivy (Lucene's design in Rust: block-max WAND, exact top 10) on the
# same texts and queries, one core each, rounds alternating: `bm25_probe` times the shard's whole
# search (hits built), `docs/bm25-reference` tantivy's search for ten document numbers.
#
#   docs/bm25-reference.sh WORK [TEXTS.jsonl QUERIES.json]
#
# Without TEXTS, `bench shard`'s texts (twelve words of a Zipf vocabulary) and three-word queries,
# as `bm25_probe` makes them. SIZES (default 100000,1000000) and ROUNDS (default 2) change the
# run. Real sentences: `docs/real-sentences.sh`, then each line of its lines.txt as
# {"text": ...} for TEXTS and its last 1,000 lines as a JSON list for QUERIES.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:?usage: docs/bm25-reference.sh WORK [TEXTS.jsonl QUERIES.json]}
texts=${2:-}
queries=${3:-}
sizes=${SIZES:-100000,1000000}
rounds=${ROUNDS:-2}
mkdir -p "$work"
work=$(cd "$work" && pwd)
(cd "$root" && cargo build --release -q -p ragfleet-index --example bm25_probe)
probe=$root/target/release/examples/bm25_probe
CARGO_TARGET_DIR=$work/target cargo build --release -q --manifest-path "$root/docs/bm25-reference/Cargo.toml"
reference=$work/target/release/bm25-reference
largest=$(tr ',' '\n' <<<"$sizes" | sort -n | tail -1)
if [ -z "$texts" ]; then
    # the probe's own texts and queries, written out as it makes them at the largest size
    texts=$work/zipf.jsonl
    queries=$work/zipf.q.json
    if [ ! -s "$queries" ]; then
        rm -rf "$texts" "$work/shard-$largest"
        BM25_PROBE_DUMP=$work/zipf "$probe" "$largest" "$work/shard-$largest" 1 >/dev/null
    fi
fi
for round in $(seq "$rounds"); do
    for n in ${sizes//,/ }; do
        ours=$(BM25_PROBE_TEXTS=$texts BM25_PROBE_QUERIES=$queries "$probe" "$n" "$work/shard-$n" 1 | grep '^BM25:')
        echo "round $round, $n texts: ragfleet $ours"
        echo "round $round, $n texts: $("$reference" "$n" "$texts" "$queries" "$work/tantivy")"
    done
done

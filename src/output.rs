//! How results print: human-readable text, or the JSON contract of `--json`.
use ragfleet_proto::RetrieveResult;

pub(crate) fn print_retrieval(r: &RetrieveResult) {
    for (i, h) in r.hits.iter().enumerate() {
        let text: String = h.text.chars().take(160).collect();
        println!(
            "{:>2}. {:.4}  {}  {}",
            i + 1,
            h.score,
            h.chunk_id,
            text.replace('\n', " ")
        );
    }
    print_coverage(&r.coverage);
    if let Some(x) = &r.rerank {
        println!("rerank: {x}");
    }
    if let Some(x) = &r.degraded {
        println!("degraded: {x}");
    }
    let t = &r.timings_ms;
    println!(
        "timings: embed {:.1} ms, search {:.1} ms, rerank {:.1} ms, total {:.1} ms",
        t.embed, t.search, t.rerank, t.total
    );
}

pub(crate) fn print_coverage(c: &ragfleet_proto::Coverage) {
    print!("coverage: {}/{} shards", c.shards_answered, c.shards_total);
    for l in &c.left_out {
        print!(" (shard {} left out: {})", l.shard, l.reason);
    }
    println!();
}

pub(crate) use ragfleet_gateway::retrieval_json;

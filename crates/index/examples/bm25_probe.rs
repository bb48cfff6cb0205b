//! BM25 search time on one shard as an idle replica serves it: `cargo run --release -p
//! ragfleet-index --example bm25_probe -- N DIR [ROUNDS]` writes N one-chunk documents with
//! `bench shard`'s texts (twelve words of a Zipf vocabulary of 20,000) into the shard in DIR
//! (opened, or made; 8-d vectors, so that its graphs cost little), in batches of 2,048 with
//! background graphs and merges (segments of 2,048, an idle time of 1 s), waits until it is
//! settled, then times 1,000 queries of three Zipf words ROUNDS times (default 3): p50, p99,
//! mean, and a digest of the answers (ids and scores), equal between two builds that answer
//! the same. Run again with a larger N, it adds the documents after those the folder holds
//! (batch `b`'s texts are drawn from seed `b`, so the first N are the same for every N).
//! `BM25_PROBE_SHOW=1` also prints the queries at ten ranks of each round's times (fastest,
//! quartiles, ..., slowest); `BM25_PROBE_QUERY="t1 t2"` asks that one query 1,000 times.
//! `BM25_PROBE_TEXTS=a.jsonl,b.jsonl` takes the documents' texts from those files instead (one
//! JSON object with a `text` a line, the files one after the other: the first N lines), and
//! `BM25_PROBE_QUERIES=q.json` the queries (a JSON list of strings, repeated to 1,000).
//! `BM25_PROBE_DUMP=PREFIX` writes the texts it adds (`PREFIX.jsonl`, appended to) and the
//! queries it asks (`PREFIX.q.json`), for a reference engine to be timed on the same ones.
//! `BM25_PROBE_TIMES=FILE` writes the last round's time of each query (ms, a JSON list in the
//! queries' order), to be set beside a reference engine's query by query.
use ragfleet_index::eval::{settle, synthetic_model, upserts_from, Zipf};
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{SearchMode, SearchQuery};
use rand::SeedableRng;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

const DIM: usize = 8;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().ok_or("N documents")?.parse()?;
    let dir = std::path::PathBuf::from(args.next().ok_or("a shard folder DIR")?);
    let rounds: usize = args.next().map_or(Ok(3), |e| e.parse())?;
    let settings = IndexSettings {
        segment_size: 2048,
        background: true,
        seal_idle: Some(Duration::from_secs(1)),
        ..IndexSettings::default()
    };
    let (mut ix, _) = ShardIndex::open(&dir, settings)?;
    let zipf = Zipf::new(20_000);
    let given: Option<Vec<String>> = match std::env::var("BM25_PROBE_TEXTS") {
        Ok(files) => {
            let mut texts = Vec::new();
            for f in files.split(',') {
                for line in std::fs::read_to_string(f)?.lines() {
                    let v: serde_json::Value = serde_json::from_str(line)?;
                    texts.push(
                        v["text"]
                            .as_str()
                            .ok_or("a line without a text")?
                            .to_string(),
                    );
                }
            }
            if texts.len() < n {
                return Err(format!("{} texts, fewer than {n}", texts.len()).into());
            }
            Some(texts)
        }
        Err(_) => None,
    };
    let dump = std::env::var("BM25_PROBE_DUMP").ok();
    let mut dumped = match &dump {
        Some(prefix) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(format!("{prefix}.jsonl"))?,
        ),
        None => None,
    };
    let have = ix.doc_count() as usize;
    if have < n {
        if given.is_none() && !have.is_multiple_of(2048) {
            return Err(format!("the shard holds {have} documents, not whole batches").into());
        }
        let t = Instant::now();
        for start in (have..n).step_by(2048) {
            let end = (start + 2048).min(n);
            let mut rng = rand::rngs::StdRng::seed_from_u64((start / 2048) as u64);
            let texts: Vec<String> = match &given {
                Some(t) => t[start..end].to_vec(),
                None => (start..end).map(|_| zipf.text(&mut rng)).collect(),
            };
            let vectors: Vec<Vec<f32>> = (start..end)
                .map(|i| {
                    let mut v = vec![0.0f32; DIM];
                    v[i % DIM] = 1.0;
                    v
                })
                .collect();
            if let Some(f) = &mut dumped {
                use std::io::Write;
                for t in &texts {
                    writeln!(f, "{}", serde_json::json!({ "text": t }))?;
                }
            }
            let ops = upserts_from(start, vectors, |i| texts[i - start].clone());
            ix.write(ops, &synthetic_model(DIM))?;
            ix.maintain()?;
        }
        println!("written in {:.1} s", t.elapsed().as_secs_f64());
    }
    let settled = settle(&mut ix, Duration::from_millis(1500))?;
    println!(
        "{} documents, segments {:?}, growing {}, settled in {:.1} s",
        ix.doc_count(),
        ix.segment_stats(),
        ix.growing_chunks(),
        settled.as_secs_f64()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::MAX);
    let one = std::env::var("BM25_PROBE_QUERY").ok();
    let listed: Option<Vec<String>> = match std::env::var("BM25_PROBE_QUERIES") {
        Ok(f) => Some(serde_json::from_str::<Vec<String>>(
            &std::fs::read_to_string(f)?,
        )?)
        .filter(|l| !l.is_empty()),
        Err(_) => None,
    };
    let qs: Vec<SearchQuery> = (0..1000)
        .map(|i| SearchQuery {
            vector: Vec::new(),
            text: listed
                .as_ref()
                .map(|l| l[i % l.len()].clone())
                .or(one.clone())
                .unwrap_or_else(|| {
                    (0..3)
                        .map(|_| zipf.word(&mut rng))
                        .collect::<Vec<_>>()
                        .join(" ")
                }),
            k: 10,
            mode: SearchMode::Bm25,
            model: None,
        })
        .collect();
    if let Some(prefix) = &dump {
        let texts: Vec<&str> = qs.iter().map(|q| q.text.as_str()).collect();
        std::fs::write(format!("{prefix}.q.json"), serde_json::to_string(&texts)?)?;
    }
    let show = std::env::var("BM25_PROBE_SHOW").is_ok();
    let times = std::env::var("BM25_PROBE_TIMES").ok();
    for _ in 0..rounds {
        let mut ts = Vec::new();
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        for q in &qs {
            let s = Instant::now();
            let hits = ix.search(q)?;
            ts.push(s.elapsed().as_secs_f64() * 1e3);
            for h in hits {
                h.chunk_id.hash(&mut digest);
                h.score.to_bits().hash(&mut digest);
            }
        }
        if let Some(f) = &times {
            std::fs::write(f, serde_json::to_string(&ts)?)?;
        }
        if show {
            let mut by: Vec<(f64, &str)> = ts
                .iter()
                .copied()
                .zip(qs.iter().map(|q| q.text.as_str()))
                .collect();
            by.sort_by(|a, b| a.0.total_cmp(&b.0));
            for i in [0, 250, 500, 750, 900, 950, 980, 990, 995, 999] {
                println!("  {:.4} ms: {}", by[i].0, by[i].1);
            }
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        println!(
            "BM25: p50 {:.4} ms p99 {:.4} mean {:.4}, answers' digest {:016x}",
            ts[ts.len() / 2],
            ts[ts.len() * 99 / 100],
            ts.iter().sum::<f64>() / ts.len() as f64,
            digest.finish()
        );
    }
    // the growing segment's index and what the searches made (long lists' tiers)
    println!(
        "BM25 in memory after the searches: {:.1} MB",
        ix.memory_bytes().1 as f64 / 1e6
    );
    Ok(())
}

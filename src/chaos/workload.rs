//! The steady workload a run drives through the client while faults happen.
use super::run::*;

/// A document of this run: a unique marker token (`zq<seed>x<n>v<version>`), so BM25 finds it
/// and its content shows which write it came from.
pub(super) fn doc(seed: u64, n: u64, version: u64, rng: &mut rand::rngs::StdRng) -> Document {
    const WORDS: [&str; 12] = [
        "replica", "shard", "ledger", "harbour", "lantern", "orchard", "granite", "meadow",
        "signal", "quarry", "beacon", "thicket",
    ];
    let filler: Vec<&str> = (0..8)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect();
    Document {
        id: format!("chaos-{seed}-{n}"),
        title: String::new(),
        text: format!(
            "Record zq{seed}x{n} version v{version}: {}.",
            filler.join(" ")
        ),
    }
}

/// The number of a run's document id (`chaos-SEED-N`).
fn doc_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// The steady workload: retrievals at a rate, ingests of new documents, rewrites and deletes of
/// acknowledged ones, until the run stops.
pub(super) async fn workload(
    client: Arc<Client>,
    shared: Arc<Shared>,
    w: super::plan::Workload,
    seed: u64,
    json: bool,
) {
    let querier = {
        let (client, shared) = (client.clone(), shared.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37);
            let every = Duration::from_secs_f64(1.0 / w.retrieve_per_s.max(0.01));
            let mut next = Instant::now();
            while !shared.stopped() {
                next += every;
                let known = shared.ledger.lock().expect("ledger").live_ids();
                let (q, mode) = if !known.is_empty() && rng.gen_bool(0.7) {
                    let id = &known[rng.gen_range(0..known.len())];
                    (format!("zq{seed}x{}", doc_number(id)), SearchMode::Bm25)
                } else {
                    (
                        "which replica holds the ledger".to_string(),
                        SearchMode::Dense,
                    )
                };
                let opts = RetrieveOptions {
                    k: Some(5),
                    mode: Some(mode),
                    rerank: None,
                    deadline_ms: None,
                    ..RetrieveOptions::default()
                };
                let start_ms = shared.now_ms();
                let r = client.retrieve(&q, opts).await;
                let end_ms = shared.now_ms();
                let rec = match r {
                    Ok(r) => QueryRecord {
                        start_ms,
                        end_ms,
                        coordinator: r.coordinator.clone(),
                        left_out: Some(
                            r.coverage
                                .left_out
                                .iter()
                                .map(|l| (l.shard, l.reason.clone()))
                                .collect(),
                        ),
                        error: None,
                    },
                    Err(e) => {
                        shared.note(format!("query failed: {e}"), json);
                        QueryRecord {
                            start_ms,
                            end_ms,
                            coordinator: String::new(),
                            left_out: None,
                            error: Some(e.to_string()),
                        }
                    }
                };
                shared.queries.lock().expect("q").push(rec);
                tokio::time::sleep_until(next.into()).await;
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x1b9e57);
    let mut n: u64 = 8; // the seed corpus took 0..8
    let mut tick: usize = 0;
    let every = Duration::from_millis(w.ingest_every_ms);
    let mut next = Instant::now();
    while !shared.stopped() {
        next += every;
        tick += 1;
        let mut docs: Vec<Document> = (0..w.ingest_batch as u64)
            .map(|i| doc(seed, n + i, 0, &mut rng))
            .collect();
        n += w.ingest_batch as u64;
        let known = shared.ledger.lock().expect("ledger").live_ids();
        if w.update_every > 0 && tick.is_multiple_of(w.update_every) && !known.is_empty() {
            let id = &known[rng.gen_range(0..known.len())];
            docs.push(doc(seed, doc_number(id), tick as u64, &mut rng));
        }
        let r = client.ingest(docs.clone()).await;
        {
            let mut l = shared.ledger.lock().expect("ledger");
            let failed: HashSet<String> = match &r {
                Ok(r) => r.failed.iter().map(|f| f.0.clone()).collect(),
                Err(_) => docs.iter().map(|d| d.id.clone()).collect(),
            };
            let reasons: Vec<String> = match &r {
                Ok(r) => r.failed.iter().map(|f| f.1.clone()).collect(),
                Err(e) => vec![e.to_string()],
            };
            for why in reasons {
                let mut why = why;
                why.truncate(240);
                if l.fail_reasons.len() < 5 && !l.fail_reasons.contains(&why) {
                    l.fail_reasons.push(why);
                }
            }
            for d in &docs {
                if failed.contains(&d.id) {
                    // not acknowledged: it may or may not have landed
                    l.failed += 1;
                    l.maybe
                        .entry(d.id.clone())
                        .or_default()
                        .push(d.text.clone());
                } else {
                    l.acked += 1;
                    l.deleted.remove(&d.id);
                    l.maybe.remove(&d.id);
                    l.live.insert(d.id.clone(), d.text.clone());
                }
            }
        }
        if w.delete_every > 0 && tick.is_multiple_of(w.delete_every) && !known.is_empty() {
            let id = known[rng.gen_range(0..known.len())].clone();
            let r = client.delete(vec![id.clone()]).await;
            let mut l = shared.ledger.lock().expect("ledger");
            match r {
                Ok(r) if r.failed.is_empty() => {
                    l.acked += 1;
                    l.live.remove(&id);
                    l.maybe.remove(&id);
                    l.deleted.insert(id);
                }
                _ => {
                    // uncertain: deleted or not
                    l.failed += 1;
                    if let Some(text) = l.live.remove(&id) {
                        l.maybe.entry(id.clone()).or_default().push(text);
                    }
                    l.maybe.entry(id).or_default().push(String::new());
                }
            }
        }
        tokio::time::sleep_until(next.into()).await;
    }
    let _ = querier.await;
}

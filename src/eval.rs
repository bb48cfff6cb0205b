//! `ragfleet eval`: nDCG@10, recall@100, MRR@10, mean coverage and per-stage latency
//! percentiles over judged queries, through the real retrieval path.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ragfleet_proto::RetrieveOptions;
use ragfleet_runtime::Client;

/// Reads BEIR queries (`_id`, `text`).
pub fn read_queries(path: &Path) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let id = v.get("_id").or_else(|| v.get("id")).and_then(|x| {
            x.as_str()
                .map(str::to_string)
                .or_else(|| x.as_u64().map(|n| n.to_string()))
        });
        let t = v.get("text").and_then(|x| x.as_str());
        match (id, t) {
            (Some(id), Some(t)) => {
                out.insert(id, t.to_string());
            }
            _ => bail!("{}:{}: needs `_id` and `text`", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Reads a qrels tsv (query-id, corpus-id, score), header optional.
pub fn read_qrels(path: &Path) -> Result<HashMap<String, HashMap<String, u32>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out: HashMap<String, HashMap<String, u32>> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        if line.trim().is_empty() || (i == 0 && f.first().is_some_and(|x| x.contains("query"))) {
            continue;
        }
        if f.len() < 3 {
            bail!(
                "{}:{}: expected query-id, corpus-id, score",
                path.display(),
                i + 1
            );
        }
        let g: u32 = f[2]
            .trim()
            .parse()
            .with_context(|| format!("{}:{}: bad score", path.display(), i + 1))?;
        out.entry(f[0].to_string())
            .or_default()
            .insert(f[1].to_string(), g);
    }
    Ok(out)
}

/// nDCG@k of a ranked list of doc ids.
pub fn ndcg(ranked: &[String], rel: &HashMap<String, u32>, k: usize) -> f64 {
    let gain = |g: u32| 2f64.powi(g as i32) - 1.0;
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| gain(*rel.get(d).unwrap_or(&0)) / (i as f64 + 2.0).log2())
        .sum();
    let mut ideal: Vec<u32> = rel.values().copied().collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, g)| gain(*g) / (i as f64 + 2.0).log2())
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

/// Recall@k.
pub fn recall(ranked: &[String], rel: &HashMap<String, u32>, k: usize) -> f64 {
    let relevant = rel.values().filter(|g| **g > 0).count();
    if relevant == 0 {
        return 0.0;
    }
    ranked
        .iter()
        .take(k)
        .filter(|d| rel.get(*d).is_some_and(|g| *g > 0))
        .count() as f64
        / relevant as f64
}

/// MRR@k.
pub fn mrr(ranked: &[String], rel: &HashMap<String, u32>, k: usize) -> f64 {
    ranked
        .iter()
        .take(k)
        .position(|d| rel.get(d).is_some_and(|g| *g > 0))
        .map(|p| 1.0 / (p as f64 + 1.0))
        .unwrap_or(0.0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    crate::eval_answers::percentile(v, p / 100.0)
}

/// Runs the evaluation.
pub async fn run(
    client: &Client,
    queries: &Path,
    qrels: &Path,
    opts: RetrieveOptions,
    limit: Option<usize>,
    json: bool,
) -> Result<()> {
    let qs = read_queries(queries)?;
    let qr = read_qrels(qrels)?;
    let mut ids: Vec<&String> = qr.keys().filter(|q| qs.contains_key(*q)).collect();
    ids.sort();
    if let Some(l) = limit {
        ids.truncate(l);
    }
    if ids.is_empty() {
        bail!(
            "no judged query of {} is in {}",
            qrels.display(),
            queries.display()
        );
    }
    let (mut n, mut r, mut m, mut cov) = (0.0, 0.0, 0.0, 0.0);
    let mut lat: HashMap<&str, Vec<f64>> = HashMap::new();
    for q in &ids {
        let res = client.retrieve(&qs[*q], opts.clone()).await?;
        let mut ranked: Vec<String> = Vec::new();
        for h in &res.hits {
            if !ranked.contains(&h.doc_id) {
                ranked.push(h.doc_id.clone());
            }
        }
        let rel = &qr[*q];
        n += ndcg(&ranked, rel, 10);
        r += recall(&ranked, rel, 100);
        m += mrr(&ranked, rel, 10);
        cov += res.coverage.fraction();
        let t = &res.timings_ms;
        for (k, v) in [
            ("embed", t.embed),
            ("search", t.search),
            ("rerank", t.rerank),
            ("total", t.total),
        ] {
            lat.entry(k).or_default().push(v);
        }
    }
    let c = ids.len() as f64;
    let mut stages = serde_json::Map::new();
    for k in ["embed", "search", "rerank", "total"] {
        let v = lat.get_mut(k).expect("filled");
        stages.insert(
            k.into(),
            serde_json::json!({"p50": pct(v, 50.0), "p95": pct(v, 95.0), "p99": pct(v, 99.0)}),
        );
    }
    let out = serde_json::json!({
        "queries": ids.len(), "mode": format!("{:?}", opts.mode).to_lowercase(), "rerank": opts.rerank.unwrap_or(false),
        "ndcg@10": n / c, "recall@100": r / c, "mrr@10": m / c, "mean_coverage": cov / c, "latency_ms": stages,
    });
    if json {
        println!("{out}");
    } else {
        println!(
            "queries {}  mode {}  rerank {}",
            ids.len(),
            out["mode"],
            out["rerank"]
        );
        println!(
            "nDCG@10 {:.4}  recall@100 {:.4}  MRR@10 {:.4}  mean coverage {:.3}",
            n / c,
            r / c,
            m / c,
            cov / c
        );
        for (k, v) in stages {
            println!(
                "{k:>7}: p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms",
                v["p50"].as_f64().unwrap_or(0.0),
                v["p95"].as_f64().unwrap_or(0.0),
                v["p99"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_a_known_ranking() {
        let rel: HashMap<String, u32> = [("a".to_string(), 1), ("b".to_string(), 1)].into();
        let ranked: Vec<String> = ["x", "a", "y", "b"].iter().map(|s| s.to_string()).collect();
        assert!((mrr(&ranked, &rel, 10) - 0.5).abs() < 1e-9);
        assert!((recall(&ranked, &rel, 2) - 0.5).abs() < 1e-9);
        let dcg = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2();
        assert!((ndcg(&ranked, &rel, 10) - dcg / idcg).abs() < 1e-9);
        let perfect: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        assert!((ndcg(&perfect, &rel, 10) - 1.0).abs() < 1e-9);
    }
}

//! `ragfleet eval`: nDCG@10, recall@100, MRR@10, mean coverage and per-stage latency
//! percentiles over judged queries, through the real retrieval path.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ragfleet_proto::{RetrieveOptions, SearchMode};
use ragfleet_runtime::Client;
use rand::{Rng, SeedableRng};

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

/// One retrieval configuration to evaluate: a mode, with or without reranking; `None` is the
/// cluster's default (`query.mode`, and reranking whenever a reranker node exists).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalMode {
    pub mode: Option<SearchMode>,
    pub rerank: Option<bool>,
}

impl EvalMode {
    /// Plain dense retrieval, the baseline every other mode is compared with.
    pub const DENSE: EvalMode = EvalMode {
        mode: Some(SearchMode::Dense),
        rerank: Some(false),
    };
}

impl std::str::FromStr for EvalMode {
    type Err = String;
    /// `dense`, `bm25`, `hybrid`, each optionally `+rerank`; `default`: what a query that says
    /// nothing gets.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "default" {
            return Ok(EvalMode {
                mode: None,
                rerank: None,
            });
        }
        let (m, rerank) = match s.strip_suffix("+rerank") {
            Some(m) => (m, true),
            None => (s, false),
        };
        Ok(EvalMode {
            mode: Some(m.parse()?),
            rerank: Some(rerank),
        })
    }
}

impl std::fmt::Display for EvalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.mode, self.rerank) {
            (None, None) => write!(f, "default"),
            (m, r) => {
                let m = m.map_or("default".to_string(), |m| format!("{m:?}").to_lowercase());
                let r = match r {
                    Some(true) => "+rerank",
                    Some(false) => "",
                    None => "+default-rerank",
                };
                write!(f, "{m}{r}")
            }
        }
    }
}

/// The paired bootstrap of the mean of `diffs` (per query, mode minus baseline): the 95%
/// interval of the resampled means and the share of resamples above zero (seeded).
pub fn paired_bootstrap(diffs: &[f64], resamples: usize, seed: u64) -> (f64, f64, f64) {
    if diffs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = diffs.len();
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| diffs[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    let above = means.iter().filter(|m| **m > 0.0).count() as f64 / resamples as f64;
    let lo = pct(&mut means, 2.5);
    let hi = pct(&mut means, 97.5);
    (lo, hi, above)
}

/// Per-query figures of one mode.
#[derive(Default)]
struct ModeRun {
    ndcg: Vec<f64>,
    recall: Vec<f64>,
    mrr: Vec<f64>,
    coverage: Vec<f64>,
    lat: HashMap<&'static str, Vec<f64>>,
    rerank_outcomes: HashMap<String, usize>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Measures one corpus: every judged query through every mode, and for each mode the paired
/// bootstrap interval of its nDCG@10 difference to dense (the first mode when dense is not
/// asked). Returns `{"queries": N, "modes": [...]}`.
pub async fn measure(
    client: &Client,
    queries: &Path,
    qrels: &Path,
    modes: &[EvalMode],
    limit: Option<usize>,
) -> Result<serde_json::Value> {
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
    if modes.is_empty() {
        bail!("no mode to evaluate");
    }
    let mut runs: Vec<ModeRun> = Vec::new();
    for m in modes {
        let opts = RetrieveOptions {
            k: Some(100),
            mode: m.mode,
            rerank: m.rerank,
            deadline_ms: None,
            // every query computed afresh: the figures are of the path, not of the cache
            cache: Some(false),
            ..RetrieveOptions::default()
        };
        let mut run = ModeRun::default();
        for q in &ids {
            let res = client.retrieve(&qs[*q], opts.clone()).await?;
            let mut ranked: Vec<String> = Vec::new();
            for h in &res.hits {
                if !ranked.contains(&h.doc_id) {
                    ranked.push(h.doc_id.clone());
                }
            }
            let rel = &qr[*q];
            run.ndcg.push(ndcg(&ranked, rel, 10));
            run.recall.push(recall(&ranked, rel, 100));
            run.mrr.push(mrr(&ranked, rel, 10));
            run.coverage.push(res.coverage.fraction());
            if let Some(r) = &res.rerank {
                *run.rerank_outcomes.entry(r.clone()).or_default() += 1;
            }
            let t = &res.timings_ms;
            for (k, v) in [
                ("embed", t.embed),
                ("search", t.search),
                ("rerank", t.rerank),
                ("total", t.total),
            ] {
                run.lat.entry(k).or_default().push(v);
            }
        }
        runs.push(run);
    }
    let base = modes
        .iter()
        .position(|m| *m == EvalMode::DENSE)
        .unwrap_or(0);
    let mut rows = Vec::new();
    for (i, (m, run)) in modes.iter().zip(runs.iter_mut()).enumerate() {
        let mut stages = serde_json::Map::new();
        for k in ["embed", "search", "rerank", "total"] {
            let v = run.lat.get_mut(k).expect("filled");
            stages.insert(
                k.into(),
                serde_json::json!({"p50": pct(v, 50.0), "p95": pct(v, 95.0), "p99": pct(v, 99.0)}),
            );
        }
        rows.push(serde_json::json!({
            "mode": m.to_string(), "ndcg@10": mean(&run.ndcg), "recall@100": mean(&run.recall),
            "mrr@10": mean(&run.mrr), "mean_coverage": mean(&run.coverage), "latency_ms": stages,
            "rerank_outcomes": run.rerank_outcomes, "baseline": i == base,
        }));
    }
    let base_ndcg = runs[base].ndcg.clone();
    for (i, run) in runs.iter().enumerate() {
        if i == base {
            continue;
        }
        let diffs: Vec<f64> = run
            .ndcg
            .iter()
            .zip(&base_ndcg)
            .map(|(a, b)| a - b)
            .collect();
        let (lo, hi, p) = paired_bootstrap(&diffs, 2000, 17);
        rows[i]["ndcg@10_vs_baseline"] = serde_json::json!({
            "baseline": modes[base].to_string(), "mean": mean(&diffs), "ci95": [lo, hi], "p_gain": p,
        });
    }
    Ok(
        serde_json::json!({"queries": ids.len(), "baseline": modes[base].to_string(), "modes": rows}),
    )
}

/// Runs the evaluation of one cluster's corpus and prints its table (or its JSON object).
pub async fn run(
    client: &Client,
    queries: &Path,
    qrels: &Path,
    modes: &[EvalMode],
    limit: Option<usize>,
    json: bool,
) -> Result<()> {
    let out = measure(client, queries, qrels, modes, limit).await?;
    if json {
        println!("{out}");
    } else {
        print_table(None, &out);
    }
    Ok(())
}

/// Prints one corpus's figures as a table (`corpus`: its name, when several are printed).
pub fn print_table(corpus: Option<&str>, out: &serde_json::Value) {
    println!(
        "{}{} judged queries; nDCG@10 differences to {} with a paired bootstrap 95% interval (2,000 resamples)",
        corpus.map(|c| format!("{c}: ")).unwrap_or_default(),
        out["queries"],
        out["baseline"].as_str().unwrap_or("")
    );
    println!(
        "{:<15} {:>8} {:>28} {:>10} {:>7} {:>8} {:>19} {:>19}",
        "mode",
        "nDCG@10",
        "vs baseline [95% CI] P(gain)",
        "recall@100",
        "MRR@10",
        "coverage",
        "total p50/p99 ms",
        "rerank p50/p99 ms"
    );
    for r in out["modes"].as_array().into_iter().flatten() {
        let d = &r["ndcg@10_vs_baseline"];
        let vs = if d.is_null() {
            "baseline".to_string()
        } else {
            format!(
                "{:+.3} [{:+.3}, {:+.3}] {:.2}",
                d["mean"].as_f64().unwrap_or(0.0),
                d["ci95"][0].as_f64().unwrap_or(0.0),
                d["ci95"][1].as_f64().unwrap_or(0.0),
                d["p_gain"].as_f64().unwrap_or(0.0)
            )
        };
        let l = &r["latency_ms"];
        let f = |k: &str, p: &str| l[k][p].as_f64().unwrap_or(0.0);
        println!(
            "{:<15} {:>8.4} {:>28} {:>10.4} {:>7.4} {:>8.3} {:>19} {:>19}",
            r["mode"].as_str().unwrap_or(""),
            r["ndcg@10"].as_f64().unwrap_or(0.0),
            vs,
            r["recall@100"].as_f64().unwrap_or(0.0),
            r["mrr@10"].as_f64().unwrap_or(0.0),
            r["mean_coverage"].as_f64().unwrap_or(0.0),
            format!("{:.1} / {:.1}", f("total", "p50"), f("total", "p99")),
            format!("{:.1} / {:.1}", f("rerank", "p50"), f("rerank", "p99")),
        );
    }
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

    #[test]
    fn modes_parse_and_the_bootstrap_interval_brackets_the_mean_difference() {
        let m: EvalMode = "hybrid+rerank".parse().unwrap();
        assert_eq!((m.mode, m.rerank), (Some(SearchMode::Hybrid), Some(true)));
        assert_eq!(m.to_string(), "hybrid+rerank");
        let d: EvalMode = "default".parse().unwrap();
        assert_eq!((d.mode, d.rerank), (None, None));
        assert_eq!(d.to_string(), "default");
        assert_eq!("dense".parse::<EvalMode>().unwrap(), EvalMode::DENSE);
        assert_eq!("bm25".parse::<EvalMode>().unwrap().to_string(), "bm25");
        assert!("sparse".parse::<EvalMode>().is_err());
        // a clear gain: every query +0.05 or +0.15
        let gain: Vec<f64> = (0..200)
            .map(|i| if i % 2 == 0 { 0.05 } else { 0.15 })
            .collect();
        let (lo, hi, p) = paired_bootstrap(&gain, 1000, 1);
        assert!(lo > 0.08 && hi < 0.12 && lo < 0.1 && hi > 0.1, "{lo} {hi}");
        assert_eq!(p, 1.0);
        // no difference on average: the interval straddles zero
        let noise: Vec<f64> = (0..200)
            .map(|i| if i % 2 == 0 { 0.1 } else { -0.1 })
            .collect();
        let (lo, hi, p) = paired_bootstrap(&noise, 1000, 1);
        assert!(lo < 0.0 && hi > 0.0 && p > 0.1 && p < 0.9, "{lo} {hi} {p}");
        // the same seed, the same interval
        assert_eq!(paired_bootstrap(&noise, 1000, 1), (lo, hi, p));
    }
}

//! `ragfleet eval --answers`: how answers read, per answer mode, over a set of questions:
//! repetition (the share of 4-grams of words that repeat, and the most repeated one), how
//! answers end (reason, and whether they end at a sentence end), grounding, length and latency.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use ragfleet_proto::{AnswerMode, AskOptions, AskSummary, RetrieveOptions, SearchMode};
use ragfleet_runtime::Client;
use serde_json::json;

/// (share of 4-gram occurrences that repeat an earlier one, most repetitions of one 4-gram).
pub fn repetition(text: &str) -> (f64, usize) {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '!' && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect();
    if words.len() < 4 {
        return (0.0, 0);
    }
    let mut grams: HashMap<&[String], usize> = HashMap::new();
    for w in words.windows(4) {
        *grams.entry(w).or_default() += 1;
    }
    let total = words.len() - 3;
    let repeats: usize = grams.values().map(|n| n - 1).sum();
    (
        repeats as f64 / total as f64,
        grams.values().copied().max().unwrap_or(0),
    )
}

/// Whether an answer ends at a sentence end (a cut marker counts as the end of a cut answer).
pub fn ends_well(text: &str) -> bool {
    ragfleet_models::llama::ends_sentence(text) || text.trim_end().ends_with(']')
}

/// The `p` quantile (0..=1) of `v` (sorted in place); 0 for an empty set.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// What `eval --answers` measures.
pub struct Run {
    /// Retrieval mode of the answers.
    pub mode: Option<SearchMode>,
    /// Answer length limit.
    pub max_tokens: u32,
    /// Questions (the first N by id; 50 when `None`).
    pub limit: Option<usize>,
    /// Answer modes, each over every question.
    pub answer_modes: Vec<AnswerMode>,
    /// One JSON object instead of a table.
    pub json: bool,
}

/// Asks every question in each answer mode and prints one table (or one JSON object).
pub async fn run(client: &Client, queries: &Path, run: Run) -> Result<()> {
    let Run {
        mode,
        max_tokens,
        limit,
        answer_modes,
        json: json_out,
    } = run;
    let qs = crate::eval::read_queries(queries)?;
    let mut ids: Vec<&String> = qs.keys().collect();
    ids.sort();
    ids.truncate(limit.unwrap_or(50));
    let mut report = serde_json::Map::new();
    for am in answer_modes {
        let name = format!("{am:?}").to_lowercase();
        let (mut rep_share, mut rep_max, mut ends, mut words) = (0.0, 0usize, 0usize, 0usize);
        let (mut grounding, mut grounded) = (0.0f64, 0usize);
        let mut over_twice = 0;
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut made: BTreeMap<String, usize> = BTreeMap::new();
        let mut latency = Vec::new();
        let mut failed = 0;
        for id in &ids {
            let opts = AskOptions {
                retrieve: RetrieveOptions {
                    mode,
                    ..Default::default()
                },
                max_tokens: Some(max_tokens),
                answer_mode: Some(am),
                ..Default::default()
            };
            let t = Instant::now();
            let summary = ask(client, &qs[*id], opts).await;
            let Some(s) = summary else {
                failed += 1;
                continue;
            };
            latency.push(t.elapsed().as_secs_f64() * 1000.0);
            let (share, most) = repetition(&s.answer);
            rep_share += share;
            rep_max = rep_max.max(most);
            over_twice += usize::from(most > 2);
            ends += usize::from(ends_well(&s.answer));
            words += s.answer.split_whitespace().count();
            *reasons.entry(s.end_reason.clone()).or_default() += 1;
            *made.entry(s.answer_mode.clone()).or_default() += 1;
            if let Some(g) = &s.grounding {
                grounding += g.score as f64;
                grounded += 1;
            }
        }
        let n = (ids.len() - failed).max(1) as f64;
        let row = json!({
            "answers": ids.len() - failed,
            "failed": failed,
            "repeated_4gram_share": rep_share / n,
            "most_repeated_4gram": rep_max,
            "answers_repeating_a_4gram_over_twice": over_twice,
            "ending_at_a_sentence_end": ends,
            "end_reasons": reasons,
            "answer_modes": made,
            "grounding_mean": if grounded > 0 { grounding / grounded as f64 } else { 0.0 },
            "words_mean": words as f64 / n,
            "latency_ms": {"p50": percentile(&mut latency.clone(), 0.5), "p95": percentile(&mut latency, 0.95)},
        });
        if !json_out {
            println!(
                "{name:<10} {} answers ({} failed): repeated 4-grams {:.3} (max x{}, {} answers over x2), ends at a sentence end {}/{}, end reasons {:?}, made by {:?}, grounding {:.3}, {:.0} words, latency p50 {:.0} ms p95 {:.0} ms",
                row["answers"], failed, row["repeated_4gram_share"].as_f64().unwrap_or(0.0),
                rep_max, over_twice, ends, ids.len() - failed, reasons, made,
                row["grounding_mean"].as_f64().unwrap_or(0.0), row["words_mean"].as_f64().unwrap_or(0.0),
                row["latency_ms"]["p50"].as_f64().unwrap_or(0.0), row["latency_ms"]["p95"].as_f64().unwrap_or(0.0),
            );
        }
        report.insert(name, row);
    }
    if json_out {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}

async fn ask(client: &Client, q: &str, opts: AskOptions) -> Option<AskSummary> {
    let mut s = client.ask(q, opts).await.ok()?;
    let mut summary = None;
    while let Some(c) = s.next().await {
        let c = c.ok()?;
        if c.summary.is_some() {
            summary = c.summary;
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_and_endings_are_measured() {
        let (share, most) = repetition("the panic macro is the panic macro is the panic macro is");
        assert_eq!(most, 3);
        assert!(share > 0.5, "{share}");
        assert_eq!(repetition("one two three four five"), (0.0, 1));
        assert!(ends_well("It ends."));
        assert!(ends_well("cut [answer cut: end-to-end deadline reached]"));
        assert!(!ends_well("It ends in the mid"));
    }
}

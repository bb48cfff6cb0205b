//! `bm25-reference N TEXTS QUERIES DIR`: indexes the first N texts of TEXTS (one JSON object with
//! a `text` a line) with tantivy in DIR, merged into one segment, tokenised as ragfleet does
//! (alphanumeric runs, lower-cased, its stop words), then times each query of QUERIES (a JSON
//! list of strings) as an exact top 10 by BM25 (k1 1.2, b 0.75: a disjunction of term queries,
//! which tantivy answers by block-max WAND), on one thread: a warm-up round, then one timed.
//! `BM25_REFERENCE_TIMES=FILE` writes the timed round's time of each query (ms, a JSON list in
//! the queries' order).
use std::time::Instant;

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{IndexRecordOption, Schema, TextFieldIndexing, TextOptions};
use tantivy::tokenizer::{LowerCaser, SimpleTokenizer, StopWordFilter, TextAnalyzer, TokenStream};
use tantivy::{doc, Index, Term};

/// ragfleet's stop words (`crates/index/src/bm25.rs`).
const STOP: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "he", "in", "is", "it",
    "its", "of", "on", "that", "the", "to", "was", "were", "will", "with", "this", "or", "which",
];

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(LowerCaser)
        .filter(StopWordFilter::remove(STOP.iter().map(|s| s.to_string())))
        .build()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, n, texts, queries, dir] = &args[..] else {
        return Err("usage: bm25-reference N TEXTS QUERIES DIR".into());
    };
    let n: usize = n.parse()?;
    let mut docs = Vec::with_capacity(n);
    for line in std::fs::read_to_string(texts)?.lines().take(n) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        docs.push(
            v["text"]
                .as_str()
                .ok_or("a line without a text")?
                .to_string(),
        );
    }
    if docs.len() < n {
        return Err(format!("{} texts, fewer than {n}", docs.len()).into());
    }
    let queries: Vec<String> = serde_json::from_str(&std::fs::read_to_string(queries)?)?;
    let mut schema = Schema::builder();
    let indexing = TextFieldIndexing::default()
        .set_tokenizer("ragfleet")
        .set_index_option(IndexRecordOption::WithFreqs);
    let body = schema.add_text_field(
        "body",
        TextOptions::default().set_indexing_options(indexing),
    );
    let dir = std::path::Path::new(dir);
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let index = Index::create_in_dir(dir, schema.build())?;
    index.tokenizers().register("ragfleet", analyzer());
    let started = Instant::now();
    let mut writer = index.writer_with_num_threads(2, 1 << 30)?;
    for d in &docs {
        writer.add_document(doc!(body => d.as_str()))?;
    }
    writer.commit()?;
    let segments = index.searchable_segment_ids()?;
    if segments.len() > 1 {
        writer.merge(&segments).wait()?;
    }
    writer.wait_merging_threads()?;
    let searcher = index.reader()?.searcher();
    let indexed_s = started.elapsed().as_secs_f64();
    let mut tokens = analyzer();
    let asked: Vec<BooleanQuery> = queries
        .iter()
        .map(|q| {
            let mut terms = Vec::new();
            let mut stream = tokens.token_stream(q);
            while stream.advance() {
                terms.push(stream.token().text.clone());
            }
            terms.sort();
            terms.dedup();
            BooleanQuery::new(
                terms
                    .iter()
                    .map(|t| {
                        let q: Box<dyn Query> = Box::new(TermQuery::new(
                            Term::from_field_text(body, t),
                            IndexRecordOption::WithFreqs,
                        ));
                        (Occur::Should, q)
                    })
                    .collect(),
            )
        })
        .collect();
    let mut ms = Vec::with_capacity(asked.len());
    // a warm-up round, then the timed one
    for _ in 0..2 {
        ms.clear();
        for q in &asked {
            let t = Instant::now();
            let top = searcher.search(q, &TopDocs::with_limit(10))?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(top);
        }
    }
    if let Ok(f) = std::env::var("BM25_REFERENCE_TIMES") {
        std::fs::write(f, serde_json::to_string(&ms)?)?;
    }
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    ms.sort_by(f64::total_cmp);
    println!(
        "tantivy: p50 {:.4} ms p99 {:.4} mean {:.4} ({n} texts in {} segment, indexed in {indexed_s:.1} s)",
        ms[ms.len() / 2],
        ms[ms.len() * 99 / 100],
        mean,
        searcher.segment_readers().len(),
    );
    Ok(())
}

//! `ragfleet bench embed`, `rerank` and `generate`: the models' throughput on this machine's
//! threads, beside sentence-transformers / transformers (`--reference`) in the same run.
use std::sync::Arc;

use anyhow::Result;

use super::{rate, reference, threads, MODELS_REFERENCE};

const SHORT: &str = "How do shards bound the latency of a query?";

fn long_text() -> String {
    "Replication keeps a copy of every shard on another node. ".repeat(40)
}

pub(super) fn embed(models: &std::path::Path, py: Option<&std::path::Path>) -> Result<()> {
    ragfleet_models::lanes::keep_activation_memory();
    use ragfleet_models::backend::{Cpu, CpuNdArray};
    use ragfleet_models::Embedder;
    let dir = models.join(ragfleet_models::fetch::EMBEDDER_DIR);
    let lanes = ragfleet_models::lanes::cpu_lanes();
    // the binary's backend (flex on the CPU, CUDA in a cuda build) with its lanes; the other
    // columns are the CPU backends
    let backend = if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "flex"
    };
    let flex = Embedder::<crate::loader::Backend>::load(&dir, &Default::default())?
        .with_lanes(crate::loader::lanes());
    let flex1 = Embedder::<Cpu>::load(&dir, &Default::default())?;
    let nd = Embedder::<CpuNdArray>::load(&dir, &Default::default())?.with_lanes(lanes);
    let long = long_text();
    let torch: Vec<serde_json::Value> = match py {
        Some(py) => reference(
            py,
            MODELS_REFERENCE,
            &[
                "embed".into(),
                "--model".into(),
                dir.display().to_string(),
                "--short".into(),
                SHORT.into(),
                "--long".into(),
                long.clone(),
            ],
        )?,
        None => Vec::new(),
    };
    println!(
        "{} threads; the binary's backend ({backend}) runs sub-batches on {} lanes (1 lane: flex, one forward pass at a time); ratios are {backend} / other",
        threads(),
        crate::loader::lanes()
    );
    println!(
        "{:<8} {:>6} {:>12} {:>12} {:>7} {:>14} {:>7} {:>12} {:>7}",
        "input",
        "batch",
        format!("{backend} sent/s"),
        "1 lane",
        "ratio",
        "ndarray sent/s",
        "ratio",
        "torch sent/s",
        "ratio"
    );
    for (name, text) in [("short", SHORT.to_string()), ("256-tok", long)] {
        for batch in [1usize, 8, 64, 256] {
            if name == "256-tok" && batch == 256 {
                continue;
            }
            let texts = vec![text.clone(); batch];
            let a = rate(batch, &|| {
                flex.embed(&texts).expect("embed");
            });
            let one = rate(batch, &|| {
                flex1.embed(&texts).expect("embed");
            });
            let b = rate(batch, &|| {
                nd.embed(&texts).expect("embed");
            });
            let t = torch
                .iter()
                .find(|v| v["input"] == name && v["batch"] == batch)
                .and_then(|v| v["rate"].as_f64());
            let (tc, tr) = t.map_or(("-".to_string(), "-".to_string()), |t| {
                (format!("{t:.1}"), format!("{:.2}", a / t))
            });
            println!(
                "{name:<8} {batch:>6} {a:>12.1} {one:>12.1} {:>7.2} {b:>14.1} {:>7.2} {tc:>12} {tr:>7}",
                a / one,
                a / b
            );
        }
    }
    Ok(())
}

pub(super) fn rerank(models: &std::path::Path, py: &std::path::Path, batch: usize) -> Result<()> {
    ragfleet_models::lanes::keep_activation_memory();
    use ragfleet_models::backend::Cpu;
    use ragfleet_runtime::RerankModel;
    let dir = tempfile::tempdir()?;
    let ce_dir = dir.path().join("cross-encoder");
    let minilm = models.join(ragfleet_models::fetch::EMBEDDER_DIR);
    reference(
        py,
        MODELS_REFERENCE,
        &[
            "make-cross-encoder".into(),
            "--model".into(),
            minilm.display().to_string(),
            "--out".into(),
            ce_dir.display().to_string(),
        ],
    )?;
    let long = long_text();
    let torch = reference(
        py,
        MODELS_REFERENCE,
        &[
            "rerank".into(),
            "--model".into(),
            ce_dir.display().to_string(),
            "--batch".into(),
            batch.to_string(),
            "--short".into(),
            SHORT.into(),
            "--long".into(),
            long.clone(),
        ],
    )?;
    let torch = torch
        .first()
        .and_then(|v| v["rate"].as_f64())
        .ok_or_else(|| anyhow::anyhow!("no rate from the reference"))?;
    let lanes = ragfleet_models::lanes::cpu_lanes();
    let ce =
        ragfleet_models::CrossEncoder::<Cpu>::load(&ce_dir, &Default::default())?.with_lanes(lanes);
    let ce1 = ragfleet_models::CrossEncoder::<Cpu>::load(&ce_dir, &Default::default())?;
    let passages = vec![long.clone(); batch];
    let ours = rate(batch, &|| {
        ce.score(SHORT, &passages).expect("score");
    });
    let ours1 = rate(batch, &|| {
        ce1.score(SHORT, &passages).expect("score");
    });
    let emb = Arc::new(crate::loader::EmbedderModel(
        ragfleet_models::Embedder::<crate::loader::Backend>::load(&minilm, &Default::default())?
            .with_lanes(crate::loader::lanes()),
    ));
    // distinct passages of real sentences, so the sentence cache does not answer
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let sent = rate(batch, &|| {
        let r = crate::loader::SentenceReranker::new(emb.clone());
        let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ps: Vec<String> = (0..batch)
            .map(|i| format!("Passage {k} {i}. {}", long.clone()))
            .collect();
        r.score(SHORT, &ps).expect("score");
    });
    println!(
        "{} threads, {batch} pairs per call, 256-token passages (truncated to 256 with the query)",
        threads()
    );
    println!(
        "cross-encoder (MiniLM-L6 size): ragfleet {ours:.1} pairs/s on {lanes} lanes ({ours1:.1} on 1 lane: {:.2}x), transformers {torch:.1} pairs/s: {:.2}x",
        ours / ours1,
        ours / torch
    );
    println!("sentence reranker (default, 20 sentences a passage, uncached): {sent:.1} pairs/s");
    Ok(())
}

/// Runs `streams` concurrent greedy generations; returns (mean time to first token, tokens/s).
fn run_streams<B: burn::prelude::Backend>(
    g: &ragfleet_models::llama::Generator<B>,
    prompts: &[&str],
    tokens: usize,
) -> (f64, f64) {
    use ragfleet_models::llama::{GenerationRequest, Sink, StreamEvent};
    use std::sync::Mutex;
    // per stream: (seconds to its first token, tokens so far)
    type Progress = Arc<Mutex<(Option<f64>, usize)>>;
    let t0 = std::time::Instant::now();
    let stats: Vec<Progress> = prompts
        .iter()
        .map(|_| Arc::new(Mutex::new((None, 0))))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (p, st) in prompts.iter().zip(&stats) {
        let req = GenerationRequest {
            system: String::new(),
            user: p.to_string(),
            max_tokens: tokens as u32,
            sampling: ragfleet_proto::Sampling {
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
                ..Default::default()
            },
            push_to: None,
        };
        tx.send((req, st.clone())).expect("queue");
    }
    drop(tx);
    g.serve(
        rx,
        prompts.len(),
        |(req, st): (GenerationRequest, Progress)| {
            let sink: Sink = Box::new(move |ev| {
                if let StreamEvent::Text(_) = ev {
                    let mut s = st.lock().expect("stats");
                    s.0.get_or_insert(t0.elapsed().as_secs_f64());
                    s.1 += 1;
                }
                true
            });
            (req, sink)
        },
    );
    let total = t0.elapsed().as_secs_f64();
    let ttft: f64 = stats
        .iter()
        .map(|s| s.lock().expect("stats").0.unwrap_or(total))
        .sum::<f64>()
        / prompts.len() as f64;
    let n: usize = stats.iter().map(|s| s.lock().expect("stats").1).sum();
    (ttft, n as f64 / total)
}

/// Tokens/s of decode steps alone, one stream vs `prompts.len()` streams in one batch: every
/// prompt is prefilled first, then `steps` batched steps run (greedy, fixed next tokens).
fn decode_only<B: burn::prelude::Backend>(
    g: &ragfleet_models::llama::Generator<B>,
    prompts: &[&str],
    steps: usize,
) -> (f64, f64) {
    use ragfleet_models::llama::KvCache;
    let m = g.model();
    let device = Default::default();
    let rate = |n: usize| {
        let mut caches: Vec<KvCache<B>> = prompts[..n]
            .iter()
            .map(|p| {
                let mut c = KvCache::new(m.cfg.layers);
                m.forward(&[g.tokenizer().chat_prompt("", p)], &mut [&mut c], &device);
                c
            })
            .collect();
        let t = std::time::Instant::now();
        for step in 0..steps {
            let tokens: Vec<Vec<u32>> = (0..n).map(|i| vec![(100 + step + i) as u32]).collect();
            let mut refs: Vec<&mut KvCache<B>> = caches.iter_mut().collect();
            m.forward(&tokens, &mut refs, &device);
        }
        (n * steps) as f64 / t.elapsed().as_secs_f64()
    };
    (rate(1), rate(prompts.len()))
}

/// A sentence repeated into a long generator prompt (~13 tokens).
const LONG_PROMPT: &str = "Rust's ownership model makes memory safety a compile-time property. ";

pub(super) fn generate<B: burn::prelude::Backend>(
    models: &std::path::Path,
    tokens: usize,
    py: Option<&std::path::Path>,
) -> Result<()> {
    ragfleet_models::lanes::keep_activation_memory();
    let gguf = models.join(ragfleet_models::fetch::GENERATOR_GGUF);
    let g = ragfleet_models::llama::Generator::<B>::load_gguf(&gguf, &Default::default())?;
    let prompts = [
        "Write one sentence about vector databases.",
        "What is the capital of France?",
        "Explain what a hash map is.",
        "Name three colors and a fruit.",
    ];
    let (ttft1, tps1) = run_streams(&g, &prompts[..1], tokens);
    let (ttft4, tps4) = run_streams(&g, &prompts, tokens);
    println!("streams  mean TTFT (s)  tokens/s (all streams)");
    println!("{:>7}  {:>13.2}  {:>22.1}", 1, ttft1, tps1);
    println!("{:>7}  {:>13.2}  {:>22.1}", 4, ttft4, tps4);
    println!(
        "continuous batching: 4 streams give {:.2}x the tokens/s of 1",
        tps4 / tps1
    );
    let (d1, d4) = decode_only(&g, &prompts, tokens);
    println!(
        "decode steps alone (prompts prefilled first): 1 stream {d1:.1} tokens/s, 4 streams \
         {d4:.1} tokens/s in all = {:.2}x",
        d4 / d1
    );
    // prefill of a long prompt (a RAG context): one forward pass over every token, best of 3
    let long = LONG_PROMPT.repeat(40);
    let long_ids = g.tokenizer().encode(&long);
    let prefill = (0..3)
        .map(|_| {
            let t = std::time::Instant::now();
            g.prompt_logits(&long_ids);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "prefill of a {}-token prompt: {:.2} s ({:.0} tokens/s)",
        long_ids.len(),
        prefill,
        long_ids.len() as f64 / prefill
    );
    if let Some(py) = py {
        let r = reference(
            py,
            MODELS_REFERENCE,
            &[
                "generate".into(),
                "--gguf".into(),
                gguf.display().to_string(),
                "--tokens".into(),
                tokens.to_string(),
                "--prompts".into(),
                prompts.join("\n"),
                "--long".into(),
                long,
            ],
        )?;
        println!(
            "transformers (PyTorch, f32 from the same GGUF, static batch of the same prompts):"
        );
        for v in r {
            if let Some(t) = v["prefill_s"].as_f64() {
                println!(
                    "prefill of the same {}-token prompt: {t:.2} s; ragfleet / transformers: {:.2}x the speed",
                    v["prefill_tokens"].as_u64().unwrap_or(0),
                    t / prefill
                );
                continue;
            }
            let (n, ttft, tps) = (
                v["streams"].as_u64().unwrap_or(0),
                v["ttft"].as_f64().unwrap_or(0.0),
                v["rate"].as_f64().unwrap_or(0.0),
            );
            let (mt, mr) = if n == 1 { (ttft1, tps1) } else { (ttft4, tps4) };
            println!(
                "{n:>7}  {ttft:>13.2}  {tps:>22.1}   ragfleet / transformers: TTFT {:.2}x, tokens/s {:.2}x",
                mt / ttft,
                mr / tps
            );
        }
    }
    Ok(())
}

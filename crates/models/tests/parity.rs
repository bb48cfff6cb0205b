//! Parity with the reference implementations' outputs (`tests/fixtures`, made with
//! sentence-transformers / transformers on CPU in f32).
use std::path::PathBuf;

use ragfleet_models::backend::Cpu;
use ragfleet_models::{CrossEncoder, Embedder};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn models_dir() -> PathBuf {
    std::env::var_os("RAGFLEET_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models"))
}

fn fixture(name: &str) -> Value {
    let p = root().join("tests/fixtures").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    d / (na * nb)
}

#[test]
fn minilm_token_ids_and_embeddings_match_reference() {
    let dir = models_dir().join("minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "models missing in {}: run `ragfleet models fetch`",
        dir.display()
    );
    let device = Default::default();
    let emb = Embedder::<Cpu>::load(&dir, &device).expect("embedder loads");
    let fx = fixture("minilm_embeddings.json");
    let cases = fx["cases"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let got = emb.embed(&texts).unwrap();
    // the same inputs split into sub-batches on two lanes (threads) at once
    let emb2 = Embedder::<Cpu>::load(&dir, &device).unwrap().with_lanes(2);
    let got2 = emb2.embed(&texts).unwrap();
    assert_eq!(got2.len(), got.len());
    for (c, (v, v2)) in cases.iter().zip(got.iter().zip(&got2)) {
        let cos = cosine(v, v2);
        assert!(
            cos >= 0.99999,
            "cosine {cos} between 1 and 2 lanes for {:?}",
            c["text"]
        );
    }
    for (c, v) in cases.iter().zip(&got) {
        let ids: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            emb.token_ids(c["text"].as_str().unwrap()).unwrap(),
            ids,
            "token ids of {:?}",
            c["text"]
        );
        let want: Vec<f32> = c["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let cos = cosine(v, &want);
        assert!(cos >= 0.9999, "cosine {cos} for {:?}", c["text"]);
    }
    assert_eq!(emb.identity().dim, 384);
    assert_eq!(
        emb.identity().weights_sha256,
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    );
}

#[test]
fn cross_encoder_logits_match_reference() {
    let device = Default::default();
    let ce = CrossEncoder::<Cpu>::load(&root().join("tests/fixtures/tiny-cross-encoder"), &device)
        .expect("loads");
    let lanes2 =
        CrossEncoder::<Cpu>::load(&root().join("tests/fixtures/tiny-cross-encoder"), &device)
            .expect("loads")
            .with_lanes(2);
    let fx = fixture("cross_encoder_scores.json");
    for c in fx["cases"].as_array().unwrap() {
        let (q, p) = (c["query"].as_str().unwrap(), c["passage"].as_str().unwrap());
        let (ids, types) = ce.encode_pair(q, p).unwrap();
        let want_ids: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let want_types: Vec<u32> = c["token_type_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want_ids);
        assert_eq!(types, want_types);
        let got = ce.score(q, &[p.to_string()]).unwrap()[0];
        let want = c["score"].as_f64().unwrap() as f32;
        assert!((got - want).abs() <= 1e-4 + 5e-5, "logit {got} vs {want}");
        // in one padded batch with longer and shorter passages, the padding changes nothing
        let batch = vec![
            format!("{p} {p} {p}"),
            p.to_string(),
            "a".to_string(),
            format!("{p} and then some more words"),
        ];
        let scores = ce.score(q, &batch).unwrap();
        let on_two_lanes = lanes2.score(q, &batch).unwrap();
        for (a, b) in scores.iter().zip(&on_two_lanes) {
            assert!((a - b).abs() <= 1e-5, "{a} on 1 lane vs {b} on 2");
        }
        assert!(
            (scores[1] - got).abs() <= 1e-5,
            "logit {} in a padded batch vs {got} alone",
            scores[1]
        );
        for (passage, batched) in batch.iter().zip(&scores) {
            let alone = ce.score(q, std::slice::from_ref(passage)).unwrap()[0];
            assert!((alone - batched).abs() <= 1e-5, "{alone} vs {batched}");
        }
    }
}

#[test]
fn smollm2_greedy_ids_and_first_logits_match_reference() {
    use ragfleet_models::llama::Generator;
    let path = models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "models missing: run `ragfleet models fetch`"
    );
    let g = Generator::<Cpu>::load_gguf(&path, &Default::default()).expect("loads");
    let fx = fixture("smollm2_greedy.json");
    for c in fx["cases"].as_array().unwrap() {
        let ids = |k: &str| -> Vec<u32> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let prompt = ids("prompt_ids");
        // our chat template reproduces the reference prompt from its parts
        let text = c["prompt"].as_str().unwrap();
        let user = text
            .split("<|im_start|>user\n")
            .nth(1)
            .unwrap()
            .split("<|im_end|>")
            .next()
            .unwrap();
        assert_eq!(g.tokenizer().chat_prompt("", user), prompt, "prompt ids");
        let logits = g.prompt_logits(&prompt);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(top5, ids("first_step_top5_ids"));
        for (i, want) in c["first_step_top5_logits"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let got = logits[top5[i] as usize];
            assert!(
                (got - want.as_f64().unwrap() as f32).abs() < 1e-2,
                "logit {got} vs {want}"
            );
        }
        let want = ids("greedy_ids");
        let got = g.generate_ids(&prompt, want.len(), 0.0, 1.0, 0);
        assert_eq!(got, want, "greedy ids");
        assert_eq!(
            g.tokenizer()
                .decode(&got[..got.len() - usize::from(got.last() == Some(&2))]),
            c["greedy_text"].as_str().unwrap()
        );
    }
}

/// Serves `jobs` (prompt, sampling) together through the continuous-batching loop; returns
/// each stream's text and end reason.
fn serve_together(
    g: &ragfleet_models::llama::Generator<Cpu>,
    jobs: &[(&str, ragfleet_proto::Sampling)],
    max_tokens: u32,
) -> Vec<(String, Option<&'static str>)> {
    use ragfleet_models::llama::{GenerationRequest, Sink, StreamEvent};
    use std::sync::{Arc, Mutex};
    // all submitted before the loop starts: they are admitted together and decoded in one batch
    // per step
    let (tx, rx) = std::sync::mpsc::channel();
    let outs: Vec<Arc<Mutex<(String, Option<&'static str>)>>> = jobs
        .iter()
        .map(|_| Arc::new(Mutex::new((String::new(), None))))
        .collect();
    for ((p, s), o) in jobs.iter().zip(&outs) {
        let req = GenerationRequest {
            system: String::new(),
            user: p.to_string(),
            max_tokens,
            sampling: s.clone(),
            push_to: None,
        };
        tx.send((req, o.clone())).unwrap();
    }
    drop(tx);
    g.serve(
        rx,
        4,
        |(req, out): (
            GenerationRequest,
            Arc<Mutex<(String, Option<&'static str>)>>,
        )| {
            let sink: Sink = Box::new(move |ev| {
                let mut o = out.lock().unwrap();
                match ev {
                    StreamEvent::Text(t) => o.0.push_str(&t),
                    StreamEvent::Done(r) => o.1 = Some(r),
                    StreamEvent::Error(e) => panic!("{e}"),
                }
                true
            });
            (req, sink)
        },
    );
    outs.iter().map(|o| o.lock().unwrap().clone()).collect()
}

#[test]
fn continuous_batching_gives_each_stream_its_solo_answer_with_or_without_penalties() {
    use ragfleet_models::llama::Generator;
    let path = models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = Generator::<Cpu>::load_gguf(&path, &Default::default()).expect("loads");
    let greedy = ragfleet_proto::Sampling::default();
    let penalised = ragfleet_proto::Sampling {
        repetition_penalty: Some(1.3),
        frequency_penalty: Some(0.2),
        no_repeat_ngram: Some(3),
        ..Default::default()
    };
    let jobs = [
        ("What is the capital of France?", greedy.clone()),
        ("Write one sentence about vector databases.", penalised),
        ("Name a color.", greedy.clone()),
    ];
    let batched = serve_together(&g, &jobs, 12);
    for (job, b) in jobs.iter().zip(&batched) {
        let solo = serve_together(&g, std::slice::from_ref(job), 12);
        assert_eq!(&solo[0], b, "{:?}", job.0);
        assert!(b.1.is_some(), "stream not finished");
    }
    // with penalties off, a stream's tokens are the plain greedy ones (up to where it ended)
    let ids = g.tokenizer().chat_prompt("", jobs[0].0);
    let plain = g.generate_ids(&ids, 40, 0.0, 1.0, 0);
    let plain: Vec<u32> = plain
        .into_iter()
        .filter(|&t| t != g.tokenizer().eos)
        .collect();
    let plain = g.tokenizer().decode(&plain);
    assert!(
        plain.starts_with(&batched[0].0),
        "{plain:?} vs {:?}",
        batched[0].0
    );
}

/// How often the most repeated 4-gram of words occurs in `text`.
fn most_repeated_4gram(text: &str) -> usize {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '!' && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect();
    let mut grams = std::collections::HashMap::new();
    for w in words.windows(4) {
        *grams.entry(w.to_vec()).or_insert(0) += 1;
    }
    grams.values().copied().max().unwrap_or(0)
}

#[test]
fn penalties_stop_a_looping_answer_repeating_itself() {
    use ragfleet_models::llama::Generator;
    let path = models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = Generator::<Cpu>::load_gguf(&path, &Default::default()).expect("loads");
    // greedy SmolLM2 loops on this one ("... is used to create a panic exception, which is a
    // runtime exception ..." again and again)
    let prompt = "What is the panic macro? The panic macro is";
    let plain = serve_together(&g, &[(prompt, ragfleet_proto::Sampling::default())], 120);
    assert!(
        most_repeated_4gram(&plain[0].0) > 2,
        "the unpenalised answer no longer loops: {:?}",
        plain[0].0
    );
    let penalised = ragfleet_proto::Sampling {
        repetition_penalty: Some(1.15),
        no_repeat_ngram: Some(4),
        ..Default::default()
    };
    let out = serve_together(&g, &[(prompt, penalised)], 120);
    let (text, end) = &out[0];
    assert!(most_repeated_4gram(text) <= 2, "{text:?}");
    assert!(end.is_some(), "stream not finished");
}

#[test]
fn a_hugging_face_safetensors_llama_loads_and_matches_the_gguf_model() {
    use ragfleet_models::llama::gguf::{Gguf, Value};
    use ragfleet_models::llama::{hf_tensors, Generator, Llama};
    let path = models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = Gguf::open(&path).unwrap();
    let cfg = Llama::<Cpu>::gguf_config(&g).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // model.safetensors under Hugging Face names
    let tensors = hf_tensors(&g, &cfg).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, (shape, v))| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, shape, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, &None, &dir.path().join("model.safetensors"))
        .unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.ffn,
        "vocab_size": cfg.vocab, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.eps,
        "max_position_embeddings": cfg.context, "tie_word_embeddings": true,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    // tokenizer.json from the GGUF vocabulary
    let strings = |k: &str| -> Vec<String> {
        match g.get(k) {
            Some(Value::Array(v)) => v.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
            _ => panic!("{k}"),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.as_u64().unwrap()).collect(),
        _ => panic!("types"),
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == 3)
        .map(|(i, _)| serde_json::json!({"id": i, "content": tokens[i], "special": true}))
        .collect();
    let tok = serde_json::json!({
        "added_tokens": added,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, {"type": "ByteLevel"}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": strings("tokenizer.ggml.merges")},
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    drop(g);

    let hf = Generator::<Cpu>::load_safetensors(dir.path(), &Default::default())
        .expect("safetensors llama loads");
    let gg = Generator::<Cpu>::load_gguf(&path, &Default::default()).unwrap();
    let prompt = gg.tokenizer().chat_prompt("", "Name three colors.");
    assert_eq!(hf.tokenizer().chat_prompt("", "Name three colors."), prompt);
    assert_eq!(
        hf.generate_ids(&prompt, 8, 0.0, 1.0, 0),
        gg.generate_ids(&prompt, 8, 0.0, 1.0, 0)
    );
}

/// The flex backend runs the attention core and GELU in the crate's own CPU kernels; the
/// ndarray backend runs burn's tensor operations. One padded forward pass of inputs of very
/// different lengths gives the same embeddings on both, and the same as each input alone.
#[test]
fn cpu_kernels_embed_like_burns_tensor_operations() {
    use ragfleet_models::backend::CpuNdArray;
    let dir = models_dir().join("minilm");
    let flex = Embedder::<Cpu>::load(&dir, &Default::default()).expect("embedder loads");
    let nd = Embedder::<CpuNdArray>::load(&dir, &Default::default()).expect("embedder loads");
    let texts = [
        "Ownership".to_string(),
        "How do shards bound the latency of a query?".to_string(),
        "Replication keeps a copy of every shard on another node. ".repeat(30),
        "A reranker rescores the best candidates of the search with a cross-encoder.".to_string(),
    ];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| flex.token_ids(t).unwrap()).collect();
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    assert!(
        lens.iter().max().unwrap() > &200 && lens.iter().min().unwrap() < &8,
        "{lens:?}"
    );
    // one forward pass of all four (three of them padded) on each backend
    let a = flex.embed_ids(&ids);
    let b = nd.embed_ids(&ids);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let cos = cosine(x, y);
        let diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(
            cos >= 0.999_999 && diff < 1e-4,
            "input {i}: cosine {cos}, max diff {diff}"
        );
        // and alone (no padding)
        let alone = flex.embed_ids(std::slice::from_ref(&ids[i]));
        let cos = cosine(x, &alone[0]);
        assert!(cos >= 0.999_999, "input {i} padded vs alone: cosine {cos}");
    }
}

/// Forward passes padded to a few shapes (what a GPU build does, so that every kernel is
/// compiled at start): the same embeddings as unpadded ones; after the warm-up, embedding
/// inputs of any length and count runs no shape the warm-up did not.
#[test]
fn shape_buckets_embed_like_unpadded_passes_and_the_warm_up_covers_them() {
    use ragfleet_models::embedder::Shapes;
    let dir = models_dir().join("minilm");
    let plain = Embedder::<Cpu>::load(&dir, &Default::default()).expect("embedder loads");
    let shapes = Shapes::powers_of_two(256, 8);
    assert_eq!(shapes.lengths, vec![16, 32, 64, 128, 256]);
    assert_eq!(shapes.rows, vec![1, 2, 4, 8]);
    let padded = Embedder::<Cpu>::load(&dir, &Default::default())
        .expect("embedder loads")
        .with_shapes(shapes.clone())
        .with_lanes(2);
    assert_eq!(padded.warm_up(), 20);
    let warmed = padded.forward_shapes();
    let want: Vec<(usize, usize)> = shapes
        .rows
        .iter()
        .flat_map(|&r| shapes.lengths.iter().map(move |&l| (r, l)))
        .collect();
    assert_eq!(warmed, want);
    // 13 texts from 3 to ~250 tokens: sub-batches of up to 8, odd counts, odd lengths
    let texts: Vec<String> = (0..13)
        .map(|i| "Shards answer within their deadline or are left out. ".repeat(1 + i * 2))
        .collect();
    let a = plain.embed(&texts).unwrap();
    let b = padded.embed(&texts).unwrap();
    assert_eq!(b.len(), texts.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let cos = cosine(x, y);
        assert!(
            cos >= 0.999_999,
            "text {i}: cosine {cos} padded vs unpadded"
        );
    }
    assert_eq!(
        padded.forward_shapes(),
        warmed,
        "a shape the warm-up did not run"
    );
    // unpadded, the same texts ran shapes of their own
    assert!(plain.forward_shapes().iter().any(|s| !warmed.contains(s)));
}

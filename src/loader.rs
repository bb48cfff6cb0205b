//! The binary's model loader: burn models on [`Backend`] (CPU, or CUDA with `--features cuda`),
//! loaded once per process and shared by the replicas of a node.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The backend the binary runs models on: CUDA with `--features cuda`, else the CPU default.
#[cfg(feature = "cuda")]
pub type Backend = ragfleet_models::backend::Gpu;
/// The backend the binary runs models on: CUDA with `--features cuda`, else the CPU default.
#[cfg(not(feature = "cuda"))]
pub type Backend = ragfleet_models::backend::Cpu;
use ragfleet_index::ranking::SentenceScorer;
use ragfleet_models::fetch::{EMBEDDER_DIR, GENERATOR_GGUF, RERANKER_DIR};
use ragfleet_models::{CrossEncoder, Embedder};
use ragfleet_proto::GenerationRequest;
use ragfleet_proto::ModelIdentity;
use ragfleet_runtime::models::{GenEvent, TokenCount};
use ragfleet_runtime::{EmbedModel, GenerateModel, ModelLoader, RerankModel};
use Backend as Cpu;

/// The CUDA driver library the GPU backend loads at its first kernel.
const CUDA_DRIVER: &str = "libcuda.so.1";

/// Checks, before any model touches the GPU, that this machine can run the binary's backend:
/// with `--features cuda`, the CUDA driver library must load (without it the driver loader
/// panics deep inside the backend). Always Ok on the CPU backend.
pub fn require_backend() -> Result<(), String> {
    if cfg!(feature = "cuda") {
        require_libraries(&[CUDA_DRIVER]).map_err(|e| {
            format!("this is a CUDA build (--features cuda) but {e}: install the NVIDIA driver, set LD_LIBRARY_PATH to its folder, or use a CPU build")
        })
    } else {
        Ok(())
    }
}

/// Whether each shared library loads; the error names the first that does not.
fn require_libraries(names: &[&str]) -> Result<(), String> {
    for name in names {
        let c = std::ffi::CString::new(*name).map_err(|e| e.to_string())?;
        // SAFETY: dlopen with a valid C string; the handle is closed at once
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if h.is_null() {
            return Err(format!("the library {name} cannot be loaded"));
        }
        // SAFETY: a handle dlopen returned
        unsafe { libc::dlclose(h) };
    }
    Ok(())
}

/// Host threads a model's forward passes run on side by side: one per core on the CPU
/// backend, one on a GPU (see `ragfleet_models::lanes`).
pub fn lanes() -> usize {
    if cfg!(feature = "cuda") {
        1
    } else {
        ragfleet_models::lanes::cpu_lanes()
    }
}

/// Forward passes on the GPU are padded to a few shapes (sequence lengths 16..256, rows 1..128)
/// whose kernels are compiled and tuned here, before the embedder serves (burn's CUDA backend
/// compiles each new input shape on first use: hundreds of milliseconds a shape, which the
/// first queries would otherwise pay). The CPU backend compiles nothing: unchanged.
fn warmed(e: Embedder<Cpu>) -> Embedder<Cpu> {
    if !cfg!(feature = "cuda") {
        return e;
    }
    let max_len = e.identity().max_len as usize;
    let e = e.with_shapes(ragfleet_models::embedder::Shapes::powers_of_two(
        max_len, GPU_ROWS,
    ));
    let t = std::time::Instant::now();
    let n = e.warm_up();
    tracing::info!(
        shapes = n,
        secs = t.elapsed().as_secs_f64(),
        "embedder warmed up"
    );
    e
}

/// Texts per forward pass on the GPU (ingest batches fill it; the CPU runs 32).
const GPU_ROWS: usize = 128;

/// Embedder adapter.
pub struct EmbedderModel(pub Embedder<Cpu>);

impl EmbedModel for EmbedderModel {
    fn identity(&self) -> ModelIdentity {
        self.0.identity().clone()
    }
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        self.0.embed(texts).map_err(|e| e.to_string())
    }
    fn count_tokens(&self, text: &str) -> usize {
        self.0.count_tokens(text)
    }
}

/// Cross-encoder adapter.
pub struct RerankerModel(pub CrossEncoder<Cpu>);

impl RerankModel for RerankerModel {
    fn score(&self, query: &str, passages: &[String]) -> Result<Vec<f32>, String> {
        self.0.score(query, passages).map_err(|e| e.to_string())
    }
}

/// The default reranker while no trained cross-encoder can be fetched: a passage scores its
/// sentence closest to the query ([`SentenceScorer`], in `ragfleet_index::ranking`), the
/// sentences embedded with the embedder. The coordinator fuses this ranking with the retrieval
/// ranking.
pub struct SentenceReranker {
    embedder: Arc<dyn EmbedModel>,
    scorer: SentenceScorer,
}

impl SentenceReranker {
    /// A reranker on `embedder`.
    pub fn new(embedder: Arc<dyn EmbedModel>) -> Self {
        SentenceReranker {
            embedder,
            scorer: SentenceScorer::default(),
        }
    }
}

impl RerankModel for SentenceReranker {
    fn score(&self, query: &str, passages: &[String]) -> Result<Vec<f32>, String> {
        self.scorer
            .score(query, passages, &|texts| self.embedder.embed(texts))
    }
    fn sentence_model(&self) -> Option<ModelIdentity> {
        Some(self.embedder.identity())
    }
}

/// Generator adapter.
pub struct GeneratorModel(pub ragfleet_models::llama::Generator<Cpu>);

impl GenerateModel for GeneratorModel {
    fn count_tokens(&self, text: &str) -> usize {
        self.0.tokenizer().encode(text).len()
    }
    fn serve(
        &self,
        rx: std::sync::mpsc::Receiver<(
            GenerationRequest,
            tokio::sync::mpsc::UnboundedSender<GenEvent>,
        )>,
        max_streams: usize,
    ) {
        self.0.serve(rx, max_streams, |job| {
            let (req, tx) = job;
            let sink = move |ev: ragfleet_models::llama::StreamEvent| {
                let ev = match ev {
                    ragfleet_models::llama::StreamEvent::Text(t) => GenEvent::Text(t),
                    ragfleet_models::llama::StreamEvent::Done(r) => GenEvent::Done(r),
                    ragfleet_models::llama::StreamEvent::Error(e) => GenEvent::Error(e),
                };
                tx.send(ev).is_ok()
            };
            (
                req,
                Box::new(sink)
                    as Box<dyn FnMut(ragfleet_models::llama::StreamEvent) -> bool + Send>,
            )
        })
    }
}

struct Tokens(ragfleet_models::llama::BpeTokenizer);

impl TokenCount for Tokens {
    fn count(&self, text: &str) -> usize {
        self.0.encode(text).len()
    }
}

/// Loads from a models directory, caching.
pub struct ModelFiles {
    dir: PathBuf,
    embedder: Mutex<Option<Arc<dyn EmbedModel>>>,
    reranker: Mutex<Option<Arc<dyn RerankModel>>>,
    generator: Mutex<Option<Arc<dyn GenerateModel>>>,
}

impl ModelFiles {
    /// A loader for `dir`.
    pub fn new(dir: PathBuf) -> Self {
        ModelFiles {
            dir,
            embedder: Mutex::new(None),
            reranker: Mutex::new(None),
            generator: Mutex::new(None),
        }
    }

    /// Loads the embedder (not cached).
    pub fn load_embedder(&self) -> Result<Embedder<Cpu>, String> {
        ragfleet_models::lanes::keep_activation_memory();
        let dir = self.dir.join(EMBEDDER_DIR);
        let e = Embedder::<Cpu>::load(&dir, &Default::default())
            .map(|e| e.with_lanes(lanes()))
            .map_err(|e| {
                format!(
                    "{e} (run `ragfleet models fetch` to download the models into {})",
                    self.dir.display()
                )
            })?;
        Ok(warmed(e))
    }

    /// Loads the generator (not cached): a Llama of the user's in `<models>/generator/` (a
    /// Hugging Face folder or a `.gguf` file there) when present, else the fetched SmolLM2.
    pub fn load_generator(&self) -> Result<ragfleet_models::llama::Generator<Cpu>, String> {
        use ragfleet_models::llama::Generator;
        ragfleet_models::lanes::keep_activation_memory();
        let own = self.dir.join("generator");
        let hint = |e: ragfleet_models::ModelError| {
            format!(
                "{e} (run `ragfleet models fetch` to download the models into {})",
                self.dir.display()
            )
        };
        if own.join("config.json").is_file() {
            return Generator::<Cpu>::load_safetensors(&own, &Default::default())
                .map_err(|e| e.to_string());
        }
        let gguf = std::fs::read_dir(&own).ok().and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "gguf"))
        });
        let path = gguf.unwrap_or_else(|| self.dir.join(GENERATOR_GGUF));
        Generator::<Cpu>::load_gguf(&path, &Default::default()).map_err(hint)
    }

    /// Loads the cross-encoder (not cached).
    pub fn load_reranker(&self) -> Result<CrossEncoder<Cpu>, String> {
        ragfleet_models::lanes::keep_activation_memory();
        let dir = self.dir.join(RERANKER_DIR);
        if !dir.join("model.safetensors").is_file() {
            return Err(format!(
                "no cross-encoder in {} (no trained cross-encoder ships in a reachable registry; see README)",
                dir.display()
            ));
        }
        CrossEncoder::<Cpu>::load(&dir, &Default::default())
            .map(|c| c.with_lanes(lanes()))
            .map_err(|e| e.to_string())
    }
}

impl ModelLoader for ModelFiles {
    fn embedder(&self) -> Result<Arc<dyn EmbedModel>, String> {
        let mut g = self.embedder.lock().expect("loader");
        if g.is_none() {
            *g = Some(Arc::new(EmbedderModel(self.load_embedder()?)));
        }
        Ok(g.clone().expect("set"))
    }
    /// A cross-encoder from `<models>/reranker/` when there is one, else the sentence
    /// reranker on the embedder.
    fn reranker(&self) -> Result<Arc<dyn RerankModel>, String> {
        let mut g = self.reranker.lock().expect("loader");
        if g.is_none() {
            let m: Arc<dyn RerankModel> = if self
                .dir
                .join(RERANKER_DIR)
                .join("model.safetensors")
                .is_file()
            {
                Arc::new(RerankerModel(self.load_reranker()?))
            } else {
                Arc::new(SentenceReranker::new(self.embedder()?))
            };
            *g = Some(m);
        }
        Ok(g.clone().expect("set"))
    }
    fn generator(&self) -> Result<Arc<dyn GenerateModel>, String> {
        let mut g = self.generator.lock().expect("loader");
        if g.is_none() {
            *g = Some(Arc::new(GeneratorModel(self.load_generator()?)));
        }
        Ok(g.clone().expect("set"))
    }
    fn generator_tokens(&self) -> Result<Arc<dyn TokenCount>, String> {
        let path = self.dir.join(GENERATOR_GGUF);
        let t =
            ragfleet_models::llama::BpeTokenizer::from_gguf(&path).map_err(|e| e.to_string())?;
        Ok(Arc::new(Tokens(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_backend_library_is_named_and_a_present_one_passes() {
        let e = require_libraries(&["libc.so.6", "libragfleet-no-such-driver.so.9"]).unwrap_err();
        assert!(e.contains("libragfleet-no-such-driver.so.9"), "{e}");
        require_libraries(&["libc.so.6"]).unwrap();
        // the CPU build needs nothing more
        if !cfg!(feature = "cuda") {
            require_backend().unwrap();
        }
    }
}

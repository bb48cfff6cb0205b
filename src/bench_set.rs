//! The vectors and texts `bench shard` writes and searches: its synthetic set (clustered
//! vectors, Zipf texts), or a set of real embeddings from a `.fvecs` file (`ragfleet embed
//! --fvecs`, or the ANN benchmarks' files) with their texts from a file of lines.
use std::path::Path;

use anyhow::{bail, Context, Result};
use ragfleet_index::eval::{bench_shard_set, Zipf};
use ragfleet_index::vector::normalize;
use rand::rngs::StdRng;

/// Vectors, one a row.
pub type Rows = Vec<Vec<f32>>;

/// Where the bench's documents and queries come from.
pub struct BenchSet {
    dim: usize,
    zipf: Zipf,
    file: Option<FileSet>,
}

/// A set read from files: the rows the shards are written from, and the held-out rows the
/// queries are made of.
struct FileSet {
    name: String,
    rows: Vec<Vec<f32>>,
    queries: Vec<Vec<f32>>,
    texts: Option<(Vec<String>, Vec<String>)>,
}

impl BenchSet {
    /// `bench shard`'s synthetic set: 50 clusters of 24 directions, noise 0.1 (the vectors at
    /// unit length), 12-word texts from a Zipf vocabulary of 20,000 words.
    pub fn synthetic(dim: usize) -> BenchSet {
        BenchSet {
            dim,
            zipf: Zipf::new(20_000),
            file: None,
        }
    }

    /// Real vectors from `vectors` (`.fvecs`), normalised; its last `queries` rows are held out
    /// as the queries. `texts`: one line a row, in the same order (BM25's documents, and the
    /// held-out rows' lines its queries); without it the texts are the synthetic set's.
    pub fn from_files(vectors: &Path, texts: Option<&Path>, queries: usize) -> Result<BenchSet> {
        let mut rows = ragfleet_index::fvecs::read(vectors)?;
        let dim = rows.first().map_or(0, Vec::len);
        if rows.len() <= queries {
            bail!(
                "{} holds {} vectors: more than the {queries} queries held out of it are needed",
                vectors.display(),
                rows.len()
            );
        }
        for r in &mut rows {
            normalize(r);
        }
        let texts = match texts {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                if lines.len() != rows.len() {
                    bail!(
                        "{} has {} lines for the {} vectors of {}: one line a vector",
                        path.display(),
                        lines.len(),
                        rows.len(),
                        vectors.display()
                    );
                }
                let held = lines.split_off(lines.len() - queries);
                Some((lines, held))
            }
        };
        let held = rows.split_off(rows.len() - queries);
        Ok(BenchSet {
            dim,
            zipf: Zipf::new(20_000),
            file: Some(FileSet {
                name: vectors.display().to_string(),
                rows,
                queries: held,
                texts,
            }),
        })
    }

    /// A file set's rows and held-out queries (`None` for the synthetic set).
    pub fn into_rows(self) -> Option<(Rows, Rows)> {
        self.file.map(|f| (f.rows, f.queries))
    }

    /// The vectors' dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The most chunks a size may have: a file's rows less the queries (none for the
    /// synthetic set).
    pub fn max_size(&self) -> Option<usize> {
        self.file.as_ref().map(|f| f.rows.len())
    }

    /// One line saying what the set is.
    pub fn describe(&self) -> String {
        match &self.file {
            None => format!(
                "synthetic set: {} dims, 50 clusters of 24 directions, noise 0.1; 12-word Zipf texts",
                self.dim
            ),
            Some(f) => format!(
                "vectors from {} ({} rows of {} dims written, {} held out as queries); {}",
                f.name,
                f.rows.len(),
                self.dim,
                f.queries.len(),
                if f.texts.is_some() {
                    "texts from its lines, the held-out lines as BM25's queries"
                } else {
                    "12-word Zipf texts"
                }
            ),
        }
    }

    /// `count` vectors from draw number `first` on, at unit length: the synthetic set's draws
    /// (the same for the same numbers), or the file's rows from `first` on, over again from
    /// the first row past the last (later writes repeat vectors under new ids).
    pub fn vectors(&self, first: usize, count: usize) -> Vec<Vec<f32>> {
        match &self.file {
            None => bench_shard_set(count, self.dim, first as u64 + 1),
            Some(f) => (first..first + count)
                .map(|i| f.rows[i % f.rows.len()].clone())
                .collect(),
        }
    }

    /// The text of document number `i`: its line, or 12 Zipf words.
    pub fn text(&self, i: usize, rng: &mut StdRng) -> String {
        match self.file.as_ref().and_then(|f| f.texts.as_ref()) {
            Some((lines, _)) => lines[i % lines.len()].clone(),
            None => self.zipf.text(rng),
        }
    }

    /// `count` dense queries: the held-out rows (as many as there are), or the synthetic
    /// set's own draws.
    pub fn query_vectors(&self, count: usize) -> Vec<Vec<f32>> {
        match &self.file {
            None => bench_shard_set(count, self.dim, u64::MAX - 1),
            Some(f) => f.queries.iter().take(count).cloned().collect(),
        }
    }

    /// `count` BM25 queries: the held-out lines, or three Zipf words each.
    pub fn bm25_queries(&self, count: usize, rng: &mut StdRng) -> Vec<String> {
        match self.file.as_ref().and_then(|f| f.texts.as_ref()) {
            Some((_, held)) => held.iter().take(count).cloned().collect(),
            None => (0..count)
                .map(|_| {
                    (0..3)
                        .map(|_| self.zipf.word(rng))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect(),
        }
    }
}

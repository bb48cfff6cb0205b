//! `ragfleet bench index`: one HNSW graph's build time and its recall/QPS curve, beside
//! instant-distance (`index.ann`), hnswlib and faiss on the same vectors in the same run.
use anyhow::Result;
use ragfleet_index::vector::{int8_kernel, Int8Kernel};

use super::{reference, threads};

/// The index's reference script (hnswlib, faiss).
const ANN_REFERENCE: &str = "crates/index/bench/ann_reference.py";

/// What `bench index` is asked to measure (its arguments).
pub(super) struct IndexBench {
    pub(super) n: usize,
    pub(super) nq: usize,
    pub(super) efs: Vec<usize>,
    pub(super) efc: usize,
    pub(super) m: usize,
    pub(super) instant: bool,
    pub(super) kernels: Vec<Int8Kernel>,
    pub(super) clusters: usize,
    pub(super) intrinsic: usize,
    pub(super) noise: f32,
    pub(super) vectors: Option<std::path::PathBuf>,
    pub(super) reference: Option<std::path::PathBuf>,
}

/// The int8 kernels `--int8-kernels` names (none: the one this CPU uses), each checked to run
/// here.
pub(super) fn kernels(names: &[String]) -> Result<Vec<Int8Kernel>> {
    if names.is_empty() {
        return Ok(vec![int8_kernel()]);
    }
    names
        .iter()
        .map(|name| match Int8Kernel::parse(name.trim()) {
            Some(k) if k.available() => Ok(k),
            Some(_) => Err(anyhow::anyhow!(
                "--int8-kernels: this CPU cannot run {name}; it runs {}",
                kernel_names()
            )),
            None => Err(anyhow::anyhow!(
                "--int8-kernels: no kernel is named {name:?}; this CPU runs {}",
                kernel_names()
            )),
        })
        .collect()
}

/// The int8 kernels this CPU runs, by name.
fn kernel_names() -> String {
    Int8Kernel::usable()
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One point of a recall/QPS curve.
struct Point {
    lib: String,
    ef: usize,
    recall: f64,
    qps: f64,
}

/// One graph of the set beside instant-distance (unless left out), hnswlib and faiss (with
/// `--reference`), each int8 kernel asked for: build time, then recall@10 and QPS at each beam.
pub(super) fn index(b: IndexBench) -> Result<()> {
    use ragfleet_index::ann::{exact_top_k, Ann};
    use ragfleet_index::eval::{clustered_with, write_rows_le};
    use ragfleet_index::hnsw::{Hnsw, HnswParams};
    use ragfleet_index::vector::normalize;
    use std::time::Instant;
    const K: usize = 10;
    let threads = threads();
    let norm = |mut v: Vec<f32>| {
        normalize(&mut v);
        v
    };
    let t = Instant::now();
    let (data, queries, what) = match &b.vectors {
        None => (
            clustered_with(b.n, 384, b.clusters, b.intrinsic, b.noise, 1, 2)
                .into_iter()
                .map(norm)
                .collect::<Vec<_>>(),
            clustered_with(b.nq, 384, b.clusters, b.intrinsic, b.noise, 1, 3)
                .into_iter()
                .map(norm)
                .collect::<Vec<_>>(),
            format!(
                "{} clusters, {} directions each, noise {}",
                b.clusters, b.intrinsic, b.noise
            ),
        ),
        Some(path) => {
            let (mut rows, queries) = crate::bench_set::BenchSet::from_files(path, None, b.nq)?
                .into_rows()
                .ok_or_else(|| anyhow::anyhow!("{} read as no file set", path.display()))?;
            rows.truncate(b.n);
            (rows, queries, format!("from {}", path.display()))
        }
    };
    let dim = data.first().map_or(0, Vec::len);
    println!(
        "{} vectors x {dim} ({what}), {} queries, k = {K}, M = {}, ef_construction = {}, \
         {threads} build threads, 1 search thread; data {:.1} s",
        data.len(),
        b.nq,
        b.m,
        b.efc,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let truth = exact_top_k(&data, &queries, K, threads);
    let exact_qps = b.nq as f64 / t.elapsed().as_secs_f64() / threads as f64;
    println!("exact scan: {exact_qps:.0} QPS per thread (the truth for recall)");

    let mut points: Vec<Point> = Vec::new();
    let mut builds: Vec<(String, f64)> = Vec::new();
    let ef_list = b
        .efs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if let Some(py) = &b.reference {
        let dir = tempfile::tempdir()?;
        write_rows_le(&dir.path().join("vectors.f32"), &data, f32::to_le_bytes)?;
        write_rows_le(&dir.path().join("queries.f32"), &queries, f32::to_le_bytes)?;
        write_rows_le(&dir.path().join("truth.u32"), &truth, u32::to_le_bytes)?;
        let args: Vec<String> = [
            "--dir",
            &dir.path().to_string_lossy(),
            "--dim",
            &dim.to_string(),
            "--k",
            &K.to_string(),
            "--m",
            &b.m.to_string(),
            "--efc",
            &b.efc.to_string(),
            "--ef",
            &ef_list,
        ]
        .map(String::from)
        .to_vec();
        for v in reference(py, ANN_REFERENCE, &args)? {
            let lib = v["lib"].as_str().unwrap_or("?").to_string();
            if let Some(s) = v["build_s"].as_f64() {
                builds.push((lib, s));
            } else {
                points.push(Point {
                    lib,
                    ef: v["ef"].as_u64().unwrap_or(0) as usize,
                    recall: v["recall"].as_f64().unwrap_or(0.0),
                    qps: v["qps"].as_f64().unwrap_or(0.0),
                });
            }
        }
    }

    let dim_flat: Vec<f32> = data.iter().flatten().copied().collect();
    let score = |found: &[Vec<u32>]| -> f64 {
        let hit: usize = found
            .iter()
            .zip(&truth)
            .map(|(f, t)| t.iter().filter(|x| f.contains(x)).count())
            .sum();
        hit as f64 / (K * b.nq) as f64
    };
    let params = HnswParams {
        m: b.m,
        ef_construction: b.efc,
        seed: 1,
    };
    // one point of a curve: every query timed on one thread, recall against the truth
    let point = |lib: &str, ef: usize, search: &mut dyn FnMut(&[f32]) -> Vec<u32>| {
        let t = Instant::now();
        let found: Vec<Vec<u32>> = queries.iter().map(|q| search(q)).collect();
        Point {
            lib: lib.into(),
            ef,
            recall: score(&found),
            qps: b.nq as f64 / t.elapsed().as_secs_f64(),
        }
    };
    let in_use = int8_kernel();
    for (i, &kernel) in b.kernels.iter().enumerate() {
        ragfleet_index::vector::set_int8_kernel(kernel);
        let lib = if i == 0 {
            "ragfleet".to_string()
        } else {
            format!("rf-{}", kernel.name())
        };
        let t = Instant::now();
        let own = Hnsw::build(dim, &dim_flat, params, threads);
        builds.insert(i, (lib.clone(), t.elapsed().as_secs_f64()));
        for &ef in &b.efs {
            points.push(point(&lib, ef, &mut |q| {
                let exact = |i: u32| ragfleet_index::vector::dot(q, &data[i as usize]);
                own.search_with(q, K, ef, &|_| true, Some(&exact))
                    .into_iter()
                    .map(|x| x.1)
                    .collect()
            }));
        }
        println!(
            "{lib} graph (int8 kernel {}) in memory: {:.1} MB ({:.0} bytes a vector)",
            kernel.name(),
            own.memory_bytes() as f64 / 1e6,
            own.memory_bytes() as f64 / data.len() as f64
        );
    }
    ragfleet_index::vector::set_int8_kernel(in_use);
    drop(dim_flat);
    if b.instant {
        let t = Instant::now();
        let mut ann = Ann::build(data, b.efc, b.efs.first().copied().unwrap_or(K), 1);
        builds.push(("instant".into(), t.elapsed().as_secs_f64()));
        let mut search = ragfleet_index::ann::Search::default();
        for &ef in &b.efs {
            ann = ann.with_ef_search(ef.max(K))?;
            points.push(point("instant", ef, &mut |q| ann.search(q, K, &mut search)));
        }
    }

    println!("\n{:<16} {:>10}", "library", "build s");
    for (lib, s) in &builds {
        println!("{lib:<16} {s:>10.1}");
    }
    println!(
        "\n{:<16} {:>5} {:>10} {:>10}",
        "library", "ef", "recall@10", "QPS"
    );
    for p in &points {
        println!(
            "{:<16} {:>5} {:>10.4} {:>10.0}",
            p.lib, p.ef, p.recall, p.qps
        );
    }
    println!("\nbest QPS at a recall target (ef in brackets); ratios are ragfleet / other");
    let libs: Vec<String> = builds.iter().map(|(l, _)| l.clone()).collect();
    for target in [0.90, 0.95, 0.99] {
        let best = |lib: &str| {
            points
                .iter()
                .filter(|p| p.lib == lib && p.recall >= target)
                .max_by(|a, b| a.qps.total_cmp(&b.qps))
        };
        let mine = best("ragfleet");
        let mut line = format!("recall >= {target:.2}:");
        for lib in &libs {
            match best(lib) {
                Some(p) => line += &format!("  {lib} {:.0} QPS (ef {})", p.qps, p.ef),
                None => line += &format!("  {lib} not reached"),
            }
        }
        for lib in libs.iter().skip(1) {
            if let (Some(m), Some(o)) = (mine, best(lib)) {
                line += &format!("  x{:.2} vs {lib}", m.qps / o.qps);
            }
        }
        println!("{line}");
    }
    let mine = builds[0].1;
    for (lib, s) in builds.iter().skip(1) {
        println!("build time: ragfleet / {lib} = {:.2}", mine / s);
    }
    Ok(())
}

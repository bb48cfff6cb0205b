//! How long a seal holds a shard's index after one delete beside many deletion records:
//! `cargo run --release -p ragfleet-index --example seal_hold -- 1000000` writes that many
//! one-chunk documents (8-d vectors) into one sealed segment, deletes half of them, then
//! deletes one more before each of eight seals and prints each seal's time and the deletion
//! records' files. Then it deletes a quarter more, writes their records ahead
//! (`ShardIndex::prepare_deletions`, what a replica does under its read lock) and times the
//! seal after it.
use ragfleet_index::eval::synthetic_model;
use ragfleet_index::{IndexSettings, ShardIndex};
use ragfleet_proto::{ChunkRecord, WriteOp};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(8);
    let settings = IndexSettings {
        segment_size: 1 << 30,
        background: true,
        ..Default::default()
    };
    let (mut ix, _) = ShardIndex::open(dir.path(), settings).unwrap();
    for b in 0..n / 10_000 {
        let ops = (b * 10_000..(b + 1) * 10_000)
            .map(|i| WriteOp::Upsert {
                version: 0,
                doc_id: format!("document-{i:08}"),
                chunks: vec![ChunkRecord {
                    doc_id: format!("document-{i:08}"),
                    chunk_id: format!("document-{i:08}#0"),
                    text: format!("text {i}"),
                    vector: (0..8).map(|d| ((i * 7 + d) % 13) as f32 - 6.0).collect(),
                    sentences: Default::default(),
                }],
            })
            .collect();
        ix.write(ops, &model).unwrap();
    }
    ix.seal().unwrap();
    let ids: Vec<String> = (0..n / 2).map(|i| format!("document-{i:08}")).collect();
    let t = Instant::now();
    ix.delete(&ids, 100).unwrap();
    println!(
        "delete of {} documents {:.1} ms",
        ids.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    ix.seal().unwrap();
    println!(
        "first seal after it {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    ix.seal().unwrap();
    println!("second seal {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let mut v = Vec::new();
    for r in 0..8 {
        ix.delete(&[format!("document-{:08}", n / 2 + r)], 200 + r as u64)
            .unwrap();
        let t = Instant::now();
        ix.seal().unwrap();
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "seal after one delete: {:?} ms",
        v.iter()
            .map(|x| (x * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    let files: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with("deletions-"))
        .map(|f| {
            (
                f.file_name().to_string_lossy().to_string(),
                f.metadata().unwrap().len(),
            )
        })
        .collect();
    println!("deletion files {files:?}");
    // another quarter deleted, its records written ahead (as a replica does beside its
    // searches) before the seal that names them
    let ids: Vec<String> = (n / 2 + 8..n / 2 + 8 + n / 4)
        .map(|i| format!("document-{i:08}"))
        .collect();
    ix.delete(&ids, 300).unwrap();
    let t = Instant::now();
    ix.prepare_deletions().unwrap();
    let ahead = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    ix.seal().unwrap();
    println!(
        "after deleting {} more: records written ahead in {ahead:.1} ms, then the seal {:.1} ms",
        ids.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
}

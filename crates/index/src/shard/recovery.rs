//! Opening a shard index: the manifest, sealed segments with their BM25 snapshots, the log
//! tail replayed; corrupt files reported and never loaded.
use super::*;
use crate::postings::{Built, SegPostings};

impl ShardIndex {
    /// Opens the index in `dir` (created if missing), recovering from the snapshot files and the
    /// log tail. Corrupt files are reported, never loaded. Takes an exclusive lock on `dir`
    /// ([`IndexError::Locked`] while another owner holds it), released when the index drops.
    pub fn open(
        dir: &Path,
        settings: IndexSettings,
    ) -> Result<(ShardIndex, RecoveryReport), IndexError> {
        let lock = crate::DirLock::acquire(dir)?;
        let mut report = RecoveryReport::default();
        let mut aside = SetAside::new(dir);
        let ((manifest, deletions, deletions_log), manifest_ok) = match read_manifest(dir) {
            Ok(m) => (m, true),
            Err(e) => {
                // without the manifest (or the deletion records it names) the segments cannot
                // be trusted: start empty, catch up; the files go aside as they are, so that
                // the segments sealed from now on (numbered from 0 again) overwrite nothing
                report.problems.push(e.to_string());
                report.needs_catch_up = true;
                aside.keep_matching(|n| {
                    n.starts_with("seg-")
                        || n.starts_with("deletions-")
                        || n.starts_with("manifest")
                        || n == "purged.bin"
                        || n == SUPERSEDED
                })?;
                let empty = (
                    Manifest::default(),
                    Deletions::default(),
                    Default::default(),
                );
                (empty, false)
            }
        };
        let no_manifest = [MANIFEST, MANIFEST_V2, MANIFEST_V1]
            .iter()
            .all(|m| !dir.join(m).exists());
        let (wal, wal_rec) = Wal::open_marked(&dir.join("wal.log"), codec::WAL_MARKER)?;
        // a crash in the folder's first seal (after its files, before its manifest): the log
        // still holds every write the folder was sent, so the files are an uncommitted seal's
        // and go to the removal of unlisted files below
        let first_seal = manifest_ok
            && no_manifest
            && log_holds_all_writes(&wal_rec)
            && !dir.join(SUPERSEDED).exists();
        if manifest_ok && no_manifest && !first_seal {
            // segment files and no manifest, and the log cannot show that it holds every write
            // (it was emptied since the folder's first, or is damaged): a manifest was lost.
            // They go aside, not to the removal below
            aside.keep_matching(|n| {
                n.starts_with("seg-") || n.starts_with("deletions-") || n == SUPERSEDED
            })?;
            if aside.folder().is_some() {
                report
                    .problems
                    .push("segment files beside no manifest".to_string());
                report.needs_catch_up = true;
            }
        }
        if manifest_ok {
            let removed = remove_unreferenced(dir, &manifest, &deletions_log.files());
            if first_seal && removed > 0 {
                info!(dir = %dir.display(), files = removed, "removed the files of a first seal that never committed; the log holds their writes");
            }
        }
        let mut ix = ShardIndex {
            _lock: lock,
            dir: dir.to_path_buf(),
            settings,
            log: std::sync::Mutex::new(write::LogState::new(wal)),
            model: manifest.model.clone(),
            last_seq: manifest.last_seq,
            sealed_seq: manifest.last_seq,
            next_segment_id: manifest.next_segment_id,
            sealed: Vec::new(),
            growing: Default::default(),
            docs: Default::default(),
            records: deletions,
            deletions_log,
            deletions_ahead: Default::default(),
            manifest_ahead: Default::default(),
            to_free: Default::default(),
            bm25: Bm25::default(),
            slots: Default::default(),
            next_slot: 0,
            purged_below: 0,
            merges: Vec::new(),
            last_write: std::time::Instant::now(),
            generation: 0,
            graphs_done: Default::default(),
            freeing: Default::default(),
            freed_since_give_back: Default::default(),
            rebinding: Default::default(),
            prune_due: false,
            merge_commits: Default::default(),
            planned_at: (u64::MAX, 0, false),
            digests: Default::default(),
            hits_cold: Default::default(),
        };
        let purge_path = dir.join("purged.bin");
        let problem = match read_checked(&purge_path) {
            Ok(None) => None,
            Ok(Some(b)) => match postcard::from_bytes::<u64>(&b) {
                Ok(v) => {
                    ix.purged_below = v;
                    None
                }
                Err(e) => Some(format!("{}: {e}", purge_path.display())),
            },
            Err(e) => Some(e.to_string()),
        };
        if let Some(p) = problem {
            report.problems.push(p);
            // unknown horizon: assume every record past the grace period was dropped
            ix.purged_below = ix.grace_horizon().unwrap_or(0);
        }
        let mut superseded = read_superseded(dir, &mut report);
        let mut grew = false;
        for meta in &manifest.segments {
            match ix.load_segment(meta, &mut report) {
                Ok(seg) => ix.sealed.push(seg),
                Err(e) => {
                    // its files go aside rather than being removed as unlisted at the next
                    // open (their intact chunks can still be read from them by hand)
                    report.problems.push(e.to_string());
                    report.needs_catch_up = true;
                    // whose copies it held, when its id table still reads: an older copy of
                    // theirs elsewhere must not be served in their place
                    for p in &meta.parts {
                        let ids = crate::datafile::salvage_ids(&ix.segment_path(*p));
                        for (seq, doc) in ids.into_iter().flatten() {
                            if seq > manifest.last_seq {
                                continue;
                            }
                            let s = superseded.entry(doc).or_insert(0);
                            grew |= seq > *s;
                            *s = (*s).max(seq);
                        }
                    }
                    let own = [".hnsw", ".post", ".bm25"].map(|x| format!("seg-{}{x}", meta.id));
                    let parts = meta.parts.iter().map(|p| format!("seg-{p}.bin"));
                    aside.keep_matching(|n| {
                        own.iter().any(|o| o == n) || parts.clone().any(|p| p == n)
                    })?;
                }
            }
        }
        if let Some(to) = aside.folder() {
            report.problems.push(format!(
                "the files that could not be loaded were moved to {}",
                to.display()
            ));
        }
        if grew {
            let mut v: Vec<(&String, &u64)> = superseded.iter().collect();
            v.sort();
            let written = postcard::to_stdvec(&v)
                .map_err(|e| IndexError::BadInput(e.to_string()))
                .and_then(|b| write_checked(&dir.join(SUPERSEDED), &b));
            if let Err(e) = written {
                report.problems.push(format!("{e}"));
            }
        }
        report.segments = ix.sealed.len();
        ix.rebuild_liveness(&superseded);
        if !wal_rec.damage.is_empty() {
            // not a torn tail: acknowledged writes between the intact records are lost
            report.needs_catch_up = true;
            for d in &wal_rec.damage {
                report
                    .problems
                    .push(format!("write-ahead log damaged: {d}"));
            }
            if let Some(kept) = &wal_rec.damaged_copy {
                report.problems.push(format!(
                    "write-ahead log as found kept at {}",
                    kept.display()
                ));
            }
        }
        if let Some(err) = &wal_rec.tail_error {
            report.problems.push(format!(
                "write-ahead log: {err}; {} bytes dropped",
                wal_rec.dropped_bytes
            ));
        }
        for (i, raw) in wal_rec.records.iter().enumerate() {
            let rec: WalRecord = match codec::decode_wal(raw) {
                Ok(r) => r,
                Err(e) => {
                    report
                        .problems
                        .push(format!("write-ahead log record {i} does not decode: {e}"));
                    report.needs_catch_up = true;
                    break;
                }
            };
            for (j, op) in rec.ops.into_iter().enumerate() {
                let seq = rec.first_seq + j as u64;
                if seq > ix.last_seq {
                    if ix.model.is_none() {
                        ix.model = Some(rec.model.clone());
                    }
                    ix.apply_in_memory(seq, op);
                    ix.last_seq = seq;
                }
            }
            report.replayed += 1;
        }
        for seg in &ix.sealed {
            ix.spawn_graph(seg.clone(), true);
        }
        // segments left unmerged by a crash (or listed by the first format) merge now or, in
        // the background, once their graphs are loaded
        if let Err(e) = ix.maintain() {
            warn!(dir = %dir.display(), error = %e, "merge at open failed");
        }
        info!(dir = %dir.display(), segments = report.segments, replayed = report.replayed, docs = ix.docs.len(), "shard index opened");
        Ok((ix, report))
    }

    /// Loads a sealed segment's data files and BM25 postings (its graph comes later, in the
    /// background). Postings missing (a folder of an earlier version) or damaged (reported)
    /// are rebuilt from the chunks' text and written again.
    fn load_segment(
        &self,
        meta: &SegmentMeta,
        report: &mut RecoveryReport,
    ) -> Result<Arc<Segment>, IndexError> {
        let mut parts = Vec::with_capacity(meta.parts.len());
        let mut all = Vec::new();
        for &part in &meta.parts {
            let path = self.segment_path(part);
            let entries = crate::datafile::read(&path)?.ok_or_else(|| IndexError::Corrupt {
                path: path.clone(),
                reason: "segment file listed in the manifest is missing".into(),
            })?;
            parts.push((part, entries.len()));
            all.extend(entries.into_iter().map(Arc::new));
        }
        let path = self.postings_path(meta.id);
        let postings = match SegPostings::open(&path, all.len()) {
            Ok(Some(p)) => {
                report.bm25_snapshots += 1;
                p
            }
            found => {
                match found {
                    Err(e) => report.problems.push(format!(
                        "{e}; BM25 postings rebuilt from the segment's text"
                    )),
                    _ => info!(segment = meta.id, "no BM25 postings file; building it"),
                }
                let built = Built::of(all.iter().map(|e| e.text()));
                SegPostings::write(&path, &[&built]).or_else(|e| {
                    warn!(error = %e, "could not write BM25 postings; holding them in memory");
                    SegPostings::in_memory(&[&built])
                })?
            }
        };
        Ok(Arc::new(Segment::with_parts(meta.id, parts, all, postings)))
    }

    /// Recomputes document liveness and slots from the sealed segments and tombstones.
    pub(super) fn rebuild_liveness(&mut self, superseded: &HashMap<String, u64>) {
        let sealed = self.sealed.clone();
        // keyed by the ids as the chunks hold them (a mapped chunk's in its file): no copy
        let mut latest: HashMap<&str, u64> = HashMap::new();
        for e in sealed.iter().flat_map(|s| s.entries.iter()) {
            let s = latest.entry(e.doc_id()).or_insert(0);
            *s = (*s).max(e.seq);
        }
        latest.retain(|doc, seq| {
            self.records.tombstone(doc).is_none_or(|t| t < *seq)
                && superseded.get(*doc).is_none_or(|&s| s < *seq)
        });
        self.docs.clear();
        self.slots.clear();
        self.bm25 = Bm25::default();
        let live = |e: &Entry| latest.get(e.doc_id()) == Some(&e.seq);
        for e in sealed.iter().flat_map(|s| s.entries.iter()) {
            if live(e) {
                self.add_live(e.clone());
            } else {
                e.mark_dead();
            }
        }
        self.digests = self.compute_digests();
    }
}

/// The newest manifest in `dir` (formats 3, 2, 1, in that order) with its deletion records.
fn read_manifest(
    dir: &Path,
) -> Result<(Manifest, Deletions, super::deletions::DeletionLog), IndexError> {
    let path = dir.join(MANIFEST);
    let corrupt = |path: &Path, e: postcard::Error| IndexError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if let Some(b) = read_checked(&path)? {
        let m: Manifest = postcard::from_bytes(&b).map_err(|e| corrupt(&path, e))?;
        let (log, d) = super::deletions::DeletionLog::open(dir, m.deletions)?;
        return Ok((m, d, log));
    }
    let v2 = dir.join(MANIFEST_V2);
    let v1 = dir.join(MANIFEST_V1);
    let old: ManifestV2 = match (read_checked(&v2)?, read_checked(&v1)?) {
        (Some(b), _) => postcard::from_bytes(&b).map_err(|e| corrupt(&v2, e))?,
        (None, Some(b)) => postcard::from_bytes::<ManifestV1>(&b)
            .map(ManifestV2::from)
            .map_err(|e| corrupt(&v1, e))?,
        (None, None) => ManifestV2::default(),
    };
    // the records were inside the manifest: a base file at the next manifest write
    let mut log = super::deletions::DeletionLog::default();
    if !old.tombstones.is_empty() || !old.deleted.is_empty() {
        log.rebase_at_next_write();
    }
    Ok((
        Manifest {
            last_seq: old.last_seq,
            segments: old.segments,
            deletions: 0,
            model: old.model,
            next_segment_id: old.next_segment_id,
        },
        Deletions::from_maps(old.tombstones, old.deleted),
        log,
    ))
}

/// The documents whose newest copy was in a data file that did not load, with that copy's
/// sequence number (read from its id table): a copy of theirs at that number or below is older
/// and never served, so that a damaged file does not bring a replaced version back. Kept across
/// opens, since the damaged file is no longer listed after the next manifest.
const SUPERSEDED: &str = "superseded.bin";

fn read_superseded(dir: &Path, report: &mut RecoveryReport) -> HashMap<String, u64> {
    let path = dir.join(SUPERSEDED);
    let read = read_checked(&path).and_then(|b| {
        b.map(|b| {
            postcard::from_bytes::<Vec<(String, u64)>>(&b).map_err(|e| IndexError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })
        })
        .transpose()
    });
    match read {
        Ok(v) => v.unwrap_or_default().into_iter().collect(),
        Err(e) => {
            // an older copy of a document it named may now be served until a catch-up
            report.problems.push(e.to_string());
            report.needs_catch_up = true;
            HashMap::new()
        }
    }
}

/// Files of a shard folder that could not be loaded, moved into `damaged-<n>/` beside them (n
/// the first free, made at the first move) instead of being overwritten by the state written
/// next or removed as unlisted: nothing a disk held is deleted by a recovery.
struct SetAside {
    dir: PathBuf,
    to: Option<PathBuf>,
}

impl SetAside {
    fn new(dir: &Path) -> Self {
        SetAside {
            dir: dir.to_path_buf(),
            to: None,
        }
    }

    /// Moves the folder's files whose names match; the folder they went to, once one did.
    fn keep_matching(&mut self, matches: impl Fn(&str) -> bool) -> Result<(), IndexError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| IndexError::io(&self.dir, e))?;
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if !f.file_type().is_ok_and(|t| t.is_file()) || !matches(&name) {
                continue;
            }
            let to = match &self.to {
                Some(to) => to.clone(),
                None => {
                    let to = (1u32..)
                        .map(|n| self.dir.join(format!("damaged-{n}")))
                        .find(|p| !p.exists())
                        .expect("a free name");
                    std::fs::create_dir(&to).map_err(|e| IndexError::io(&to, e))?;
                    self.to = Some(to.clone());
                    to
                }
            };
            std::fs::rename(f.path(), to.join(&name)).map_err(|e| IndexError::io(&f.path(), e))?;
            warn!(file = %name, to = %to.display(), "moved a file that could not be loaded aside");
        }
        if let Some(to) = &self.to {
            crate::files::sync_dir(&self.dir);
            crate::files::sync_dir(to);
        }
        Ok(())
    }

    fn folder(&self) -> Option<&Path> {
        self.to.as_deref()
    }
}

/// Whether the log holds every write its folder was ever sent: it reads without damage from its
/// first byte, and its first record is numbered 1, as a folder's first write is. A log is
/// emptied only after a manifest has committed its writes, and the writes logged after that
/// are numbered past the manifest's last (from 2 on, once it holds any).
fn log_holds_all_writes(rec: &crate::wal::WalRecovery) -> bool {
    rec.damage.is_empty()
        && rec
            .records
            .first()
            .is_some_and(|raw| codec::decode_wal(raw).is_ok_and(|r| r.first_seq == 1))
}

/// Removes what a crash can leave behind: temporary files, and segment files (data, BM25,
/// graph) the manifest does not list (a merge or seal that did not reach its manifest write,
/// or the sources of one that did). Returns how many segment files it removed.
fn remove_unreferenced(dir: &Path, m: &Manifest, deletion_files: &[String]) -> usize {
    let mut keep: HashSet<String> = deletion_files.iter().cloned().collect();
    for s in &m.segments {
        keep.insert(format!("seg-{}.hnsw", s.id));
        keep.insert(format!("seg-{}.post", s.id));
        for p in &s.parts {
            keep.insert(format!("seg-{p}.bin"));
        }
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for f in rd.flatten() {
        let name = f.file_name().to_string_lossy().to_string();
        let temporary =
            name.ends_with(".tmp") || name.ends_with(".merging") || name == MANIFEST_AHEAD;
        let segment_file = (name.starts_with("seg-")
            && [".bin", ".bm25", ".post", ".hnsw"]
                .iter()
                .any(|x| name.ends_with(x)))
            || (name.starts_with("deletions-")
                && (name.ends_with(".bin") || name.ends_with(".delta")));
        if temporary || (segment_file && !keep.contains(&name)) {
            match std::fs::remove_file(f.path()) {
                Ok(()) => {
                    info!(file = %name, "removed a file no manifest lists");
                    removed += usize::from(segment_file);
                }
                Err(e) => warn!(file = %name, error = %e, "could not remove an unlisted file"),
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragfleet_proto::ChunkRecord;

    use super::super::test_model as model;

    fn doc(i: usize) -> WriteOp {
        WriteOp::Upsert {
            version: 0,
            doc_id: format!("d{i}"),
            chunks: vec![ChunkRecord {
                doc_id: format!("d{i}"),
                chunk_id: format!("d{i}#0"),
                text: format!("text {i}"),
                vector: vec![1.0, i as f32, 0.5, -(i as f32)],
                sentences: Default::default(),
            }],
        }
    }

    /// Segments of 8 chunks, graphs built inline.
    fn settings() -> IndexSettings {
        IndexSettings {
            segment_size: 8,
            background: false,
            ..IndexSettings::default()
        }
    }

    /// Segments of 64 that merge as soon as the smaller ones hold half the larger's chunks.
    fn tiered() -> IndexSettings {
        IndexSettings {
            segment_size: 64,
            merge_ratio: 2,
            ..settings()
        }
    }

    /// Each sealed chunk's dead mark says what its document's sequence number says, and each
    /// segment's live count (read off its files' dead counts) is what visiting its chunks finds.
    fn assert_live_counts(ix: &ShardIndex) {
        for s in &ix.sealed {
            for e in &s.entries {
                assert_eq!(
                    ix.is_live(e),
                    ix.live_by_seq(e),
                    "{} in segment {}",
                    e.chunk_id(),
                    s.id
                );
            }
            let live = |e: &Entry| ix.live_by_seq(e);
            let visited = s.entries.iter().filter(|e| live(e)).count();
            assert_eq!(s.live_count(&live), visited, "segment {}", s.id);
        }
    }

    #[test]
    fn live_counts_follow_deletes_replacements_seals_merges_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
            ix.write((0..40).map(doc).collect(), &model()).unwrap();
            assert_live_counts(&ix);
            // deleted and replaced while sealed, and while still in the growing segment
            ix.delete(&["d3".into(), "d17".into()], 5).unwrap();
            ix.write((40..44).map(doc).collect(), &model()).unwrap();
            ix.delete(&["d41".into()], 5).unwrap();
            ix.write(vec![doc(5), doc(42)], &model()).unwrap();
            ix.write((44..52).map(doc).collect(), &model()).unwrap();
            assert_live_counts(&ix);
            assert!(ix
                .sealed
                .iter()
                .any(|s| s.live_count(&|e| ix.is_live(e)) < s.entries.len()));
        }
        let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert_live_counts(&ix);
        // enough deleted to compact, then more writes and deletes on the compacted segment
        let gone: Vec<String> = (6..30).map(|i| format!("d{i}")).collect();
        ix.delete(&gone, 9).unwrap();
        ix.seal().unwrap();
        assert_live_counts(&ix);
        ix.delete(&["d31".into()], 10).unwrap();
        ix.write((52..60).map(doc).collect(), &model()).unwrap();
        assert_live_counts(&ix);
        // d3, d41, d31 and the 24 of d6..d29 (d17 among them) gone
        assert_eq!(ix.doc_count(), 60 - 3 - 24);
    }

    /// The deletion records' files in `dir`.
    fn deletion_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|f| f.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("deletions-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn deletion_records_are_written_again_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
        ix.write((0..16).map(doc).collect(), &model()).unwrap();
        ix.delete(&["d2".into(), "d9".into()], 50).unwrap();
        ix.seal().unwrap();
        let first = deletion_files(dir.path());
        assert_eq!(first.len(), 1, "{first:?}");
        // seals of new documents leave the records as they are: the same file
        ix.write((16..32).map(doc).collect(), &model()).unwrap();
        assert_eq!(deletion_files(dir.path()), first);
        // a delete changes them: a delta of the change after the first file
        ix.delete(&["d20".into()], 60).unwrap();
        ix.seal().unwrap();
        let second = deletion_files(dir.path());
        assert_eq!(second.len(), 2, "{second:?}");
        assert!(second.contains(&first[0]));
        drop(ix);
        // reopened, the records hold: deleted documents stay deleted, and an older copy of
        // one is refused
        let (mut ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert_eq!(ix.doc_count(), 32 - 3);
        let mut stale = doc(9);
        if let WriteOp::Upsert { version, .. } = &mut stale {
            *version = 40;
        }
        ix.write(vec![stale], &model()).unwrap();
        assert!(
            ix.fetch(&["d9".to_string()]).is_empty(),
            "a deleted document came back"
        );
        assert_eq!(ix.version_of("d9"), Some(50));
        drop(ix);
        // the file the manifest names missing: reported, the replica catches up
        for f in deletion_files(dir.path()) {
            std::fs::remove_file(dir.path().join(f)).unwrap();
        }
        let (_ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.needs_catch_up);
        assert!(
            rep.problems.iter().any(|p| p.contains("deletion records")),
            "{:?}",
            rep.problems
        );
    }

    /// The index's deletion records, sorted.
    type Records = (Vec<(String, u64)>, Vec<(String, u64)>);

    fn records(ix: &ShardIndex) -> Records {
        let sorted = |m: &mut dyn Iterator<Item = (&str, u64)>| {
            let mut v: Vec<(String, u64)> = m.map(|(d, x)| (d.to_string(), x)).collect();
            v.sort();
            v
        };
        (
            sorted(&mut ix.records.tombstones()),
            sorted(&mut ix.records.deletions()),
        )
    }

    /// The same deletion records (a short message when not).
    fn same(a: &Records, b: &Records) {
        for (x, y, what) in [(&a.0, &b.0, "tombstones"), (&a.1, &b.1, "deletions")] {
            let first = x.iter().zip(y.iter()).find(|(p, q)| p != q);
            assert!(
                x.len() == y.len() && first.is_none(),
                "{what}: {} vs {} records, first difference {first:?}",
                x.len(),
                y.len()
            );
        }
    }

    fn file_size(dir: &Path, name: &str) -> u64 {
        std::fs::metadata(dir.join(name)).unwrap().len()
    }

    #[test]
    fn a_seal_writes_the_deletion_records_that_changed_not_all_of_them() {
        use super::super::deletions::{BASE_AT_LEAST, MAX_DELTAS};
        let dir = tempfile::tempdir().unwrap();
        let settings = IndexSettings {
            segment_size: 100_000,
            ..settings()
        };
        let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        let n = 3 * BASE_AT_LEAST;
        ix.write((0..n).map(doc).collect(), &model()).unwrap();
        ix.seal().unwrap();
        // many deletes at once: too many to list, a base of every record
        let ids: Vec<String> = (0..n / 2).map(|i| format!("d{i}")).collect();
        ix.delete(&ids, 100).unwrap();
        ix.seal().unwrap();
        // (the seal's compaction dropped the deleted copies and pruned their tombstones:
        // too many removals to list, so the next manifest writes a base again)
        ix.seal().unwrap();
        let files = deletion_files(dir.path());
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].ends_with(".bin"), "{files:?}");
        let base = file_size(dir.path(), &files[0]);
        // a few deletes after it: deltas of a few records each, the base unchanged
        let mut next = n / 2;
        for round in 0..MAX_DELTAS {
            ix.delete(&[format!("d{next}")], 200 + round as u64)
                .unwrap();
            next += 1;
            ix.seal().unwrap();
            let now = deletion_files(dir.path());
            assert_eq!(now.len(), round + 2, "{now:?}");
            assert!(now.contains(&files[0]));
            let newest = now
                .iter()
                .filter(|f| f.ends_with(".delta"))
                .max_by_key(|f| {
                    f.trim_start_matches("deletions-")
                        .trim_end_matches(".delta")
                        .parse::<u64>()
                        .unwrap()
                });
            let size = file_size(dir.path(), newest.unwrap());
            assert!(
                size * 100 < base,
                "a delta of {size} bytes beside a base of {base}"
            );
        }
        ix.seal().unwrap();
        let before = records(&ix);
        drop(ix);
        let (mut ix, rep) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        same(&records(&ix), &before);
        assert_eq!(ix.doc_count() as usize, n - next);
        // the chain at its length: the deltas are folded into one
        ix.delete(&[format!("d{next}")], 300).unwrap();
        next += 1;
        ix.seal().unwrap();
        let folded = deletion_files(dir.path());
        assert_eq!(folded.len(), 2, "{folded:?}");
        assert!(folded.contains(&files[0]));
        // an upsert of a deleted document removes its record, in a delta too
        ix.write(vec![doc(0)], &model()).unwrap();
        ix.seal().unwrap();
        assert_eq!(ix.version_of("d0"), Some(0));
        ix.seal().unwrap();
        let before = records(&ix);
        assert!(!before.1.iter().any(|(d, _)| d == "d0"));
        drop(ix);
        let (mut ix, rep) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        same(&records(&ix), &before);
        // a deleted document's older copy is still refused after the reopen
        let mut stale = doc(5);
        if let WriteOp::Upsert { version, .. } = &mut stale {
            *version = 50;
        }
        ix.write(vec![stale], &model()).unwrap();
        assert!(
            ix.fetch(&["d5".to_string()]).is_empty(),
            "a deleted document came back"
        );
        // changes reaching half the base's records: a new base, the chain's files removed
        let ids: Vec<String> = (next..n).map(|i| format!("d{i}")).collect();
        ix.delete(&ids, 400).unwrap();
        ix.seal().unwrap();
        let rebased = deletion_files(dir.path());
        assert_eq!(rebased.len(), 1, "{rebased:?}");
        assert!(rebased[0].ends_with(".bin") && rebased[0] != files[0]);
        ix.seal().unwrap();
        let before = records(&ix);
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        same(&records(&ix), &before);
        assert_eq!(ix.doc_count(), 1);
    }

    #[test]
    fn a_folder_of_the_second_manifest_format_keeps_its_deletions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
            ix.write((0..16).map(doc).collect(), &model()).unwrap();
            ix.delete(&["d4".into()], 70).unwrap();
            ix.seal().unwrap();
        }
        let (m, d, _) = read_manifest(dir.path()).unwrap();
        assert!(d.deleted("d4").is_some());
        let v2 = ManifestV2 {
            last_seq: m.last_seq,
            segments: m.segments.clone(),
            tombstones: d.tombstones().map(|(d, s)| (d.to_string(), s)).collect(),
            deleted: d.deletions().map(|(d, v)| (d.to_string(), v)).collect(),
            model: m.model.clone(),
            next_segment_id: m.next_segment_id,
        };
        write_checked(
            &dir.path().join(MANIFEST_V2),
            &postcard::to_stdvec(&v2).unwrap(),
        )
        .unwrap();
        std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        let (mut ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        // the old records file is no manifest's now: removed
        assert!(deletion_files(dir.path()).is_empty());
        assert_eq!(ix.doc_count(), 15);
        assert_eq!(ix.version_of("d4"), Some(70));
        ix.write((16..24).map(doc).collect(), &model()).unwrap();
        assert!(dir.path().join(MANIFEST).exists());
        assert!(!dir.path().join(MANIFEST_V2).exists());
        assert_eq!(deletion_files(dir.path()).len(), 1);
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert_eq!(ix.version_of("d4"), Some(70));
        assert_eq!(ix.doc_count(), 23);
    }

    #[test]
    fn a_compaction_keeps_the_tombstones_of_dead_copies_in_other_segments() {
        let dir = tempfile::tempdir().unwrap();
        let settings = tiered();
        let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        ix.write((0..64).map(doc).collect(), &model()).unwrap();
        ix.write((100..108).map(doc).collect(), &model()).unwrap();
        ix.seal().unwrap();
        assert_eq!(ix.sealed.len(), 2, "a large segment and a small one");
        // a copy dies in the small segment; then most of the large one, which is compacted
        ix.delete(&["d100".into()], 5).unwrap();
        let gone: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
        ix.delete(&gone, 5).unwrap();
        ix.seal().unwrap();
        assert!(!ix.merging());
        assert!(ix.stored_chunks() < 72, "the large segment was compacted");
        assert!(
            ix.records.tombstone("d100").is_some(),
            "its dead copy is still sealed"
        );
        assert!(
            ix.records.tombstone("d3").is_none(),
            "no copy of it is left"
        );
        assert_live_counts(&ix);
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert!(
            ix.fetch(&["d100".to_string()]).is_empty(),
            "a deleted document came back"
        );
        assert_eq!(ix.doc_count(), 64 + 8 - 41);
    }

    /// A compaction of a small segment beside a large one holding many more dead rows leaves
    /// the tombstones (pruning them would visit every dead row of the large one); the large
    /// one's own compaction prunes them all; no deleted document comes back either way.
    #[test]
    fn a_small_compaction_beside_many_dead_rows_leaves_the_tombstones_to_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let settings = tiered();
        let (mut ix, _) = ShardIndex::open(dir.path(), settings.clone()).unwrap();
        for b in 0..62 {
            ix.write((b * 64..(b + 1) * 64).map(doc).collect(), &model())
                .unwrap();
        }
        ix.seal().unwrap();
        let large = ix.sealed.len();
        // a fifth of every segment dies: not enough to compact any
        let fifth: Vec<String> = (0..3968).step_by(5).map(|i| format!("d{i}")).collect();
        ix.delete(&fifth, 5).unwrap();
        ix.write((10_000..10_064).map(doc).collect(), &model())
            .unwrap();
        ix.seal().unwrap();
        assert_eq!(ix.stored_chunks(), 3968 + 64, "nothing compacted");
        assert_eq!(
            ix.sealed.len(),
            large + 1,
            "the small segment stays on its own"
        );
        // most of the small one dies: it is compacted on its own, the tombstones stay
        let small: Vec<String> = (10_000..10_040).map(|i| format!("d{i}")).collect();
        ix.delete(&small, 5).unwrap();
        ix.seal().unwrap();
        assert_eq!(
            ix.stored_chunks(),
            3968 + 24,
            "the small segment was compacted"
        );
        assert_eq!(
            ix.records.tombstone_count(),
            fifth.len() + 40,
            "the tombstones stay"
        );
        // most of every large one dies: their compactions prune every tombstone
        let more: Vec<String> = (0..3968)
            .filter(|i| matches!(i % 5, 1 | 2))
            .map(|i| format!("d{i}"))
            .collect();
        ix.delete(&more, 5).unwrap();
        ix.seal().unwrap();
        let left = (3968 - fifth.len() - more.len()) as u64;
        assert_eq!(
            ix.stored_chunks(),
            left + 24,
            "the large segments were compacted"
        );
        assert_eq!(ix.records.tombstone_count(), 0, "no copy of any is left");
        assert_live_counts(&ix);
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        let asked: Vec<String> = ["d5", "d1501", "d10007"].map(String::from).to_vec();
        assert!(ix.fetch(&asked).is_empty(), "a deleted document came back");
        assert_eq!(ix.doc_count(), left + 24);
    }

    #[test]
    fn a_folder_of_the_first_manifest_format_opens_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
            ix.write((0..20).map(doc).collect(), &model()).unwrap();
        }
        // rewrite the manifest in the first format: one data file per segment
        let (m, d, _) = read_manifest(dir.path()).unwrap();
        let parts: Vec<u64> = m.segments.iter().flat_map(|s| s.parts.clone()).collect();
        for s in &m.segments {
            let _ = std::fs::remove_file(dir.path().join(format!("seg-{}.hnsw", s.id)));
        }
        let v1 = ManifestV1 {
            last_seq: m.last_seq,
            segments: parts.clone(),
            tombstones: d.tombstones().map(|(d, s)| (d.to_string(), s)).collect(),
            deleted: d.deletions().map(|(d, v)| (d.to_string(), v)).collect(),
            model: m.model.clone(),
            next_segment_id: m.next_segment_id,
        };
        write_checked(
            &dir.path().join(MANIFEST_V1),
            &postcard::to_stdvec(&v1).unwrap(),
        )
        .unwrap();
        std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        let (mut ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert_eq!(ix.doc_count(), 20);
        assert_eq!(ix.fetch(&["d3".to_string()]).len(), 1);
        // the next manifest write is in the current format and retires the first one
        ix.write((20..30).map(doc).collect(), &model()).unwrap();
        assert!(dir.path().join(MANIFEST).exists());
        assert!(!dir.path().join(MANIFEST_V1).exists());
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert_eq!(ix.doc_count(), 30);
    }

    #[test]
    fn format_2_data_files_open_in_memory_and_new_segments_are_mapped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut ix, _) = ShardIndex::open(dir.path(), settings()).unwrap();
            ix.write((0..8).map(doc).collect(), &model()).unwrap();
            ix.write((8..16).map(doc).collect(), &model()).unwrap();
            assert!(ix
                .sealed
                .iter()
                .all(|s| s.entries.iter().all(|e| e.is_mapped())));
            assert!(
                ix.slots.values().all(|e| e.is_mapped()),
                "seals rebind the slots"
            );
        }
        // rewrite every data file in format 2
        let mut rewritten = 0;
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.starts_with("seg-") && name.ends_with(".bin") {
                let entries = crate::datafile::read(&f.path()).unwrap().unwrap();
                let plain: Vec<&Entry> = entries.iter().collect();
                let body = codec::encode_entries(&plain).unwrap();
                write_checked(&f.path(), &body).unwrap();
                rewritten += 1;
            }
        }
        assert_eq!(rewritten, 2);
        let (mut ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert_eq!(ix.doc_count(), 16);
        assert!(ix
            .sealed
            .iter()
            .all(|s| s.entries.iter().all(|e| !e.is_mapped())));
        let got = ix.fetch(&["d3".to_string()]);
        let WriteOp::Upsert { chunks, .. } = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(chunks[0].text, "text 3");
        // new writes seal into a mapped file; a replaced old document's new copy is mapped too
        ix.write((16..24).map(doc).collect(), &model()).unwrap();
        let mapped =
            |ix: &ShardIndex, d: &str| ix.docs[d].slots.iter().all(|s| ix.slots[&s].is_mapped());
        assert!(mapped(&ix, "d20"));
        assert!(!mapped(&ix, "d3"));
        let q = SearchQuery {
            vector: vec![1.0, 20.0, 0.5, -20.0],
            text: "text 20".into(),
            k: 3,
            mode: SearchMode::Dense,
            model: Some(model()),
        };
        assert_eq!(ix.search(&q).unwrap()[0].doc_id, "d20");
        let q = SearchQuery {
            mode: SearchMode::Bm25,
            text: "3".into(),
            ..q
        };
        assert_eq!(ix.search(&q).unwrap()[0].doc_id, "d3");
        // half the chunks deleted: the segment is compacted into a mapped file, and the old
        // files' chunks left now point there
        let gone: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
        ix.delete(&gone, 1).unwrap();
        assert_live_counts(&ix);
        ix.seal().unwrap();
        assert!(!ix.merging());
        assert_live_counts(&ix);
        assert!(mapped(&ix, "d12") && mapped(&ix, "d15") && mapped(&ix, "d20"));
        assert!(ix.slots.values().all(|e| e.is_mapped()));
        drop(ix);
        let (ix, rep) = ShardIndex::open(dir.path(), settings()).unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert_eq!(ix.doc_count(), 12);
        assert!(ix.slots.values().all(|e| e.is_mapped()));
    }
}

//! The merge itself, off the owner's thread (a compaction's data file, the postings, the graph
//! built or extended, each under a temporary name), and the renames of its commit.
use super::*;
use crate::segment::{flat, SegGraph};

/// What a compaction writes: which positions of each source are live (their chunks are
/// copied).
pub(super) struct Compaction {
    pub(super) keep: Vec<Vec<bool>>,
}

/// Renames a merge's files from their temporary names to their final ones; on a failure the
/// ones renamed go back (best effort), so that the commit can try again or drop them all.
pub(super) fn rename_all(files: &[(PathBuf, PathBuf)]) -> Result<(), IndexError> {
    for (done, (tmp, path)) in files.iter().enumerate() {
        if let Err(e) = std::fs::rename(tmp, path) {
            for (tmp, path) in &files[..done] {
                let _ = std::fs::rename(path, tmp);
            }
            return Err(IndexError::io(path, e));
        }
    }
    Ok(())
}

/// The merge itself, off the owner's thread: the new data file (compaction), the graph, each
/// written under a temporary name.
pub(super) fn run_merge(
    dir: &Path,
    id: u64,
    nonce: u64,
    sources: &[Arc<Segment>],
    compacted: Option<Compaction>,
    spec: GraphSpec,
    cancel: &AtomicBool,
) -> Result<Merged, IndexError> {
    let tmp = |name: &str| dir.join(format!("{name}.{nonce:016x}.merging"));
    let cancelled = || IndexError::BadInput("merge cancelled: the index was dropped".into());
    let mut files = Vec::new();
    let mut unforwarded = Vec::new();
    let result = (|| {
        let compact = compacted.is_some();
        let (segment, graph) = match compacted {
            Some(Compaction { keep }) => {
                let entries: Vec<Arc<Entry>> = sources
                    .iter()
                    .zip(&keep)
                    .flat_map(|(s, k)| s.entries.iter().zip(k).filter(|(_, &k)| k))
                    .map(|(e, _)| e.clone())
                    .collect();
                let (bin, post) = (format!("seg-{id}.bin"), format!("seg-{id}.post"));
                files.push((tmp(&bin), dir.join(&bin)));
                files.push((tmp(&post), dir.join(&post)));
                // the postings are the sources' without the dead chunks: streamed from their
                // files, never gathered in memory
                let postings = |path: &Path| {
                    let inputs = source_postings(sources);
                    let keep: Vec<Option<&[bool]>> = keep.iter().map(|k| Some(&k[..])).collect();
                    crate::postings::SegPostings::write_kept(path, &inputs, &keep)
                };
                let seg = super::seal::write_part(&tmp(&bin), &tmp(&post), id, &entries, postings)?;
                // before the graph is built: the chunks that die from here on die in the copy
                // too, those that died since the snapshot are marked in it now
                unforwarded = forward_deaths(&entries, &seg.entries);
                drop(entries);
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                let g = seg.build_graph(spec);
                (seg, g)
            }
            None => {
                // extend the largest source's graph with the others' vectors
                let base = &sources[0];
                let Some(SegGraph::Own(g)) = base.graph.get() else {
                    return Err(IndexError::BadInput(
                        "extending needs an own HNSW graph".into(),
                    ));
                };
                let mut parts = base.parts.clone();
                let mut entries = base.entries.clone();
                for s in &sources[1..] {
                    parts.extend(s.parts.iter().copied());
                    entries.extend(s.entries.iter().cloned());
                }
                let more = flat(&entries[base.entries.len()..]);
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                // grown in a scratch file: the largest graph is not copied into memory
                let grown = g.extend_in(&more, spec.threads, Some(dir));
                // the sources' postings, one after the other (their rows numbered on)
                let inputs = source_postings(sources);
                let post = format!("seg-{id}.post");
                files.push((tmp(&post), dir.join(&post)));
                let postings = crate::postings::SegPostings::write(&tmp(&post), &inputs)?;
                let seg = Segment::with_parts(id, parts, entries, postings);
                (seg, SegGraph::Own(grown))
            }
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        let name = format!("seg-{id}.hnsw");
        let graph = super::seal::persist_graph(&tmp(&name), graph, &segment.entries, &spec)
            .map_err(|(e, _)| e)?;
        files.push((tmp(&name), dir.join(&name)));
        segment.set_graph(graph);
        // the BM25 lists of repeats, made here rather than by the first searches that read
        // them once the segment is switched in
        segment.postings.split_long_lists();
        Ok((Arc::new(segment), compact))
    })();
    match result {
        Ok((segment, compacted)) => Ok(Merged {
            segment,
            files,
            compacted,
            unforwarded,
            in_place: AtomicBool::new(false),
        }),
        Err(e) => {
            for (t, _) in &files {
                let _ = std::fs::remove_file(t);
            }
            Err(e)
        }
    }
}

/// Has the data file of each compacted chunk's older copy forward its deaths to the new copy
/// (`originals[i]` was copied as `copies[i]`; see [`crate::datafile::DataFile::forward_deaths`]);
/// gives the positions whose older copy is not a row of a mapped file (read into memory from
/// an older format), which the commit checks by their slots instead.
fn forward_deaths(originals: &[Arc<Entry>], copies: &[Arc<Entry>]) -> Vec<usize> {
    use crate::datafile::{DataFile, NOT_COPIED};
    let Some((to, _)) = copies.first().and_then(|c| c.mapped_at()) else {
        return (0..copies.len()).collect();
    };
    let mut unforwarded = Vec::new();
    // per older file, its rows' places in the new one; the chunks come file after file, so the
    // search for a chunk's file starts from the last one
    let mut files: Vec<(Arc<DataFile>, Vec<u32>)> = Vec::new();
    for (i, (o, c)) in originals.iter().zip(copies).enumerate() {
        match (o.mapped_at(), c.mapped_at()) {
            (Some((file, row)), Some((copy_file, copy_row))) if Arc::ptr_eq(copy_file, to) => {
                let at = files
                    .iter()
                    .rposition(|(f, _)| Arc::ptr_eq(f, file))
                    .unwrap_or_else(|| {
                        files.push((file.clone(), vec![NOT_COPIED; file.len()]));
                        files.len() - 1
                    });
                files[at].1[row] = copy_row as u32;
            }
            _ => unforwarded.push(i),
        }
    }
    for (file, rows) in files {
        file.forward_deaths(to, rows);
    }
    unforwarded
}

/// The sources' postings, in order.
fn source_postings(sources: &[Arc<Segment>]) -> Vec<&dyn crate::postings::PostingsInput> {
    sources
        .iter()
        .map(|s| s.postings.as_ref() as &dyn crate::postings::PostingsInput)
        .collect()
}

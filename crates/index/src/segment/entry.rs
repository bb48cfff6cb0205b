//! A stored chunk: its ids, sequence number, version and slot in memory, its text, vector and
//! sentence vectors in memory or read in place from a mapped data file.
use super::*;

/// One stored chunk: its ids, sequence number and version in memory, its text, vector and
/// sentence vectors in memory or in a mapped data file.
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) version: u64,
    /// The shard slot it was given while live (`u32::MAX`: none yet), carried to the copy a
    /// seal or compaction reads back from its file so that the slot can point at the copy.
    slot: std::sync::atomic::AtomicU32,
    body: Body,
}

/// [`Entry::slot`]'s mark for none: never given as a slot.
pub(crate) const NO_SLOT: u32 = u32::MAX;

/// Where a chunk's text, vector and sentence vectors are.
#[derive(Clone)]
enum Body {
    /// In memory: the growing segment, and data files of formats 1 and 2 (boxed, so that a
    /// mapped chunk does not pay for the room).
    Owned(Box<Owned>),
    /// Row `row` of a mapped data file (format 3).
    Mapped { file: Arc<DataFile>, row: u32 },
}

#[derive(Clone)]
struct Owned {
    doc_id: String,
    chunk_id: String,
    text: String,
    vector: Vec<f32>,
    /// Its sentences' vectors (empty: none stored).
    sentences: ragfleet_proto::SentenceVectors,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("seq", &self.seq)
            .field("version", &self.version)
            .field("chunk_id", &self.chunk_id())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

impl PartialEq for Entry {
    fn eq(&self, o: &Entry) -> bool {
        (
            self.seq,
            self.version,
            self.doc_id(),
            self.chunk_id(),
            self.text(),
            self.vector(),
        ) == (
            o.seq,
            o.version,
            o.doc_id(),
            o.chunk_id(),
            o.text(),
            o.vector(),
        ) && self.sentences() == o.sentences()
    }
}

impl Entry {
    fn new(seq: u64, version: u64, body: Body) -> Entry {
        Entry {
            seq,
            version,
            slot: NO_SLOT.into(),
            body,
        }
    }

    /// A chunk held in memory, written at `seq` with `version`.
    pub(crate) fn owned(seq: u64, version: u64, c: ChunkRecord) -> Entry {
        let body = Body::Owned(Box::new(Owned {
            doc_id: c.doc_id,
            chunk_id: c.chunk_id,
            text: c.text,
            vector: c.vector,
            sentences: c.sentences,
        }));
        Entry::new(seq, version, body)
    }

    /// Row `row` of a mapped data file (its ids are read from the file when asked for).
    pub(crate) fn mapped(seq: u64, version: u64, file: Arc<DataFile>, row: usize) -> Entry {
        let row = row as u32;
        Entry::new(seq, version, Body::Mapped { file, row })
    }

    /// Its document's id.
    pub(crate) fn doc_id(&self) -> &str {
        match &self.body {
            Body::Owned(o) => &o.doc_id,
            Body::Mapped { file, row } => file.doc_id(*row as usize),
        }
    }

    /// Asks the kernel for its ids and record (and its vector, with `vector`) when they are
    /// in a mapped data file, without waiting: see [`crate::datafile::DataFile::read_ids_ahead`].
    pub(crate) fn read_ids_ahead(&self, vector: bool) {
        if let Body::Mapped { file, row } = &self.body {
            file.read_ids_ahead(*row as usize);
            if vector {
                file.read_vector_ahead(*row as usize);
            }
        }
    }

    /// Asks the kernel for its text when it is in a mapped data file, without waiting.
    pub(crate) fn read_text_ahead(&self) {
        if let Body::Mapped { file, row } = &self.body {
            file.read_text_ahead(*row as usize);
        }
    }

    /// Its own id (`{doc_id}#{n}` as the chunker names it).
    pub(crate) fn chunk_id(&self) -> &str {
        match &self.body {
            Body::Owned(o) => &o.chunk_id,
            Body::Mapped { file, row } => file.chunk_id(*row as usize),
        }
    }

    /// A copy of the chunk as the wire and the log carry it.
    pub(crate) fn record(&self) -> ChunkRecord {
        ChunkRecord {
            doc_id: self.doc_id().to_string(),
            chunk_id: self.chunk_id().to_string(),
            text: self.text().to_string(),
            vector: self.vector().to_vec(),
            sentences: self.sentences(),
        }
    }

    /// Its shard slot, if it was given one.
    pub(crate) fn slot(&self) -> Option<u32> {
        let s = self.slot.load(std::sync::atomic::Ordering::Relaxed);
        (s != NO_SLOT).then_some(s)
    }

    pub(crate) fn set_slot(&self, slot: Option<u32>) {
        self.slot.store(
            slot.unwrap_or(NO_SLOT),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub(crate) fn vector(&self) -> &[f32] {
        match &self.body {
            Body::Owned(o) => &o.vector,
            Body::Mapped { file, row } => file.vector(*row as usize),
        }
    }

    pub(crate) fn text(&self) -> &str {
        match &self.body {
            Body::Owned(o) => &o.text,
            Body::Mapped { file, row } => file.text(*row as usize),
        }
    }

    /// A copy of its sentence vectors.
    pub(crate) fn sentences(&self) -> ragfleet_proto::SentenceVectors {
        match &self.body {
            Body::Owned(o) => o.sentences.clone(),
            Body::Mapped { file, row } => file.sentences(*row as usize),
        }
    }

    /// The best dot product of a unit query with its sentences.
    pub(crate) fn best_sentence_dot(&self, query: &[f32]) -> Option<f32> {
        match &self.body {
            Body::Owned(o) => o.sentences.best_dot(query),
            Body::Mapped { file, row } => file.best_sentence_dot(*row as usize, query),
        }
    }

    /// Marks it dead in its mapped file (a chunk in memory: nothing to mark): when it is
    /// deleted or replaced, or found dead when its segment is written or read.
    pub(crate) fn mark_dead(&self) {
        if let Body::Mapped { file, row } = &self.body {
            file.mark_dead(*row as usize);
        }
    }

    /// Whether it was marked dead in its mapped file (None: it is in memory, not marked).
    pub(crate) fn marked_dead(&self) -> Option<bool> {
        match &self.body {
            Body::Mapped { file, row } => Some(file.is_dead(*row as usize)),
            Body::Owned(_) => None,
        }
    }

    /// Whether its body is in a mapped file.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.body, Body::Mapped { .. })
    }

    /// The mapped file and row it is in.
    pub(crate) fn mapped_at(&self) -> Option<(&Arc<DataFile>, usize)> {
        match &self.body {
            Body::Mapped { file, row } => Some((file, *row as usize)),
            Body::Owned(_) => None,
        }
    }
}

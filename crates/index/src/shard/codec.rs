//! The byte layouts of write-ahead log records and segment data files, and reading the files
//! of earlier versions.
//!
//! Format 2 (chunks carry their sentence vectors) opens both kinds of payload with a marker
//! that format 1 can never begin with: `u64::MAX`, as a record's first sequence number or as a
//! segment's entry count. Format 1 payloads are read as they are and their chunks get no
//! sentence vectors (reranking then embeds their sentences at query time, as before).
use ragfleet_proto::{ChunkRecord, ModelIdentity, SentenceVectors, WriteOp};
use serde::{Deserialize, Serialize};

use super::WalRecord;
use crate::segment::Entry;

/// Opens every format 2 payload.
const FORMAT2: u64 = u64::MAX;

/// How every log record of format 2 begins (`FORMAT2` as postcard writes it): what finds the
/// intact records after damage in the middle of a log ([`crate::Wal::open_marked`]).
pub(super) const WAL_MARKER: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];

pub(super) fn encode_wal(rec: &WalRecord) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(&(FORMAT2, rec))
}

pub(super) fn decode_wal(bytes: &[u8]) -> Result<WalRecord, postcard::Error> {
    if let Ok((FORMAT2, rest)) = postcard::take_from_bytes::<u64>(bytes) {
        return postcard::from_bytes(rest);
    }
    let old: WalRecordV1 = postcard::from_bytes(bytes)?;
    Ok(WalRecord {
        first_seq: old.first_seq,
        model: old.model,
        ops: old.ops.into_iter().map(WriteOpV1::upgrade).collect(),
    })
}

/// A segment body of format 2 (data files are written in format 3 now; tests write this one to
/// check that older folders still open).
#[cfg(test)]
pub(crate) fn encode_entries(entries: &[&Entry]) -> Result<Vec<u8>, postcard::Error> {
    let v2: Vec<EntryV2> = entries
        .iter()
        .map(|e| EntryV2 {
            seq: e.seq,
            version: e.version,
            chunk: e.record(),
        })
        .collect();
    postcard::to_stdvec(&(FORMAT2, v2))
}

/// A segment body of format 1 or 2 (format 3 is read by [`crate::datafile`]).
pub(crate) fn decode_entries(bytes: &[u8]) -> Result<Vec<Entry>, postcard::Error> {
    if let Ok((FORMAT2, rest)) = postcard::take_from_bytes::<u64>(bytes) {
        let v2: Vec<EntryV2> = postcard::from_bytes(rest)?;
        return Ok(v2
            .into_iter()
            .map(|e| Entry::owned(e.seq, e.version, e.chunk))
            .collect());
    }
    let old: Vec<EntryV1> = postcard::from_bytes(bytes)?;
    Ok(old
        .into_iter()
        .map(|e| Entry::owned(e.seq, e.version, e.chunk.upgrade()))
        .collect())
}

/// A chunk in a format 2 data file (postcard writes a struct's fields one after the other, so
/// this is the same bytes as the seven fields it replaced).
#[derive(Serialize, Deserialize)]
struct EntryV2 {
    seq: u64,
    version: u64,
    chunk: ChunkRecord,
}

#[derive(Serialize, Deserialize)]
struct WalRecordV1 {
    first_seq: u64,
    model: ModelIdentity,
    ops: Vec<WriteOpV1>,
}

#[derive(Serialize, Deserialize)]
enum WriteOpV1 {
    Upsert {
        doc_id: String,
        chunks: Vec<ChunkRecordV1>,
        version: u64,
    },
    Delete {
        doc_id: String,
        version: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct ChunkRecordV1 {
    doc_id: String,
    chunk_id: String,
    text: String,
    vector: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct EntryV1 {
    seq: u64,
    version: u64,
    chunk: ChunkRecordV1,
}

impl ChunkRecordV1 {
    fn upgrade(self) -> ChunkRecord {
        ChunkRecord {
            doc_id: self.doc_id,
            chunk_id: self.chunk_id,
            text: self.text,
            vector: self.vector,
            sentences: SentenceVectors::default(),
        }
    }
}

impl WriteOpV1 {
    fn upgrade(self) -> WriteOp {
        match self {
            WriteOpV1::Upsert {
                doc_id,
                chunks,
                version,
            } => WriteOp::Upsert {
                doc_id,
                version,
                chunks: chunks.into_iter().map(ChunkRecordV1::upgrade).collect(),
            },
            WriteOpV1::Delete { doc_id, version } => WriteOp::Delete { doc_id, version },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelIdentity {
        ModelIdentity {
            name: "m".into(),
            weights_sha256: "d".into(),
            dim: 2,
            max_len: 8,
            pooling: "mean".into(),
            normalized: true,
        }
    }

    #[test]
    fn format_1_records_and_segments_read_back_without_sentence_vectors() {
        let v1 = WalRecordV1 {
            first_seq: 7,
            model: model(),
            ops: vec![
                WriteOpV1::Upsert {
                    doc_id: "a".into(),
                    chunks: vec![ChunkRecordV1 {
                        doc_id: "a".into(),
                        chunk_id: "a#0".into(),
                        text: "alpha".into(),
                        vector: vec![1.0, 0.0],
                    }],
                    version: 3,
                },
                WriteOpV1::Delete {
                    doc_id: "b".into(),
                    version: 4,
                },
            ],
        };
        let r = decode_wal(&postcard::to_stdvec(&v1).unwrap()).unwrap();
        assert_eq!(r.first_seq, 7);
        let WriteOp::Upsert {
            chunks, version, ..
        } = &r.ops[0]
        else {
            panic!("{:?}", r.ops[0])
        };
        assert_eq!((chunks[0].text.as_str(), *version), ("alpha", 3));
        assert!(chunks[0].sentences.is_empty());
        assert_eq!(r.ops[1].doc_id(), "b");
        // the first format's fields, flat, as it wrote them
        let seg = vec![(1u64, 2u64, "a", "a#0", "alpha", vec![0.0f32, 1.0])];
        let e = decode_entries(&postcard::to_stdvec(&seg).unwrap()).unwrap();
        assert_eq!((e[0].seq, e[0].text()), (1, "alpha"));
        assert!(e[0].sentences().is_empty());
    }

    #[test]
    fn format_2_keeps_sentence_vectors_and_damage_is_an_error() {
        let s = SentenceVectors::quantize(&[vec![0.6, 0.8], vec![1.0, 0.0]]);
        let rec = WalRecord {
            first_seq: 1,
            model: model(),
            ops: vec![WriteOp::Upsert {
                doc_id: "a".into(),
                version: 1,
                chunks: vec![ChunkRecord {
                    doc_id: "a".into(),
                    chunk_id: "a#0".into(),
                    text: "alpha. beta.".into(),
                    vector: vec![1.0, 0.0],
                    sentences: s.clone(),
                }],
            }],
        };
        let bytes = encode_wal(&rec).unwrap();
        assert!(bytes.starts_with(WAL_MARKER), "{:?}", &bytes[..12]);
        let back = decode_wal(&bytes).unwrap();
        let WriteOp::Upsert { chunks, .. } = &back.ops[0] else {
            panic!()
        };
        assert_eq!(chunks[0].sentences, s);
        assert!(decode_wal(&bytes[..bytes.len() - 3]).is_err());
        let c = ChunkRecord {
            doc_id: "a".into(),
            chunk_id: "a#0".into(),
            text: "t".into(),
            vector: vec![1.0, 0.0],
            sentences: s.clone(),
        };
        let e = Entry::owned(1, 1, c);
        let bytes = encode_entries(&[&e]).unwrap();
        // the same bytes as format 2's flat fields
        let flat = vec![(1u64, 1u64, "a", "a#0", "t", vec![1.0f32, 0.0], s.clone())];
        assert_eq!(bytes, postcard::to_stdvec(&(FORMAT2, flat)).unwrap());
        assert_eq!(decode_entries(&bytes).unwrap(), vec![e]);
        assert!(decode_entries(&bytes[..bytes.len() - 2]).is_err());
    }
}

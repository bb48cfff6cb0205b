//! Replica sync: a replica's versions, digests by bucket, and the buckets' hashing.
use super::*;

/// What a shard replica holds of every document: the version of each live document and of each
/// deletion it remembers, sorted by document id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardVersions {
    /// Model pinned by the replica.
    pub model: Option<ModelIdentity>,
    /// (document id, version) of every live document.
    pub live: Vec<(String, u64)>,
    /// (document id, version) of every remembered deletion.
    pub deleted: Vec<(String, u64)>,
}

impl ShardVersions {
    /// Order-independent digest: the wrapping sum of a 64-bit FNV-1a hash of every entry, so two
    /// replicas holding the same versions agree whatever order they were written in.
    pub fn digest(&self) -> u64 {
        shard_digest(
            self.live.iter().map(|(d, v)| (d.as_str(), *v)),
            self.deleted.iter().map(|(d, v)| (d.as_str(), *v)),
        )
    }
}

/// The digest of live documents and remembered deletions given as (id, version) pairs, in any
/// order (what [`ShardVersions::digest`] computes, for callers that hold them otherwise).
pub fn shard_digest<'a>(
    live: impl Iterator<Item = (&'a str, u64)>,
    deleted: impl Iterator<Item = (&'a str, u64)>,
) -> u64 {
    let live = live.map(|(d, v)| entry_hash(d, v, true));
    let deleted = deleted.map(|(d, v)| entry_hash(d, v, false));
    live.chain(deleted).fold(0u64, u64::wrapping_add)
}

/// The most buckets a `BucketDigests` or `VersionsIn` request may name.
pub const MAX_DIGEST_BUCKETS: u32 = 1 << 16;

/// The most bytes of versions one `VersionsIn` answer carries (a frame holds 16 MiB): a shard of
/// a million documents has ~20-50 MB of (id, version) pairs.
pub const VERSIONS_PAGE_BYTES: u32 = 4 << 20;

/// The longest document id accepted, in bytes (as Elasticsearch's `_id`): ids travel in every
/// write, version list and hit.
pub const MAX_DOC_ID_BYTES: usize = 512;

/// Why `id` cannot name a document (empty or only whitespace, or longer than
/// [`MAX_DOC_ID_BYTES`]): the one check of a document id, wherever a write or a delete names one.
pub fn check_doc_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        Err("empty document id".into())
    } else if id.len() > MAX_DOC_ID_BYTES {
        Err(format!(
            "document id of {} bytes exceeds the limit of {MAX_DOC_ID_BYTES} bytes",
            id.len()
        ))
    } else {
        Ok(())
    }
}

/// Which of `buckets` buckets a document id falls in (its FNV-1a hash, version left out, so a
/// document stays in its bucket across versions, then mixed: FNV's bits alone put ids that
/// differ in their last characters into a few buckets). `buckets` of 0 counts as 1. For a power
/// of two, an id's bucket is its bucket of [`MAX_DIGEST_BUCKETS`] modulo the count (a shard
/// keeps its digests in those and folds them).
pub fn doc_bucket(doc_id: &str, buckets: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in doc_id.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // MurmurHash3's 64-bit finaliser
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % buckets.max(1) as u64) as u32
}

/// How many buckets two replicas of about `docs` documents compare: a power of two giving
/// ~256 documents a bucket (so a repair of a few documents moves a few buckets' versions, not
/// the shard's), at most [`MAX_DIGEST_BUCKETS`].
pub fn bucket_count(docs: u64) -> u32 {
    (docs / 256)
        .max(1)
        .next_power_of_two()
        .min(MAX_DIGEST_BUCKETS as u64) as u32
}

/// The bytes an (id, version) pair takes in a version list, about (postcard: a length, the id,
/// a varint version).
pub fn version_entry_bytes(doc_id: &str) -> usize {
    doc_id.len() + 12
}

/// 64-bit FNV-1a of (document id, version, live or deleted), stable across processes.
pub fn entry_hash(doc_id: &str, version: u64, live: bool) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for &b in doc_id.as_bytes() {
        eat(b);
    }
    eat(0xff); // no id byte is 0xff in UTF-8: separates the id from the version
    for b in version.to_le_bytes() {
        eat(b);
    }
    eat(live as u8);
    h
}

//! Replica sync: what a replica holds (versions, digest), what it lacks of a peer's (a pull
//! plan), and the copies it hands out.
use super::*;

/// A shard's digest, whole and in [`ragfleet_proto::MAX_DIGEST_BUCKETS`] fine buckets, kept up
/// to date by each change (sums of per-entry hashes: an entry's hash leaves and another comes).
#[derive(Debug)]
pub(super) struct Digests {
    total: u64,
    fine: Vec<u64>,
}

impl Default for Digests {
    fn default() -> Self {
        Digests {
            total: 0,
            fine: vec![0; ragfleet_proto::MAX_DIGEST_BUCKETS as usize],
        }
    }
}

/// `doc_id`'s fine digest bucket: its bucket of [`ragfleet_proto::MAX_DIGEST_BUCKETS`] (which
/// is 2^16: it fits a `u16`).
pub(super) fn fine_bucket(doc_id: &str) -> u16 {
    ragfleet_proto::doc_bucket(doc_id, ragfleet_proto::MAX_DIGEST_BUCKETS) as u16
}

impl Digests {
    /// `doc_id`'s entry hashed `out` before and `into` now (0: no entry).
    pub(super) fn change(&mut self, doc_id: &str, out: u64, into: u64) {
        if out == into {
            return;
        }
        self.total = self.total.wrapping_sub(out).wrapping_add(into);
        let f = &mut self.fine[fine_bucket(doc_id) as usize];
        *f = f.wrapping_sub(out).wrapping_add(into);
    }

    /// The digests of `buckets` buckets (a power of two, at most the fine ones).
    fn folded(&self, buckets: u32) -> Vec<u64> {
        let mut out = vec![0u64; buckets as usize];
        for (i, f) in self.fine.iter().enumerate() {
            let b = &mut out[i % buckets as usize];
            *b = b.wrapping_add(*f);
        }
        out
    }
}

impl ShardIndex {
    /// What this replica holds: the version of every live document and remembered deletion,
    /// sorted by document id (what a peer replica compares against its own to pull changes).
    pub fn versions(&self) -> ShardVersions {
        let mut live: Vec<(String, u64)> = self
            .docs
            .iter()
            .map(|(d, s)| (d.to_string(), s.version))
            .collect();
        live.sort();
        let mut deleted: Vec<(String, u64)> = self
            .remembered_deletions()
            .map(|(d, v)| (d.to_string(), v))
            .collect();
        deleted.sort();
        ShardVersions {
            model: self.model.clone(),
            live,
            deleted,
        }
    }

    /// The digest of each of `buckets` buckets of this replica's documents and remembered
    /// deletions ([`ragfleet_proto::doc_bucket`]): their sum is [`ShardIndex::digest`], and two
    /// replicas' buckets differ only where their documents do.
    pub fn bucket_digests(&self, buckets: u32) -> Vec<u64> {
        let buckets = buckets.clamp(1, ragfleet_proto::MAX_DIGEST_BUCKETS);
        if buckets.is_power_of_two() {
            // the kept fine buckets folded (an id's bucket of a power of two is its fine
            // bucket's remainder): no pass over the documents
            return self.digests.folded(buckets);
        }
        self.bucket_digests_scanned(buckets)
    }

    /// [`ShardIndex::bucket_digests`] by a pass over every document and deletion record.
    pub fn bucket_digests_scanned(&self, buckets: u32) -> Vec<u64> {
        let buckets = buckets.clamp(1, ragfleet_proto::MAX_DIGEST_BUCKETS);
        let mut out = vec![0u64; buckets as usize];
        for (d, v, live) in self.entries() {
            let b = &mut out[ragfleet_proto::doc_bucket(d, buckets) as usize];
            *b = b.wrapping_add(ragfleet_proto::entry_hash(d, v, live));
        }
        out
    }

    /// The versions of the documents and remembered deletions in the first buckets of `wanted`
    /// (of `buckets`), whole buckets in that order until about `max_bytes` of (id, version)
    /// pairs (always at least one bucket); with how many of `wanted` they cover. Each list is
    /// sorted by document id.
    pub fn versions_in(
        &self,
        buckets: u32,
        wanted: &[u32],
        max_bytes: usize,
    ) -> (ShardVersions, usize) {
        let buckets = buckets.clamp(1, ragfleet_proto::MAX_DIGEST_BUCKETS);
        // where each bucket stands in `wanted` (the first time it is named; MAX: not wanted)
        let mut place = vec![u32::MAX; buckets as usize];
        for (i, &b) in wanted.iter().enumerate().rev() {
            if let Some(p) = place.get_mut(b as usize) {
                *p = i as u32;
            }
        }
        // an entry's bucket: of a power of two, its fine bucket's remainder, which a live
        // document keeps (no id is read to place it, and only the wanted ones' are sized)
        let fold = buckets.is_power_of_two();
        let bucket_of = |d: &str, fine: Option<u16>| match fine {
            Some(f) if fold => f as u32 % buckets,
            _ => ragfleet_proto::doc_bucket(d, buckets),
        };
        // a first pass sizes the wanted buckets and notes each entry's place (the maps do not
        // change under the read lock, so a second pass visits them in the same order): only
        // the buckets of this page are then copied, not every wanted one
        let mut at: Vec<u32> = Vec::with_capacity(self.docs.len());
        let mut bytes_of = vec![0usize; wanted.len()];
        for (d, fine) in self.entry_ids() {
            let i = place[bucket_of(d, fine) as usize];
            if let Some(b) = bytes_of.get_mut(i as usize) {
                *b += ragfleet_proto::version_entry_bytes(d);
            }
            at.push(i);
        }
        let (mut bytes, mut covered) = (0usize, 0usize);
        for b in bytes_of {
            if covered > 0 && bytes + b > max_bytes {
                break;
            }
            bytes += b;
            covered += 1;
        }
        let mut out = ShardVersions {
            model: self.model.clone(),
            live: Vec::new(),
            deleted: Vec::new(),
        };
        for ((d, v, live), &i) in self.entries().zip(&at) {
            if (i as usize) < covered {
                let to = if live {
                    &mut out.live
                } else {
                    &mut out.deleted
                };
                to.push((d.to_string(), v));
            }
        }
        out.live.sort();
        out.deleted.sort();
        (out, covered)
    }

    /// The live copies of the first of `doc_ids`, as upserts (absent documents left out), as
    /// many ids as fit in about `max_bytes` (always at least one); with how many ids it covered.
    pub fn fetch_bounded(&self, doc_ids: &[String], max_bytes: usize) -> (Vec<WriteOp>, usize) {
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for (i, d) in doc_ids.iter().enumerate() {
            let mut op = self.fetch(std::slice::from_ref(d));
            let size: usize = op.iter().map(WriteOp::approx_bytes).sum();
            if i > 0 && bytes + size > max_bytes {
                return (out, i);
            }
            bytes += size;
            out.append(&mut op);
        }
        (out, doc_ids.len())
    }

    /// The live copies of `doc_ids` as upserts, chunks in order; absent documents are left out.
    pub fn fetch(&self, doc_ids: &[String]) -> Vec<WriteOp> {
        doc_ids
            .iter()
            .filter_map(|d| {
                let state = self.docs.get(d.as_str())?;
                let chunks = state
                    .slots
                    .iter()
                    .filter_map(|s| self.slots.get(&s))
                    .map(|e| e.record())
                    .collect();
                Some(WriteOp::Upsert {
                    doc_id: d.clone(),
                    version: state.version,
                    chunks,
                })
            })
            .collect()
    }

    /// Every live document as an upsert, then every remembered deletion as a delete.
    pub fn dump(&self) -> Vec<WriteOp> {
        let v = self.versions();
        let ids: Vec<String> = v.live.into_iter().map(|(d, _)| d).collect();
        let mut ops = self.fetch(&ids);
        ops.extend(
            v.deleted
                .into_iter()
                .map(|(doc_id, version)| WriteOp::Delete { doc_id, version }),
        );
        ops
    }

    /// What this replica lacks of a peer's state: the documents the peer holds at a newer
    /// version (to fetch), and the peer's deletions newer than what is held here (applied as
    /// deletes, no data needed). Documents held here at a newer version, or that the peer
    /// lacks, are left alone: the peer pulls them from here in its own turn.
    pub fn plan_pull(&self, peer: &ShardVersions) -> PullPlan {
        let newer = |d: &str, v: u64| match self.version_of(d) {
            Some(held) => held < v,
            None => v == 0 || v > self.purged_below,
        };
        PullPlan {
            fetch: peer
                .live
                .iter()
                .filter(|(d, v)| newer(d, *v))
                .map(|(d, _)| d.clone())
                .collect(),
            deletes: peer
                .deleted
                .iter()
                .filter(|(d, v)| newer(d, *v))
                .map(|(d, v)| WriteOp::Delete {
                    doc_id: d.clone(),
                    version: *v,
                })
                .collect(),
        }
    }

    /// The digest of [`ShardIndex::versions`] (the wrapping sum of a hash of each entry),
    /// kept up to date as documents and deletion records change, so asking costs nothing:
    /// replicas that hold the same versions have the same digest, and any write or deletion
    /// changes it.
    pub fn digest(&self) -> u64 {
        self.digests.total
    }

    /// What `doc_id` adds to the digest: its live version's hash, else its deletion record's,
    /// else nothing (a record counts only while its document is not live).
    pub(super) fn digest_entry(&self, doc_id: &str) -> u64 {
        match (self.docs.get(doc_id), self.records.deleted(doc_id)) {
            (Some(d), _) => ragfleet_proto::entry_hash(doc_id, d.version, true),
            (None, Some(v)) => ragfleet_proto::entry_hash(doc_id, v, false),
            (None, None) => 0,
        }
    }

    /// The digests computed from every entry (at open).
    pub(super) fn compute_digests(&self) -> Digests {
        let mut out = Digests::default();
        for (d, v, live) in self.entries() {
            out.change(d, 0, ragfleet_proto::entry_hash(d, v, live));
        }
        out
    }

    /// The digest computed from every entry (tests hold [`ShardIndex::digest`] to it).
    pub fn compute_digest(&self) -> u64 {
        ragfleet_proto::shard_digest(
            self.docs.iter().map(|(d, s)| (d, s.version)),
            self.remembered_deletions(),
        )
    }

    /// What the digests count: (id, version, live) of every live document, then of every
    /// remembered deletion (always in the same order while the maps do not change).
    fn entries(&self) -> impl Iterator<Item = (&str, u64, bool)> {
        let live = self.docs.iter().map(|(d, s)| (d, s.version, true));
        live.chain(self.remembered_deletions().map(|(d, v)| (d, v, false)))
    }

    /// The ids [`ShardIndex::entries`] yields, in its order, each live document's with the fine
    /// bucket it keeps.
    fn entry_ids(&self) -> impl Iterator<Item = (&str, Option<u16>)> {
        let live = self.docs.iter().map(|(d, s)| (d, Some(s.fine)));
        live.chain(self.remembered_deletions().map(|(d, _)| (d, None)))
    }

    /// (id, version) of every deletion record of a document not live now.
    pub(super) fn remembered_deletions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.records
            .deletions()
            .filter(|(d, _)| !self.docs.contains_key(d))
    }
}

//! A shard's deletion records, one entry a document: its tombstone (the sequence number of the
//! op that deleted or replaced it, below which a sealed copy is dead) and its deletion version
//! (the version of its latest delete, kept so that an older copy, from a retry or a lagging
//! peer, cannot bring it back). A deleted document has both, a replaced one a tombstone only,
//! and a document whose dead copies compactions dropped its deletion version only.
//!
//! They were two maps of `String` to `u64`, a deleted document's id stored in both: one map of
//! ids to a 16-byte record holds it once (`chunk_memory`: 500,000 deleted documents before
//! their compaction took 247 MB of heap against 290, ~86 bytes a deleted document less; once
//! compactions dropped their tombstones the same as before). The files keep their format: the
//! two maps, written from this one and read into it entry by entry.
use std::collections::HashMap;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A [`Record`]'s word holds a tombstone...
const TOMBSTONE: u64 = 1 << 63;
/// ...a deletion version...
const DELETED: u64 = 1 << 62;
/// ...and below these flags the tombstone's sequence number (sequence numbers count a
/// replica's writes: far below 2^62).
const SEQ: u64 = DELETED - 1;

/// One document's records in 16 bytes: its flags and tombstone in `word`, its deletion version
/// in `deleted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    word: u64,
    deleted: u64,
}

impl Record {
    const NONE: Record = Record {
        word: 0,
        deleted: 0,
    };

    fn tombstone(&self) -> Option<u64> {
        (self.word & TOMBSTONE != 0).then_some(self.word & SEQ)
    }

    fn deleted(&self) -> Option<u64> {
        (self.word & DELETED != 0).then_some(self.deleted)
    }

    fn set_tombstone(&mut self, seq: Option<u64>) {
        let kept = self.word & DELETED;
        self.word = match seq {
            Some(s) => {
                debug_assert!(s <= SEQ, "a sequence number past 2^62");
                kept | TOMBSTONE | (s & SEQ)
            }
            None => kept,
        };
    }

    fn set_deleted(&mut self, version: Option<u64>) {
        match version {
            Some(v) => {
                self.word |= DELETED;
                self.deleted = v;
            }
            None => {
                self.word &= !DELETED;
                self.deleted = 0;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.word & (TOMBSTONE | DELETED) == 0
    }
}

/// The map of a shard's deletion records.
type RecordMap = HashMap<Box<str>, Record>;

/// A shard's deletion records (see the module's text).
#[derive(Debug, Default, Clone)]
pub(super) struct Records {
    map: RecordMap,
    tombstones: usize,
    deleted: usize,
    /// Bumped by every change: a copy made at another size ([`Records::copy_with`]) is swapped
    /// in only while it still holds what these do.
    changes: u64,
    /// For a copy made by [`Records::with_tombstones_of`]: the `changes` of the records it was
    /// made from (see [`Records::pruned_from`]).
    pruned_at: Option<u64>,
}

impl PartialEq for Records {
    fn eq(&self, other: &Records) -> bool {
        self.map == other.map
    }
}

impl Records {
    /// The records of two maps (a manifest of an earlier format).
    pub(super) fn from_maps(
        tombstones: HashMap<String, u64>,
        deleted: HashMap<String, u64>,
    ) -> Self {
        let mut r = Records::default();
        r.map.reserve(tombstones.len().max(deleted.len()));
        for (d, s) in tombstones {
            r.set_tombstone(&d, Some(s));
        }
        for (d, v) in deleted {
            r.set_deleted(&d, Some(v));
        }
        r
    }

    /// `doc`'s tombstone.
    pub(super) fn tombstone(&self, doc: &str) -> Option<u64> {
        self.map.get(doc).and_then(Record::tombstone)
    }

    /// `doc`'s deletion version.
    pub(super) fn deleted(&self, doc: &str) -> Option<u64> {
        self.map.get(doc).and_then(Record::deleted)
    }

    /// Documents with a tombstone.
    pub(super) fn tombstone_count(&self) -> usize {
        self.tombstones
    }

    /// Documents with a deletion version.
    pub(super) fn deleted_count(&self) -> usize {
        self.deleted
    }

    /// Whether no document has a record.
    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sets (or with None, removes) `doc`'s tombstone.
    pub(super) fn set_tombstone(&mut self, doc: &str, seq: Option<u64>) {
        self.change(doc, |r| r.set_tombstone(seq));
    }

    /// Sets (or with None, removes) `doc`'s deletion version; returns whether it had one.
    pub(super) fn set_deleted(&mut self, doc: &str, version: Option<u64>) -> bool {
        let mut had = false;
        self.change(doc, |r| {
            had = r.deleted().is_some();
            r.set_deleted(version)
        });
        had
    }

    /// Changes `doc`'s record by `f`, keeping the counts, and drops a record left empty.
    fn change(&mut self, doc: &str, f: impl FnOnce(&mut Record)) {
        let before = self.map.get(doc).copied().unwrap_or(Record::NONE);
        let mut after = before;
        f(&mut after);
        if after == before {
            return;
        }
        self.changes += 1;
        self.count(&before, false);
        self.count(&after, true);
        if after.is_empty() {
            self.map.remove(doc);
        } else if let Some(r) = self.map.get_mut(doc) {
            *r = after;
        } else {
            self.map.insert(Box::from(doc), after);
        }
    }

    fn count(&mut self, r: &Record, add: bool) {
        let step = |n: &mut usize, has: bool| {
            if has {
                if add {
                    *n += 1
                } else {
                    *n -= 1
                }
            }
        };
        step(&mut self.tombstones, r.tombstone().is_some());
        step(&mut self.deleted, r.deleted().is_some());
    }

    /// (document, deletion version) of every deletion record.
    pub(super) fn deletions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.map
            .iter()
            .filter_map(|(d, r)| r.deleted().map(|v| (&**d, v)))
    }

    /// (document, tombstone) of every tombstone.
    pub(super) fn tombstones(&self) -> impl Iterator<Item = (&str, u64)> {
        self.map
            .iter()
            .filter_map(|(d, r)| r.tombstone().map(|s| (&**d, s)))
    }

    /// Drops the deletion versions `keep` refuses (the records left empty with them).
    pub(super) fn retain_deleted(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let mut dropped = 0;
        self.changes += 1;
        self.map.retain(|_, r| match r.deleted() {
            Some(v) if !keep(v) => {
                r.set_deleted(None);
                dropped += 1;
                !r.is_empty()
            }
            _ => true,
        });
        self.deleted -= dropped;
    }

    /// A copy with only the tombstones of documents `keep` says yes to (every deletion version
    /// kept); made beside the searches, swapped in whole.
    pub(super) fn with_tombstones_of(&self, mut keep: impl FnMut(&str) -> bool) -> Records {
        let mut out = Records {
            map: HashMap::with_capacity(self.deleted),
            tombstones: 0,
            deleted: 0,
            // past the source's, so that a copy of the source made meanwhile at another size
            // is never swapped in over this one
            changes: self.changes + 1,
            pruned_at: Some(self.changes),
        };
        for (d, r) in &self.map {
            let mut r = *r;
            if r.tombstone().is_some() && !keep(d) {
                r.set_tombstone(None);
            }
            if !r.is_empty() {
                out.count(&r, true);
                out.map.insert(d.clone(), r);
            }
        }
        out
    }

    /// Whether these are [`Records::with_tombstones_of`] `older`, unchanged since.
    pub(super) fn pruned_from(&self, older: &Records) -> bool {
        self.pruned_at == Some(older.changes)
    }

    /// Entries held.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Entries held without growing.
    pub(super) fn capacity(&self) -> usize {
        self.map.capacity()
    }

    /// Shrinks the map to room for `capacity` entries (at least those it holds).
    pub(super) fn shrink_to(&mut self, capacity: usize) {
        self.map.shrink_to(capacity)
    }

    /// A copy with room for `room` entries (made beside the searches, swapped
    /// in by [`Records::install`]).
    pub(super) fn copy_with(&self, room: usize) -> Records {
        let mut map = HashMap::with_capacity(room.max(self.map.len()));
        map.extend(self.map.iter().map(|(d, r)| (d.clone(), *r)));
        Records {
            map,
            pruned_at: None,
            ..*self
        }
    }

    /// Swaps `copy` in if nothing changed since it was made, leaving what it replaced there.
    pub(super) fn install(&mut self, copy: &mut Option<Records>) {
        if let Some(c) = copy {
            if c.changes == self.changes {
                std::mem::swap(self, c);
            }
        }
    }
}

/// Written as the two maps of the files' format (`tombstones`, then `deleted`).
impl Serialize for Records {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Side<'a>(&'a Records, bool);
        impl Serialize for Side<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let Side(records, tombstones) = *self;
                let len = if tombstones {
                    records.tombstones
                } else {
                    records.deleted
                };
                let mut m = s.serialize_map(Some(len))?;
                for (d, r) in &records.map {
                    let v = if tombstones {
                        r.tombstone()
                    } else {
                        r.deleted()
                    };
                    if let Some(v) = v {
                        m.serialize_entry(&**d, &v)?;
                    }
                }
                m.end()
            }
        }
        let mut st = s.serialize_struct("Deletions", 2)?;
        st.serialize_field("tombstones", &Side(self, true))?;
        st.serialize_field("deleted", &Side(self, false))?;
        st.end()
    }
}

/// Read from the two maps of the files' format, entry by entry into the one map.
impl<'de> Deserialize<'de> for Records {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Side<'a>(&'a mut Records, bool);
        impl<'de> DeserializeSeed<'de> for Side<'_> {
            type Value = ();
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_map(self)
            }
        }
        impl<'de> Visitor<'de> for Side<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of document ids to numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
                let Side(records, tombstones) = self;
                if let Some(n) = a.size_hint() {
                    records
                        .map
                        .reserve(n.saturating_sub(records.map.len()).min(1 << 24));
                }
                while let Some((doc, v)) = a.next_entry::<std::borrow::Cow<'de, str>, u64>()? {
                    if tombstones {
                        records.set_tombstone(&doc, Some(v));
                    } else {
                        records.set_deleted(&doc, Some(v));
                    }
                }
                Ok(())
            }
        }
        struct Both;
        impl<'de> Visitor<'de> for Both {
            type Value = Records;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the deletion records' two maps")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Records, A::Error> {
                let mut records = Records::default();
                for (i, tombstones) in [true, false].into_iter().enumerate() {
                    if a.next_element_seed(Side(&mut records, tombstones))?
                        .is_none()
                    {
                        return Err(serde::de::Error::invalid_length(i, &self));
                    }
                }
                Ok(records)
            }
        }
        d.deserialize_struct("Deletions", &["tombstones", "deleted"], Both)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files' format before the one map: two maps.
    #[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
    struct TwoMaps {
        tombstones: HashMap<String, u64>,
        deleted: HashMap<String, u64>,
    }

    fn two_maps(r: &Records) -> TwoMaps {
        TwoMaps {
            tombstones: r.tombstones().map(|(d, s)| (d.to_string(), s)).collect(),
            deleted: r.deletions().map(|(d, v)| (d.to_string(), v)).collect(),
        }
    }

    #[test]
    fn records_keep_each_side_apart_and_count_them() {
        let mut r = Records::default();
        r.set_tombstone("a", Some(5));
        assert!(!r.set_deleted("a", Some(0)), "none before");
        r.set_tombstone("b", Some(7));
        assert!(!r.set_deleted("c", Some(u64::MAX)));
        assert_eq!((r.tombstone("a"), r.deleted("a")), (Some(5), Some(0)));
        assert_eq!((r.tombstone("b"), r.deleted("b")), (Some(7), None));
        assert_eq!((r.tombstone("c"), r.deleted("c")), (None, Some(u64::MAX)));
        assert_eq!((r.tombstone_count(), r.deleted_count()), (2, 2));
        // a replace of a deleted document: its deletion version goes, its tombstone stays
        assert!(r.set_deleted("a", None));
        assert_eq!((r.tombstone("a"), r.deleted("a")), (Some(5), None));
        r.set_tombstone("a", Some(9));
        assert_eq!(r.tombstone("a"), Some(9));
        assert_eq!((r.tombstone_count(), r.deleted_count()), (2, 1));
        // a record with neither is gone
        r.set_tombstone("b", None);
        assert_eq!(r.tombstone("b"), None);
        assert_eq!(r.len(), 2);
        r.retain_deleted(|v| v < 10);
        assert_eq!(r.deleted("c"), None);
        assert_eq!(r.len(), 1);
        assert_eq!((r.tombstone_count(), r.deleted_count()), (1, 0));
        // the highest sequence numbers the flags leave
        r.set_tombstone("big", Some((1 << 62) - 1));
        assert_eq!(r.tombstone("big"), Some((1 << 62) - 1));
        assert_eq!(r.deleted("big"), None);
    }

    #[test]
    fn records_are_written_and_read_as_the_two_maps_they_were() {
        let mut old = TwoMaps::default();
        for i in 0..1000u64 {
            if i % 3 != 0 {
                old.tombstones.insert(format!("d{i}"), i + 1);
            }
            if i % 2 == 0 {
                old.deleted.insert(format!("d{i}"), i * 1_000_003);
            }
        }
        let bytes = postcard::to_stdvec(&old).unwrap();
        let r: Records = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(two_maps(&r), old, "read from the old format");
        assert_eq!(
            r,
            Records::from_maps(old.tombstones.clone(), old.deleted.clone())
        );
        assert_eq!(r.tombstone_count(), old.tombstones.len());
        assert_eq!(r.deleted_count(), old.deleted.len());
        let back: TwoMaps = postcard::from_bytes(&postcard::to_stdvec(&r).unwrap()).unwrap();
        assert_eq!(back, old, "written in it");
        // the same bytes, up to the maps' order: written again from what was read back
        let again: Records = postcard::from_bytes(&postcard::to_stdvec(&r).unwrap()).unwrap();
        assert_eq!(again, r);
        // a cut file is refused, not read in part
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                postcard::from_bytes::<Records>(&bytes[..cut]).is_err(),
                "{cut}"
            );
        }
    }

    #[test]
    fn a_copy_with_fewer_tombstones_keeps_every_deletion_version() {
        let mut r = Records::default();
        for i in 0..100u64 {
            let d = format!("d{i}");
            r.set_tombstone(&d, Some(i + 1));
            if i % 2 == 0 {
                r.set_deleted(&d, Some(i));
            }
        }
        let kept = r.with_tombstones_of(|d| d.ends_with('7'));
        assert_eq!(kept.tombstone_count(), 10);
        assert_eq!(kept.deleted_count(), 50);
        assert_eq!(kept.tombstone("d17"), Some(18));
        assert_eq!(kept.tombstone("d18"), None);
        assert_eq!(kept.deleted("d18"), Some(18));
        assert_eq!(kept.len(), 60, "the odd ones without a 7 are gone");
        assert!(
            kept.pruned_from(&r),
            "made from these records, unchanged since"
        );
        assert!(
            !r.copy_with(1000).pruned_from(&r),
            "a copy at another size is not pruned"
        );
        assert!(!kept.pruned_from(&kept), "nor pruned from itself");
        let mut copy = Some(r.copy_with(1000));
        let mut installed = kept.clone();
        installed.install(&mut copy);
        assert_eq!(
            installed, kept,
            "a copy of the source is not swapped in over the pruned"
        );
        r.set_deleted("d1", Some(1));
        assert!(!kept.pruned_from(&r), "the records changed since");
    }
}

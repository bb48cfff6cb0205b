//! The live chunks by slot, compact: a table of the chunks' pointers alone, each found by the
//! slot its chunk keeps ([`Entry::slot`]).
//!
//! A `HashMap<u32, Arc<Entry>>` bucket holds the slot beside the pointer (16 bytes and a
//! control byte: 36 MB at a million chunks, whose table has 2^21 buckets); the chunk already
//! knows its slot, so a bucket here is the pointer alone (9 bytes: 19 MB). A chunk's slot does
//! not change while it is in the table: a slot is given before its chunk goes in, and a copy
//! put in a chunk's place (a seal's or a compaction's) carries the same slot.
use std::sync::Arc;

use super::room::spread;
use crate::segment::Entry;

fn slot_of(e: &Entry) -> u32 {
    e.slot().expect("a chunk in the slot map has a slot")
}

fn hash_of(e: &Arc<Entry>) -> u64 {
    spread(slot_of(e))
}

/// The live chunks by slot (see the module's comment).
#[derive(Default)]
pub(super) struct SlotMap {
    table: hashbrown::HashTable<Arc<Entry>>,
}

impl std::fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotMap({} chunks)", self.table.len())
    }
}

impl SlotMap {
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Chunks the table holds without growing.
    pub(super) fn capacity(&self) -> usize {
        self.table.capacity()
    }

    pub(super) fn clear(&mut self) {
        self.table.clear();
    }

    pub(super) fn get(&self, slot: &u32) -> Option<&Arc<Entry>> {
        self.table.find(spread(*slot), |e| slot_of(e) == *slot)
    }

    /// The chunk in `slot`, to be replaced only by a copy that carries the same slot.
    pub(super) fn get_mut(&mut self, slot: &u32) -> Option<&mut Arc<Entry>> {
        self.table.find_mut(spread(*slot), |e| slot_of(e) == *slot)
    }

    /// Puts `e` in its slot (given with [`Entry::set_slot`]), replacing what was there.
    pub(super) fn insert(&mut self, e: Arc<Entry>) -> Option<Arc<Entry>> {
        let slot = slot_of(&e);
        match self
            .table
            .entry(spread(slot), |o| slot_of(o) == slot, hash_of)
        {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                Some(std::mem::replace(o.get_mut(), e))
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(e);
                None
            }
        }
    }

    pub(super) fn remove(&mut self, slot: &u32) -> Option<Arc<Entry>> {
        self.table
            .find_entry(spread(*slot), |e| slot_of(e) == *slot)
            .ok()
            .map(|o| o.remove().0)
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.table.iter()
    }

    /// A copy with room for `capacity` chunks (at least those it holds).
    pub(super) fn copy_with(&self, capacity: usize) -> SlotMap {
        let mut table = hashbrown::HashTable::with_capacity(capacity.max(self.len()));
        for e in &self.table {
            table.insert_unique(hash_of(e), e.clone(), hash_of);
        }
        SlotMap { table }
    }

    /// Shrinks the table to room for `capacity` chunks (at least those it holds).
    pub(super) fn shrink_to(&mut self, capacity: usize) {
        self.table.shrink_to(capacity.max(self.len()), hash_of);
    }
}

impl std::ops::Index<&u32> for SlotMap {
    type Output = Arc<Entry>;

    fn index(&self, slot: &u32) -> &Arc<Entry> {
        self.get(slot).expect("a live slot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragfleet_proto::ChunkRecord;

    fn chunk(slot: u32) -> Arc<Entry> {
        let e = Entry::owned(
            slot as u64,
            1,
            ChunkRecord {
                doc_id: format!("d{slot}"),
                chunk_id: format!("d{slot}#0"),
                text: String::new(),
                vector: vec![1.0],
                sentences: Default::default(),
            },
        );
        e.set_slot(Some(slot));
        Arc::new(e)
    }

    #[test]
    fn finds_chunks_by_the_slot_they_keep_through_growth_replacement_and_removal() {
        let mut m = SlotMap::default();
        for s in 0..20_000u32 {
            assert!(m.insert(chunk(s * 3)).is_none());
        }
        // a copy in a chunk's place, with the same slot
        let copy = chunk(300);
        let old = m.insert(copy.clone()).expect("replaced");
        assert!(!Arc::ptr_eq(&old, &copy) && Arc::ptr_eq(&m[&300], &copy));
        let other = chunk(600);
        *m.get_mut(&600).expect("there") = other.clone();
        assert!(Arc::ptr_eq(&m[&600], &other));
        for s in (0..20_000u32).filter(|s| s % 2 == 0) {
            assert_eq!(m.remove(&(s * 3)).map(|e| e.seq), Some(s as u64 * 3));
        }
        assert!(m.remove(&0).is_none() && m.get(&1).is_none());
        assert_eq!(m.len(), 10_000);
        let room = m.capacity();
        m.shrink_to(m.len() + m.len() / 4);
        assert!(m.capacity() < room);
        let copy = m.copy_with(m.capacity() * 2);
        assert!(copy.capacity() > m.capacity());
        for map in [&m, &copy] {
            for s in 0..20_000u32 {
                let got = map.get(&(s * 3)).map(|e| e.seq);
                assert_eq!(got, (s % 2 == 1).then_some(s as u64 * 3), "slot {}", s * 3);
            }
            assert_eq!(map.values().count(), 10_000);
        }
    }
}

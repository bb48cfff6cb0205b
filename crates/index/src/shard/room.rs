//! The index's maps resized beside the searches: a map that a write would fill past its room
//! (or that a mass delete left mostly empty) is copied at its new size under a shared borrow,
//! and the copy swapped in under the exclusive one, instead of the map rehashing every entry
//! while the searches wait (~19 ms for the documents' map at 100,000 documents).
use super::*;

/// Copies of the maps at their new sizes, made by [`ShardIndex::prepare_room`]; also what
/// [`ShardIndex::install_room`] hands back (the maps it replaced, to free after the lock).
#[derive(Default)]
pub struct Room {
    docs: Option<super::docmap::DocTable>,
    slots: Option<super::slotmap::SlotMap>,
    records: Option<super::records::Records>,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = |m: Option<usize>| m.map_or("-".to_string(), |l| l.to_string());
        write!(
            f,
            "Room(docs {}, slots {}, deletion records {})",
            len(self.docs.as_ref().map(super::docmap::DocTable::len)),
            len(self.slots.as_ref().map(super::slotmap::SlotMap::len)),
            len(self.records.as_ref().map(super::records::Records::len)),
        )
    }
}

impl Room {
    /// Whether no map is to be replaced.
    pub fn is_empty(&self) -> bool {
        self.docs.is_none() && self.slots.is_none() && self.records.is_none()
    }
}

/// The hash the compact maps' tables ([`super::docmap`], [`super::slotmap`]) give 32 bits (an
/// id's kept hash, a slot): the multiply by an odd constant spreads them to the top bits
/// (hashbrown's control byte) and keeps the low ones (its position) a permutation of theirs.
pub(super) fn spread(h: u32) -> u64 {
    (h as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A map the index keeps room in: copied at a new size beside the searches, shrunk after a
/// mass delete.
pub(super) trait Roomy {
    fn len(&self) -> usize;
    /// Entries it holds without growing.
    fn capacity(&self) -> usize;
    /// Shrinks it to room for `capacity` entries (at least those it holds).
    fn shrink_to(&mut self, capacity: usize);
}

impl<K: Eq + std::hash::Hash, V> Roomy for HashMap<K, V> {
    fn len(&self) -> usize {
        HashMap::len(self)
    }
    fn capacity(&self) -> usize {
        HashMap::capacity(self)
    }
    fn shrink_to(&mut self, capacity: usize) {
        HashMap::shrink_to(self, capacity)
    }
}

/// The compact maps keep their room as a `HashMap` does, by methods of their own.
macro_rules! roomy_by_own_methods {
    ($($map:ty),*) => {$(
        impl Roomy for $map {
            fn len(&self) -> usize {
                <$map>::len(self)
            }
            fn capacity(&self) -> usize {
                <$map>::capacity(self)
            }
            fn shrink_to(&mut self, capacity: usize) {
                <$map>::shrink_to(self, capacity)
            }
        }
    )*};
}
roomy_by_own_methods!(
    super::docmap::DocMap,
    super::slotmap::SlotMap,
    super::records::Records
);

/// Below this many entries of room a map is left to grow and shrink in place.
const SMALL: usize = 4096;

/// The room to shrink a map of `capacity` holding `len` to, when it holds under half of it
/// (a quarter more than it holds); `None` when it does not, or is small.
pub(super) fn shrunk_room(len: usize, capacity: usize) -> Option<usize> {
    (capacity > SMALL && len * 2 < capacity).then_some(len + len / 4)
}

/// The room `map` is to be copied at before `incoming` more entries: when it has not that room,
/// the size it would grow to itself (or what it will hold if more); when it holds under half of
/// its room, a quarter more than it will hold; `None` when neither (it is left as it is).
fn new_room(map: &impl Roomy, incoming: usize) -> Option<usize> {
    let (will_hold, capacity) = (map.len() + incoming, map.capacity());
    if will_hold > capacity {
        if will_hold < SMALL {
            // a small map grows in place: cheap
            return None;
        }
        // one more than its room: the next size up, as it would grow in place
        Some(will_hold.max(capacity + 1))
    } else {
        shrunk_room(will_hold, capacity)
    }
}

/// Swaps `copy` in for `map` if it holds what the map holds (the same length: nothing else
/// writes between the halves), and gives back what it replaced.
fn swap_in<M: Roomy>(map: &mut M, copy: &mut Option<M>) {
    if let Some(c) = copy {
        if c.len() == map.len() {
            std::mem::swap(map, c);
        }
    }
}

impl ShardIndex {
    /// Under a shared borrow (searches go on), by the only writer: copies of the maps that the
    /// writes logged and not applied yet would fill past their room, or that hold under half of
    /// it, at their new sizes. [`install_room`](Self::install_room) swaps them in.
    pub fn prepare_room(&self) -> Room {
        let (mut upserted, mut chunks, mut deleted) = (0usize, 0usize, 0usize);
        for q in self.log_state().queued() {
            for op in q {
                match op {
                    WriteOp::Upsert { chunks: c, .. } if !c.is_empty() => {
                        upserted += 1;
                        chunks += c.len();
                    }
                    _ => deleted += 1,
                }
            }
        }
        Room {
            // the documents' table only: their entries never move
            docs: new_room(&self.docs, upserted).map(|room| self.docs.table_with(room)),
            slots: new_room(&self.slots, chunks).map(|room| self.slots.copy_with(room)),
            // a delete gives its document one record (its tombstone and deletion version)
            records: new_room(&self.records, deleted).map(|room| self.records.copy_with(room)),
        }
    }

    /// The room of the documents' and the slots' maps (entries each holds without growing).
    pub fn maps_room(&self) -> (usize, usize) {
        (self.docs.capacity(), self.slots.capacity())
    }

    /// Swaps in the copies `room` holds (a copy whose map changed since is not used); returns
    /// the maps replaced, to be freed after the lock.
    pub fn install_room(&mut self, mut room: Room) -> Room {
        room.docs = room.docs.take().map(|t| self.docs.install_table(t));
        swap_in(&mut self.slots, &mut room.slots);
        self.records.install(&mut room.records);
        room
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `map` copied at a size with room for `incoming` more entries, when it has not that room
    /// (the size it would grow to itself, or what it will hold if more), or when it holds under half
    /// of its room (a quarter more than it will hold); `None` when neither.
    fn resized<K, V>(map: &HashMap<K, V>, incoming: usize) -> Option<HashMap<K, V>>
    where
        K: Clone + Eq + std::hash::Hash,
        V: Clone,
    {
        let room = new_room(map, incoming)?;
        let mut copy = HashMap::with_capacity(room);
        copy.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
        Some(copy)
    }

    /// A copy of the deletion records is swapped in only while they hold what it was made
    /// from: not after a change that leaves their length as it was.
    #[test]
    fn a_copy_of_the_records_that_changed_since_is_not_swapped_in() {
        let mut r = super::super::records::Records::default();
        for i in 0..10_000u64 {
            let d = format!("d{i}");
            r.set_tombstone(&d, Some(i + 1));
            r.set_deleted(&d, Some(i));
        }
        let room = new_room(&r, r.capacity()).expect("would rehash");
        let mut copy = Some(r.copy_with(room));
        r.set_tombstone("d5", None);
        assert_eq!(r.len(), 10_000, "the same length");
        r.install(&mut copy);
        assert_eq!(r.tombstone("d5"), None, "the copy not swapped in");
        assert!(r.capacity() < room);
        let mut copy = Some(r.copy_with(room));
        r.install(&mut copy);
        assert!(r.capacity() >= room, "swapped in");
        assert_eq!(r.tombstone("d5"), None);
        assert_eq!(r.deleted("d5"), Some(5));
        assert_eq!((r.tombstone_count(), r.deleted_count()), (9_999, 10_000));
        assert_eq!(copy.unwrap().len(), 10_000, "the one replaced, handed back");
    }

    #[test]
    fn a_map_is_copied_only_when_it_would_rehash_or_is_mostly_empty() {
        let mut m: HashMap<String, u64> = HashMap::new();
        for i in 0..10_000u64 {
            m.insert(format!("d{i}"), i);
        }
        let room = m.capacity() - m.len();
        assert!(resized(&m, room).is_none(), "fits: left alone");
        let grown = resized(&m, room + 1).expect("would rehash: copied");
        let mut in_place = m.clone();
        in_place.reserve(room + 1);
        assert!(grown.capacity() > m.len() + room);
        assert_eq!(
            grown.capacity(),
            in_place.capacity(),
            "the size it would grow to"
        );
        assert_eq!(grown, m, "the same entries");
        for i in 0..8_000u64 {
            m.remove(&format!("d{i}"));
        }
        let shrunk = resized(&m, 0).expect("mostly empty: copied smaller");
        assert!(shrunk.capacity() < m.capacity() / 2);
        assert_eq!(shrunk, m);
        let mut small: HashMap<String, u64> = HashMap::new();
        small.insert("a".into(), 1);
        assert!(resized(&small, 100).is_none(), "small maps grow in place");
    }

    #[test]
    fn a_copy_of_a_map_that_changed_since_is_not_swapped_in() {
        let mut m: HashMap<u32, u64> = (0..5000).map(|i| (i, 0)).collect();
        let mut copy = resized(&m, m.capacity());
        m.insert(9_999, 1);
        swap_in(&mut m, &mut copy);
        assert!(m.contains_key(&9_999), "the map kept");
        let mut copy = resized(&m, m.capacity());
        let cap = copy.as_ref().unwrap().capacity();
        swap_in(&mut m, &mut copy);
        assert_eq!(m.capacity(), cap, "swapped in");
        assert!(m.contains_key(&9_999));
    }
}
